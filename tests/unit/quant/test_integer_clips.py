"""Integer clips: a Min / Max with a constant bound between quantized tensors runs on integers.

``Q(min(y, c)) = min(Q(y), Q(c))`` on one grid (rounding and clamping are monotone), so the QDQ
model ``Q → Min(·, Q(c)) → DQ`` computes bit for bit what ``Q → DQ → Min(·, c) → Q → DQ`` computes
with the same grid on both sides, and onnxruntime fuses the layers around it into QLinearConv.
Structure, exactness against the float-Min form, the encodings round trip, onnxruntime's fusion,
and twins where the rule must not fire.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import model_from_text

import onnxq
from onnxq.errors import ConfigError
from onnxq.passes._graph import constant
from onnxq.quant.annotate import annotate
from onnxq.quant.config import QuantConfig
from onnxq.quant.insert_qdq import Encoding
from onnxq.quant.sim import quantize_with_encodings
from onnxq.runtime import run

CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,8,8,8] y)
  <float[8,3,3,3] w1, float[8] b1, float[1,8,1,1] c1, float[8,8,1,1] w2, float[8] b2,
   float[1,8,1,1] c2, float[8,8,1,1] w3, float[8] b3> {
  h1 = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r1 = Relu(h1)
  m1 = Min(r1, c1)
  h2 = Conv(m1, w2, b2)
  r2 = Relu(h2)
  m2 = Min(c2, r2)
  y = Conv(m2, w3, b3)
}"""


def _chain(**arrays) -> ir.Model:
    rng = np.random.default_rng(3)
    bounds = {  # per-channel bounds, as CLE writes them (6/s): some inside the data, some above
        "c1": rng.uniform(0.3, 3.0, (1, 8, 1, 1)).astype(np.float32),
        "c2": rng.uniform(0.3, 3.0, (1, 8, 1, 1)).astype(np.float32),
    }
    return model_from_text(CHAIN, **{**bounds, **arrays})


def _calib(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(n)]


FEEDS = {"x": _calib(1, seed=9)[0]}


def _producer_op(value: ir.Value) -> str | None:
    node = value.producer()
    return node.op_type if node is not None else None


def _mins(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Min"]


def test_min_with_a_constant_bound_runs_on_integers():
    model = _chain()
    plan = annotate(model, QuantConfig())
    assert sorted(c.node.name or c.node.outputs[0].name for c in plan.clips) == sorted(
        n.name or n.outputs[0].name for n in _mins(model))
    # the Relu output joins the Min output's group, whose statistics alone set the encoding
    for clip in plan.clips:
        x, out = clip.node.inputs[clip.data], clip.node.outputs[0]
        group = plan.group_of()[id(out)]
        assert group is plan.group_of()[id(x)]
        assert [v.name for v in group.members] == [out.name]
    sim = onnxq.quantize(model, _calib())
    mins = _mins(sim.model)
    assert len(mins) == 2
    for node in mins:
        data = next(v for v in node.inputs if v.const_value is None)
        bound = next(v for v in node.inputs if v.const_value is not None)
        assert _producer_op(data) == "QuantizeLinear"  # Q → Min, no DQ → Min
        assert bound.dtype == ir.DataType.UINT8 and node.outputs[0].dtype == ir.DataType.UINT8
        # per-channel, repeated along the static width (onnxruntime's NHWC Min runs W·C spans)
        codes = bound.const_value.numpy()
        assert codes.shape == (1, 8, 1, 8) and (codes == codes[..., :1]).all()
        assert {u.node.op_type for u in node.outputs[0].uses()} == {"DequantizeLinear"}
    ops = [n.op_type for n in sim.model.graph]
    assert "Relu" not in ops  # the Q after it saturates at the grid's ends (0 included)
    assert ops.count("QuantizeLinear") == 3  # input, and one per Conv → Min; none after a Min


def test_integer_clip_equals_the_float_min_on_the_same_grid(tmp_path):
    """Bit for bit under onnxruntime without optimizations: Q(y) → Min(·, Q(c)) → DQ against
    Q(y) → DQ → Min(·, c) → Q → DQ with the same encodings (the float form, integer_clips off)."""
    model = _chain()
    sim = onnxq.quantize(model, _calib())
    paths = sim.export(tmp_path, "m")
    float_form = quantize_with_encodings(sim.float_model, paths["encodings"],
                                         QuantConfig(integer_clips=False))
    assert not float_form.plan.clips and not any(
        _producer_op(next(v for v in n.inputs if v.const_value is None)) == "QuantizeLinear"
        for n in _mins(float_form.model))
    for seed in range(3):
        feeds = {"x": 3 * _calib(1, seed=20 + seed)[0]}  # wide inputs: clipped and saturated
        np.testing.assert_array_equal(run(sim.model, feeds)[0], run(float_form.model, feeds)[0])
    # and the integers are Q(min(y, c)) computed by hand
    enc = {e.name: e for e in sim.encodings}["m1"]
    r1 = np.maximum(run(_expose(sim.model, "h1"), FEEDS)[0], 0)  # the QDQ model's Conv output
    c1 = constant(model.graph.initializers["c1"])
    s, z = np.float32(enc.scale[0]), enc.zero_point[0]
    want = np.clip(np.rint(np.minimum(r1, c1) / s) + z, 0, 255)
    got = run(_expose(sim.model, "m1_quantized"), FEEDS)[0]
    np.testing.assert_array_equal(got, want)


def _expose(model: ir.Model, name: str) -> ir.Model:
    copy = model.clone()
    value = next(o for n in copy.graph for o in n.outputs if o.name == name)
    copy.graph.outputs.clear()
    copy.graph.outputs.append(value)
    return copy


def test_encodings_round_trip_stays_exact(tmp_path):
    sim = onnxq.quantize(_chain(), _calib())
    paths = sim.export(tmp_path, "m")
    for key in ("encodings", "encodings_v2"):
        again = quantize_with_encodings(sim.float_model, paths[key], sim.config)
        assert len(again.plan.clips) == 2
        np.testing.assert_array_equal(sim.run(FEEDS)[0], again.run(FEEDS)[0])
        np.testing.assert_array_equal(run(sim.model, FEEDS)[0], run(again.model, FEEDS)[0])


def test_encodings_with_two_grids_are_refused_for_an_integer_clip(tmp_path):
    sim = onnxq.quantize(_chain(), _calib(), config=QuantConfig(integer_clips=False))
    given = {e.name: e for e in sim.encodings}
    assert given["r1"].scale != given["m1"].scale  # two grids: the float Min between them
    with pytest.raises(ConfigError, match="integer_clips=False"):
        quantize_with_encodings(sim.float_model, given, QuantConfig())
    again = quantize_with_encodings(sim.float_model, given, sim.config)
    np.testing.assert_array_equal(sim.run(FEEDS)[0], again.run(FEEDS)[0])


def test_onnxruntime_fuses_qlinearconv_around_the_integer_min(tmp_path):
    sim = onnxq.quantize(_chain(), _calib())
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(ir.to_proto(sim.model).SerializeToString(), so,
                         providers=["CPUExecutionProvider"])
    graph = onnx.load(so.optimized_model_filepath).graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def through_transposes(name, up):
        node = producer.get(name) if up else readers.get(name, [None])[0]
        while node is not None and node.op_type == "Transpose":
            nxt = node.input[0] if up else node.output[0]
            node = producer.get(nxt) if up else readers.get(nxt, [None])[0]
        return node

    mins = [n for n in graph.node if n.op_type == "Min"]
    assert len(mins) == 2
    ops = [n.op_type for n in graph.node]
    assert ops.count("QLinearConv") == 2, ops  # (the last Conv writes the float output)
    # DQ only into the last, float Conv (its input, weight, bias); no Q reads a Min's output
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert {readers[n.output[0]][0].op_type for n in dqs} <= {"Conv", "FusedConv"}
    assert not any(n.op_type == "QuantizeLinear" and producer.get(n.input[0]) in mins
                   for n in graph.node)
    for node in mins:
        data = next(i for i in node.input if i in producer)
        assert through_transposes(data, up=True).op_type == "QLinearConv"
    assert through_transposes(mins[0].output[0], up=False).op_type == "QLinearConv"
    # the float-Min form leaves Q / DQ around every Min
    float_form = onnxq.quantize(_chain(), _calib(), config=QuantConfig(integer_clips=False))
    so.optimized_model_filepath = str(tmp_path / "optimized_float_min.onnx")
    ort.InferenceSession(ir.to_proto(float_form.model).SerializeToString(), so,
                         providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("DequantizeLinear") >= 3 and ops.count("QuantizeLinear") >= 3


def test_sqnr_against_the_float_model():
    model = _chain()
    sim = onnxq.quantize(model, _calib())
    ref = run(model, FEEDS)[0].astype(np.float64)
    out = sim.run(FEEDS)[0].astype(np.float64)
    assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)) > 25


def test_max_then_min_chain_on_integers_with_placement_all(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,8,8,8] y)
  <float[8,3,3,3] w1, float[8] b1, float[1,8,1,1] lo, float[1,8,1,1] hi, float[8,8,1,1] w2,
   float[8] b2> {
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  a = Max(h, lo)
  m = Min(a, hi)
  y = Conv(m, w2, b2)
}"""
    arrays = {"lo": np.linspace(-1.0, 0.5, 8, dtype=np.float32),
              "hi": np.linspace(0.8, 2.5, 8, dtype=np.float32)}
    model = model_from_text(text, **arrays)
    config = QuantConfig(placement="all")
    sim = onnxq.quantize(model, _calib(), config=config)
    assert [c.node.op_type for c in sim.plan.clips] == ["Max", "Min"]
    ops = [n.op_type for n in sim.model.graph]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") >= 2
    maxi = next(n for n in sim.model.graph if n.op_type == "Max")
    assert _producer_op(maxi.inputs[0]) == "QuantizeLinear"
    assert next(n for n in sim.model.graph if n.op_type == "Min").inputs[0] is maxi.outputs[0]
    paths = sim.export(tmp_path, "m")
    float_form = quantize_with_encodings(sim.float_model, paths["encodings"],
                                         config.replace(integer_clips=False))
    feeds = {"x": 3 * FEEDS["x"]}
    np.testing.assert_array_equal(run(sim.model, feeds)[0], run(float_form.model, feeds)[0])


# -- twins: where the rule must not fire --------------------------------------------------------
def test_no_integer_clip_when_switched_off():
    plan = annotate(_chain(), QuantConfig(integer_clips=False))
    assert not plan.clips
    names = {v.name for g in plan.groups for v in g.members}
    assert {"r1", "m1"} <= names  # two groups, two grids


def test_no_integer_clip_when_the_input_has_another_reader():
    text = CHAIN.replace("y = Conv(m2, w3, b3)", "s = Add(m2, r2)\n  y = Conv(s, w3, b3)")
    model = model_from_text(text, c1=np.ones((1, 8, 1, 1)), c2=np.ones((1, 8, 1, 1)))
    plan = annotate(model, QuantConfig())
    assert [c.node.outputs[0].name for c in plan.clips] == ["m1"]  # r2 also feeds the Add


def test_no_integer_clip_when_the_bound_broadcasts_the_input():
    text = CHAIN.replace("float[1,8,1,1] c1", "float[2,8,1,1] c1")
    model = model_from_text(text, c1=np.ones((2, 8, 1, 1)), c2=np.ones((1, 8, 1, 1)))
    plan = annotate(model, QuantConfig())
    assert [c.node.outputs[0].name for c in plan.clips] == ["m2"]


def test_no_integer_clip_between_two_activations_or_at_a_graph_output():
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,8,8,8] y, float[N,8,8,8] m2)
  <float[8,3,3,3] w1, float[8,3,3,3] w2, float[8,8,1,1] w3, float[1,8,1,1] c> {
  a = Conv<pads=[1,1,1,1]>(x, w1)
  b = Conv<pads=[1,1,1,1]>(x, w2)
  m = Min(a, b)
  y = Conv(m, w3)
  m2 = Min(b, c)
}"""
    model = model_from_text(text)
    for config in (QuantConfig(), QuantConfig(placement="all", model_outputs=True)):
        assert not annotate(model, config).clips


def test_encoding_names_stay_those_of_the_float_model():
    sim = onnxq.quantize(_chain(), _calib())
    names = {e.name for e in sim.encodings if e.kind == "activation"}
    assert {"x", "r1", "m1", "r2", "m2"} <= names
    enc = {e.name: e for e in sim.encodings}
    assert isinstance(enc["r1"], Encoding) and enc["r1"].scale == enc["m1"].scale


def test_bound_is_not_tiled_along_a_dynamic_width():
    text = CHAIN.replace("float[N,3,8,8] x", "float[N,3,8,W] x").replace(
        "float[N,8,8,8] y", "float[N,8,8,W] y")
    model = model_from_text(text, c1=np.full((1, 8, 1, 1), 0.5), c2=np.full((1, 8, 1, 1), 0.7))
    sim = onnxq.quantize(model, _calib())
    shapes = {tuple(n.inputs[i].const_value.shape) for n in _mins(sim.model) for i in range(2)
              if n.inputs[i].const_value is not None}
    assert shapes == {(1, 8, 1, 1)}
