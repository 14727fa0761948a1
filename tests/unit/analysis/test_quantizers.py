"""Quantizers found in a QDQ model, and variants with some bypassed: exact where they must be."""

from __future__ import annotations

import numpy as np
from tiny_models import batches, chain_model

import onnxq
import pytest
from onnxq.analysis.quantizers import bypass, find_quantizers, lossless
from onnxq.passes._graph import add_initializer
from onnxq.runtime import create_session


def _sim():
    return onnxq.quantize(chain_model(), batches(3), config="default")


def _run(model, feeds):
    return create_session(model, optimize=False).run(None, feeds)[0]


def test_every_quantizer_is_found_with_its_owner():
    sim = _sim()
    qmap = find_quantizers(sim.model, sim.float_model)
    kinds = [q.kind for q in qmap.quantizers]
    assert kinds.count("weight") == 4  # 3 Conv + Gemm
    by_id = qmap.by_id()
    assert {"w:conv_0", "w:conv_2", "w:conv_4", "w:gemm_7", "a:x", "a:r", "a:r2"} <= set(by_id)
    # Clip(0, 6) was dropped by the QDQ layout (its bounds contain the grid): remembered
    assert by_id["a:r"].absorbed == "Clip" and by_id["a:r"].node == "clip_1"
    assert by_id["a:x"].op_type == "<input>" and by_id["a:x"].node == ""


def test_bypassing_everything_gives_the_float_model_exactly():
    sim = _sim()
    feeds = batches(1, seed=5)[0]
    ids = [q.id for q in find_quantizers(sim.model, sim.float_model).quantizers]
    out = _run(bypass(sim.model, sim.float_model, ids), feeds)
    assert np.array_equal(out, _run(sim.float_model, feeds))
    # the restored Clip is there: bypass of the Clip's quantizer alone keeps the clamp
    one = bypass(sim.model, sim.float_model, ["a:r"])
    assert any(n.op_type == "Clip" for n in one.graph)
    assert not any(n.op_type == "Clip" for n in sim.model.graph)


def test_bypassing_one_quantizer_changes_only_that_one():
    sim = _sim()
    feeds = batches(1, seed=5)[0]
    full = _run(sim.model, feeds)
    part = bypass(sim.model, sim.float_model, ["w:gemm_7"])
    q_types = [n.op_type for n in part.graph]
    assert q_types.count("DequantizeLinear") < [n.op_type for n in sim.model.graph].count("DequantizeLinear")
    assert not np.array_equal(_run(part, feeds), full)
    assert len(find_quantizers(part, sim.float_model).quantizers) == \
        len(find_quantizers(sim.model, sim.float_model).quantizers) - 1


def test_lossless_variant_is_exact_for_a_correct_model():
    sim = _sim()
    feeds = batches(1, seed=5)[0]
    variant, problems = lossless(sim.model, sim.float_model)
    assert problems == []
    assert np.array_equal(_run(variant, feeds), _run(sim.float_model, feeds))


SCALED = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
  <float[6,3,3,3] w1, float[6] b1, float k, float three, float six, float[4,6,1,1] w2, float[4] b2> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  m = Mul(a, k)
  h = Add(m, three)
  d = Div(h, six)
  y = Conv(d, w2, b2)
}"""


def test_ops_folded_into_rescaled_dequantizers_are_restored():
    """Whatever the QDQ layout does with element-wise ops on constants (a DQ with a rescaled
    scale standing for Mul(x, k), integer constants for Add/Div), bypassing every quantizer gives
    the float model exactly and the lossless variant finds nothing wrong."""
    from conftest import model_from_text

    model = model_from_text(SCALED, k=np.float32(0.37), three=np.float32(3), six=np.float32(6))
    sim = onnxq.quantize(model, batches(2), config="default")
    qmap = find_quantizers(sim.model, sim.float_model)
    feeds = batches(1, seed=5)[0]
    ids = [q.id for q in qmap.quantizers]
    assert np.array_equal(_run(bypass(sim.model, sim.float_model, ids), feeds),
                          _run(sim.float_model, feeds))
    variant, problems = lossless(sim.model, sim.float_model)
    assert problems == []
    assert np.array_equal(_run(variant, feeds), _run(sim.float_model, feeds))
    # negative twin: a rescaled view whose scale is not the folded Mul's factor is flagged
    views = [v for p in qmap.acts.values() for v in p.views if v.value != p.name]
    if not views:
        pytest.skip("this QDQ layout folds no Mul into a DequantizeLinear scale")
    dq = views[0].dq
    dq.replace_input_with(1, add_initializer(sim.model.graph, np.float32(2) * dq.inputs[1].const_value.numpy(), "bad_scale"))
    _, problems = lossless(sim.model, sim.float_model)
    assert problems and "disagree" in problems[0]["problem"]
