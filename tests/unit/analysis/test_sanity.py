"""Step 1: the FP32 sanity check catches a Q/DQ pair with a wrong zero point (and not a good model)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from tiny_models import batches, chain_model

import onnxq
from onnxq.analysis.sanity import check_sanity
from onnxq.passes._graph import add_initializer


def _sim():
    return onnxq.quantize(chain_model(), batches(3), config="default")


def _plant_wrong_dq_zero_point(model: ir.Model, tensor: str) -> None:
    """The DequantizeLinear of ``tensor`` gets its own zero point, 3 codes off."""
    dq = next(n for n in model.graph if n.name == f"{tensor}_DequantizeLinear")
    zero = dq.inputs[2].const_value.numpy()
    wrong = add_initializer(model.graph, (zero.astype(np.int64) + 3).astype(zero.dtype), "planted_zp")
    dq.replace_input_with(2, wrong)


def test_a_correct_model_passes_with_zero_difference():
    sim = _sim()
    result = check_sanity(sim.model, sim.float_model, batches(1), encodings=sim.encodings)
    assert result.ok and result.max_abs_diff == 0.0 and result.problems == []


def test_planted_wrong_zero_point_is_caught_and_named():
    sim = _sim()
    _plant_wrong_dq_zero_point(sim.model, "r2")
    result = check_sanity(sim.model, sim.float_model, batches(1), encodings=sim.encodings)
    assert not result.ok
    assert result.max_abs_diff > 1e-3  # 3 codes × scale, propagated to the output
    assert [p["quantizer"] for p in result.problems] == ["a:r2"]
    assert "disagree" in result.problems[0]["problem"]
    assert "FAILED" in result.summary() and "a:r2" in result.summary()


def test_zero_point_changed_on_both_sides_is_caught_by_the_encodings():
    sim = _sim()
    q = next(n for n in sim.model.graph if n.name == "r2_QuantizeLinear")
    zero = q.inputs[2]
    zero.const_value = ir.Tensor((zero.const_value.numpy().astype(np.int64) + 5).astype(np.uint8),
                                 name=zero.name)
    result = check_sanity(sim.model, sim.float_model, batches(1), encodings=sim.encodings)
    assert not result.ok
    assert any(p["quantizer"] == "a:r2" and "encoding" in p["problem"] for p in result.problems)


def test_wrong_weight_zero_point_is_caught():
    sim = _sim()
    dq = next(n for n in sim.model.graph if n.name.startswith("wf_") or n.name == "wf_DequantizeLinear")
    wrong = add_initializer(sim.model.graph, np.array(4, np.int8), "planted_wzp")
    dq.replace_input_with(2, wrong)
    result = check_sanity(sim.model, sim.float_model, batches(1))
    assert any(p["quantizer"] == "w:gemm_7" and "steps" in p["problem"] for p in result.problems)


def test_analysis_of_a_model_with_per_channel_clips_passes_sanity():
    """CLE's ``Relu → Min(·, c)`` becomes an integer clip in a plain quantize (Q → Min → DQ),
    which the per-quantizer views do not model yet: the analyzer keeps such clips in float (and
    its plan says so), so the sanity check of a correct model still passes exactly."""
    from tests.conftest import model_from_text

    from onnxq.analysis import AnalysisConfig, analyze

    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[6,3,3,3] w1, float[6] b1, float[6,1,1] c, float[4,6,1,1] w2, float[4] b2> {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (a)
    m = Min (r, c)
    y = Conv (m, w2, b2)
}"""
    rng = np.random.default_rng(0)
    model = model_from_text(text, c=np.array([6, 1, 3, 0.5, 2, 4], np.float32).reshape(6, 1, 1))
    data = [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    plain = onnxq.quantize(model, data)
    assert any(n.op_type == "Min" and n.inputs[0].producer().op_type == "QuantizeLinear" for n in plain.model.graph)
    result = analyze(model, data, options=AnalysisConfig(workers=1, fixes=()))
    assert result.data["sanity"]["ok"], result.data["sanity"]
    assert result.data["plan"]["config"]["integer_clips"] is False
