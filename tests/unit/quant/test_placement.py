"""Quantizer placement (annotate) and Q/DQ insertion on small graphs: structural asserts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import model_from_text, random_feeds

from onnxq.errors import UnsupportedModelError
from onnxq.quant.annotate import annotate
from onnxq.quant.config import QuantConfig, QuantSpec, preset
from onnxq.quant.insert_qdq import insert_qdq, required_opset
from onnxq.runtime import run

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,10] y)
  <float[8,3,3,3] w1, float[8] b1, float[8,8,1,1] w2, float[8] b2, float[10,8] wg, float[10] bg,
   int64[2] shape> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(a)
  c = Conv(r, w2, b2)
  p = GlobalAveragePool(c)
  f = Reshape(p, shape)
  y = Gemm<transB=1>(f, wg, bg)
}"""


def model():
    return model_from_text(TEXT, shape=np.array([0, -1], np.int64))


def by_name(plan):
    return {v.name: g for g in plan.groups for v in g.quantized}


def test_placement_follows_supergroups_and_ties():
    plan = annotate(model(), QuantConfig())
    quantized = by_name(plan)
    assert "x" in quantized  # model input
    assert "a" not in quantized and "r" in quantized  # Conv+Relu supergroup: after the Relu
    assert "c" in quantized and "p" in quantized
    assert quantized["f"] is quantized["p"]  # Reshape reuses its input's encoding
    assert "y" not in quantized  # model outputs are not quantized by default
    assert [s.node.op_type for s in plan.weights] == ["Conv", "Conv", "Gemm"]
    assert all(s.axis is None for s in plan.weights)
    assert len(plan.biases) == 3


def test_per_channel_axes():
    plan = annotate(model(), preset("per-channel"))
    assert [s.axis for s in plan.weights] == [0, 0, 0]  # Gemm transB=1 → axis 0
    assert required_opset(plan) == 13


def test_override_skips_a_node():
    cfg = QuantConfig(node_overrides={}, op_overrides={"Gemm": {"skip": True}})
    plan = annotate(model(), cfg)
    assert [s.node.op_type for s in plan.weights] == ["Conv", "Conv"]


def measured_range(model, group, feeds):
    """min/max of the group's tensors on ``feeds`` (exposed as extra outputs of a copy)."""
    probe = model.clone()
    wanted = {v.name for v in group.members}
    for node in probe.graph:
        for out in node.outputs:
            if out.name in wanted and not out.is_graph_output():
                probe.graph.outputs.append(out)
    names = [o.name for o in probe.graph.outputs]
    values = dict(zip(names, run(probe, feeds)))
    values.update(feeds)
    arrays = [values[n] for n in wanted if n in values]
    return float(min(a.min() for a in arrays)), float(max(a.max() for a in arrays))


def test_insert_runs_in_onnxruntime_and_tracks_float():
    m = model()
    feeds = random_feeds(m)
    ref = run(m, feeds)[0]
    plan = annotate(m, QuantConfig(weights=QuantSpec(bits=8, symmetric=True, per_channel=True)))
    ranges = {id(g): measured_range(m, g, feeds) for g in plan.groups}
    encodings = insert_qdq(m, plan, ranges)
    ops = [n.op_type for n in m.graph]
    assert ops.count("QuantizeLinear") == len([v for g in plan.groups for v in g.quantized])
    assert ops.count("DequantizeLinear") == ops.count("QuantizeLinear") + 3 + 3  # weights, biases
    bias = m.graph.initializers["b1_quantized"].const_value.numpy()
    assert bias.dtype == np.int32
    out = run(m, feeds)[0]
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))
    assert sqnr > 20, sqnr
    names = {e.name for e in encodings}
    assert {"x", "r", "w1", "b1"} <= names


def test_already_quantized_model_is_refused():
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x) => (float[4] y) <float s, uint8 z> {
  q = QuantizeLinear(x, s, z)
  y = DequantizeLinear(q, s, z)
}"""
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        annotate(model_from_text(text, s=np.float32(0.1), z=np.uint8(0)), QuantConfig())


def test_quantize_end_to_end_sqnr_and_export(tmp_path):
    import json

    import onnxq

    m = model()
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(8)]
    feeds = {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}
    ref = run(m, feeds)[0]
    results = {}
    for cfg in ("default", "per-channel", "w8a16"):
        sim = onnxq.quantize(m, calib, config=cfg)
        out = sim.run(feeds)[0]
        results[cfg] = 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))
    assert results["default"] > 25 and results["per-channel"] > 25, results
    assert results["w8a16"] > results["default"], results  # 16-bit activations are finer
    paths = sim.export(tmp_path, "tiny")
    data = json.loads(paths["encodings"].read_text())
    assert {e["name"] for e in data["activation_encodings"]} >= {"x", "r"}
    assert all(e["bw"] == 16 for e in data["activation_encodings"])
    assert onnxq.load(paths["qdq"]) is not None
    # the input model is untouched: no Q/DQ in it
    assert "QuantizeLinear" not in [n.op_type for n in m.graph]


def test_int4_weights_raise_the_opset_and_run():
    import onnxq

    m = model()
    calib = [np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)]
    ref = run(m, {"x": calib[0]})[0]
    sqnr = {}
    for bits in (4, 8):
        cfg = QuantConfig(weights=QuantSpec(bits=bits, symmetric=True, per_channel=True))
        sim = onnxq.quantize(m, calib, config=cfg)
        out = sim.run({"x": calib[0]})[0]
        sqnr[bits] = 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))
        if bits == 4:
            assert sim.model.opset_imports[""] >= 21
            assert sim.model.graph.initializers["w1_quantized"].const_value.dtype.name == "INT4"
    assert 8 < sqnr[4] < sqnr[8], sqnr


def test_qdq_layout_fuses_in_onnxruntime(tmp_path):
    """Relu before a Q whose grid it contains is dropped (exact), each reader gets its own DQ,
    and onnxruntime turns every Conv into QLinearConv."""
    import onnx
    import onnxruntime as ort
    import onnx_ir as ir

    import onnxq

    m = model()
    calib = [np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)]
    sim = onnxq.quantize(m, calib, config="per-channel")
    ops = [n.op_type for n in sim.model.graph]
    assert "Relu" not in ops
    for n in sim.model.graph:  # per-tensor scales and zero points are scalars (QLinear* need it)
        if n.op_type == "QuantizeLinear":
            assert n.inputs[1].const_value.shape == () and n.inputs[2].const_value.shape == ()
    for n in sim.model.graph:
        if n.op_type == "DequantizeLinear":
            assert len(n.outputs[0].uses()) <= 1
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(ir.to_proto(sim.model).SerializeToString(), so,
                         providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 2, fused


def test_per_tensor_keeps_an_old_opset_valid():
    """Per-tensor needs no opset upgrade, so nothing may use DequantizeLinear's axis (opset 13)."""
    import onnxq

    m = model_from_text(TEXT.replace('"" : 17', '"" : 12'), shape=np.array([0, -1], np.int64))
    calib = [np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)]
    sim = onnxq.quantize(m, calib, config="default")
    assert sim.model.opset_imports[""] == 12
    assert all("axis" not in n.attributes for n in sim.model.graph if n.op_type == "DequantizeLinear")
    assert sim.run({"x": calib[0]})[0].shape == (2, 10)


def test_gather_from_a_constant_table_gets_its_own_encoding():
    """An embedding lookup's output is calibrated on its own, not tied to the weight table."""
    import onnxq

    text = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[N,4] ids) => (float[N,4,3] y) <float[10,8] table, float[8,3] w> {
  e = Gather(table, ids)
  y = MatMul(e, w)
}"""
    m = model_from_text(text)
    plan = annotate(m, QuantConfig())
    assert "e" in by_name(plan) and "table" not in {v.name for g in plan.groups for v in g.members}
    sim = onnxq.quantize(m, [{"ids": np.array([[1, 2, 3, 9]], np.int64)}])
    assert sim.run({"ids": np.array([[0, 1, 2, 3]], np.int64)})[0].shape == (1, 4, 3)
