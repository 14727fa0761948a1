"""Placement "runtime": quantizers only where onnxruntime runs integer kernels.

Every rule has a structural check (what the plan and the QDQ model contain, which ops onnxruntime
fuses), an SQNR floor against the float model, and a twin where the rule must not fire.
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
from onnxq.quant.annotate import annotate
from onnxq.quant.config import QuantConfig, QuantSpec
from onnxq.runtime import run

PER_CHANNEL = QuantConfig(weights=QuantSpec(bits=8, symmetric=True, per_channel=True))


def _calib(shape, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _sqnr(model, sim, feeds) -> float:
    ref = run(model, feeds)[0].astype(np.float64)
    out = sim.run(feeds)[0].astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))


def _fused(model: ir.Model, tmp_path) -> list[str]:
    """Op types of the graph onnxruntime runs (all optimizations)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                         providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def _quantized_names(plan) -> set[str]:
    return {v.name for g in plan.groups for v in g.quantized}


# -- constant operands of element-wise ops ------------------------------------------------------
AFFINE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,8,8,8] y)
  <float[8,3,3,3] w1, float[8] b1, float[1,8,1,1] gamma, float[1] beta, float[8,8,1,1] w2,
   float[8] b2> {
  c = Conv<pads=[1,1,1,1]>(x, w1, b1)
  m = Mul(c, gamma)
  a = Add(m, beta)
  y = Conv(a, w2, b2)
}"""


def test_constant_operands_of_add_and_mul_are_quantized_so_both_fuse(tmp_path):
    model = model_from_text(AFFINE)
    plan = annotate(model, PER_CHANNEL)
    assert sorted(s.value.name for s in plan.constants) == ["beta", "gamma"]
    assert {"c", "m", "a"} <= _quantized_names(plan)
    sim = onnxq.quantize(model, _calib((2, 3, 8, 8)), config=PER_CHANNEL)
    fused = _fused(sim.model, tmp_path)
    assert fused.count("QLinearMul") == 1 and fused.count("QLinearAdd") == 1, fused
    # (the last Conv writes the float graph output: onnxruntime keeps it float)
    assert "Mul" not in fused and "Add" not in fused and fused.count("QLinearConv") == 1
    feeds = {"x": _calib((2, 3, 8, 8), 1, seed=9)[0]}
    assert _sqnr(model, sim, feeds) > 25
    assert {e.name for e in sim.encodings if e.kind == "param"} >= {"gamma", "beta"}


def test_an_infinite_constant_is_a_sentinel_and_keeps_the_op_float():
    plan = annotate(model_from_text(AFFINE, beta=np.array([-np.inf], np.float32)), PER_CHANNEL)
    assert [s.value.name for s in plan.constants] == ["gamma"]  # Add(m, -inf) stays float
    assert "a" not in _quantized_names(plan)
    assert ("a", "carries a sentinel (a stand-in for ±inf)") in plan.skipped


# -- Mul / Div by a positive scalar: a change of scale ------------------------------------------
SCALED = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,8,8,8] y)
  <float[8,3,3,3] w1, float[8] b1, float[1] half, float four, float[8,8,1,1] w2, float[8] b2> {
  c = Conv<pads=[1,1,1,1]>(x, w1, b1)
  m = Mul(half, c)
  d = Div(m, four)
  y = Conv(d, w2, b2)
}"""


def test_mul_and_div_by_a_positive_scalar_fold_into_the_scale(tmp_path):
    arrays = {"half": np.array([0.5], np.float32), "four": np.float32(4.0)}
    model = model_from_text(SCALED, **arrays)
    plan = annotate(model, PER_CHANNEL)
    folded = {g.quantized[0].name: (g.source.name, g.factor) for g in plan.groups if g.source}
    assert folded == {"m": ("c", 0.5), "d": ("m", 0.25)}
    assert all(not g.members for g in plan.groups if g.source)  # nothing of theirs to observe
    sim = onnxq.quantize(model, _calib((2, 3, 8, 8)), config=PER_CHANNEL)
    ops = [n.op_type for n in sim.model.graph]
    assert "Mul" not in ops and "Div" not in ops
    enc = {e.name: e for e in sim.encodings}
    assert enc["d"].scale[0] == pytest.approx(enc["c"].scale[0] * 0.125, rel=1e-6)
    assert enc["d"].zero_point == enc["c"].zero_point
    fused = _fused(sim.model, tmp_path)
    # Conv → QLinearConv, whose integers go, rescaled, to the DQ of the last (float-output) Conv
    assert fused.count("QLinearConv") == 1 and "QuantizeLinear" in fused, fused
    assert "Mul" not in fused and "Div" not in fused and "QLinearMul" not in fused
    feeds = {"x": _calib((2, 3, 8, 8), 1, seed=9)[0]}
    assert _sqnr(model, sim, feeds) > 30


@pytest.mark.parametrize("half", [-0.5, 0.0])
def test_a_scalar_that_is_not_positive_is_not_folded(half):
    arrays = {"half": np.array([half], np.float32), "four": np.float32(4.0)}
    model = model_from_text(SCALED, **arrays)
    plan = annotate(model, PER_CHANNEL)
    sources = {g.quantized[0].name: g.source for g in plan.groups}
    assert sources["m"] is None  # Mul by a non-positive scalar: QLinearMul, not a new scale
    assert [s.value.name for s in plan.constants] == ["half"]
    sim = onnxq.quantize(model, _calib((2, 3, 8, 8)), config=PER_CHANNEL)
    assert "Mul" in [n.op_type for n in sim.model.graph]


def test_folding_can_be_turned_off():
    arrays = {"half": np.array([0.5], np.float32), "four": np.float32(4.0)}
    plan = annotate(model_from_text(SCALED, **arrays),
                    PER_CHANNEL.replace(fold_scalar_scales=False))
    assert not any(g.source for g in plan.groups)
    assert [s.value.name for s in plan.constants] == ["half"]  # Mul runs as QLinearMul instead


# -- float-only ops get no quantizers -----------------------------------------------------------
LAYERNORM = """<ir_version: 8, opset_import: ["" : 18]>
g (float[N,16] x) => (float[N,16] y)
  <float[16,16] w1, float[16,16] w2, float[16] gamma, float[16] beta, float eps, float two,
   int64[1] axes> {
  h = MatMul(x, w1)
  mu = ReduceMean<keepdims=1>(h, axes)
  dev = Sub(h, mu)
  sq = Pow(dev, two)
  var = ReduceMean<keepdims=1>(sq, axes)
  ve = Add(var, eps)
  sd = Sqrt(ve)
  n = Div(dev, sd)
  s = Mul(n, gamma)
  t = Add(s, beta)
  y = MatMul(t, w2)
}"""


def _layernorm_model():
    return model_from_text(LAYERNORM, eps=np.float32(1e-5), two=np.float32(2.0),
                           axes=np.array([-1], np.int64))


def test_float_only_ops_get_no_quantizers():
    plan = annotate(_layernorm_model(), PER_CHANNEL)
    quantized = _quantized_names(plan)
    assert not quantized & {"mu", "dev", "sq", "var", "ve", "sd"}  # only float ops read them
    assert {"x", "h", "n", "s", "t"} <= quantized  # integer MatMul, Mul, Add read or write them
    assert sorted(s.value.name for s in plan.constants) == ["beta", "gamma"]
    model = _layernorm_model()
    sim = onnxq.quantize(model, _calib((4, 16)), config=PER_CHANNEL)
    assert _sqnr(model, sim, {"x": _calib((4, 16), 1, seed=9)[0]}) > 20


def test_placement_all_quantizes_every_boundary():
    plan = annotate(_layernorm_model(), PER_CHANNEL.replace(placement="all"))
    assert {"mu", "dev", "sq", "var", "ve", "sd", "n"} <= _quantized_names(plan)
    assert not any(g.source for g in plan.groups)  # no folding outside "runtime"


# -- Relu / Clip after an integer op ------------------------------------------------------------
RESIDUAL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,8,8] x) => (float[N,4,8,8] y)
  <float[4,4,3,3] w1, float[4] b1, float[4,4,1,1] w2, float[4] b2, float lo, float hi> {
  c = Conv<pads=[1,1,1,1]>(x, w1, b1)
  a = Add(c, x)
  r = Clip(a, lo, hi)
  y = Conv(r, w2, b2)
}"""


def test_clip_after_an_integer_add_is_absorbed(tmp_path):
    model = model_from_text(RESIDUAL, lo=np.float32(0), hi=np.float32(6))
    plan = annotate(model, PER_CHANNEL)
    quantized = _quantized_names(plan)
    assert "r" in quantized and "a" not in quantized and "c" in quantized
    sim = onnxq.quantize(model, _calib((2, 4, 8, 8)), config=PER_CHANNEL)
    assert "Clip" not in [n.op_type for n in sim.model.graph]  # the grid lies inside [0, 6]
    fused = _fused(sim.model, tmp_path)
    assert "QLinearAdd" in fused and "Add" not in fused and fused.count("QLinearConv") == 1
    assert _sqnr(model, sim, {"x": _calib((2, 4, 8, 8), 1, seed=9)[0]}) > 25


def test_clip_after_a_float_op_is_not_absorbed():
    text = RESIDUAL.replace("a = Add(c, x)", "a = Sub(c, x)")
    plan = annotate(model_from_text(text, lo=np.float32(0), hi=np.float32(6)), PER_CHANNEL)
    quantized = _quantized_names(plan)
    assert "r" in quantized and "a" not in quantized and "c" in quantized
    # Sub has no integer kernel: its output is read only by the Clip, which feeds the Conv


# -- the vote: light ops run where they save conversions ----------------------------------------
TRANSFORMER = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,16] x) => (float[N,16] y)
  <float[16] s1, float[16] c1, float[16,16] w, float[16] s2, float[16] c2> {
  n1 = LayerNormalization<axis=-1>(x, s1, c1)
  h = MatMul(n1, w)
  r = Add(n1, h)
  y = LayerNormalization<axis=-1>(r, s2, c2)
}"""


def test_a_residual_add_between_float_ops_stays_float():
    config = PER_CHANNEL.replace(supergroups=(), integer_neighbours=())
    plan = annotate(model_from_text(TRANSFORMER), config)
    quantized = _quantized_names(plan)
    assert "r" not in quantized  # two float neighbours (LayerNorm, LayerNorm), one integer
    assert {"n1", "h"} <= quantized  # the MatMul reads and writes integers


def test_layernorm_as_an_integer_neighbour_puts_the_residual_add_in_integers(tmp_path):
    """The default for onnxruntime's slow SkipLayerNormalization: the residual Add before a
    LayerNormalization runs as QLinearAdd, so no Add + LayerNormalization fusion happens."""
    config = PER_CHANNEL.replace(supergroups=())
    assert config.integer_neighbours == ("LayerNormalization",)
    model = model_from_text(TRANSFORMER.replace("float[N,16]", "float[N,4,16]"))
    plan = annotate(model, config)
    assert "r" in _quantized_names(plan)
    sim = onnxq.quantize(model, _calib((2, 4, 16)), config=config)
    fused = _fused(sim.model, tmp_path)
    assert "QLinearAdd" in fused and "SkipLayerNormalization" not in fused, fused
    float_config = config.replace(integer_neighbours=())
    float_sim = onnxq.quantize(model, _calib((2, 4, 16)), config=float_config)
    assert "SkipLayerNormalization" in _fused(float_sim.model, tmp_path)


def test_a_residual_add_between_convs_runs_in_integers(tmp_path):
    text = RESIDUAL.replace("r = Clip(a, lo, hi)\n  y = Conv(r, w2, b2)", "y = Conv(a, w2, b2)")
    text = text.replace(", float lo, float hi", "")
    model = model_from_text(text)
    plan = annotate(model, PER_CHANNEL)
    assert "a" in _quantized_names(plan)
    sim = onnxq.quantize(model, _calib((2, 4, 8, 8)), config=PER_CHANNEL)
    assert "QLinearAdd" in _fused(sim.model, tmp_path)


def test_an_input_padded_before_a_conv_is_quantized(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
  <float[4,3,3,3] w, float[4] b, int64[8] pads, float[4,4,1,1] w2, float[4] b2> {
  p = Pad(x, pads)
  c = Conv(p, w, b)
  y = Conv(c, w2, b2)
}"""
    model = model_from_text(text, pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    plan = annotate(model, PER_CHANNEL)
    assert _quantized_names(plan) == {"x", "c"}  # Pad→Conv is a supergroup: the Conv reads x
    sim = onnxq.quantize(model, _calib((2, 3, 8, 8)), config=PER_CHANNEL)
    fused = _fused(sim.model, tmp_path)
    assert "QLinearConv" in fused and "Pad" not in fused, fused


# -- sentinels: attention masks -----------------------------------------------------------------
ATTENTION = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8,16] x, bool[N,1,8] keep) => (float[N,8,16] y)
  <float[16,16] wq, float[16,16] wv, float zero, float lowest, float scale> {
  q = MatMul(x, wq)
  v = MatMul(x, wv)
  kt = Transpose<perm=[0,2,1]>(x)
  s = MatMul(q, kt)
  sc = Div(s, scale)
  mask = Where(keep, zero, lowest)
  m = Add(sc, mask)
  p = Softmax<axis=-1>(m)
  y = MatMul(p, v)
}"""


@pytest.mark.parametrize("lowest", [-3.4028235e38, -1e4])
def test_an_attention_mask_is_never_quantized(lowest):
    arrays = {"zero": np.float32(0), "lowest": np.float32(lowest), "scale": np.float32(4)}
    model = model_from_text(ATTENTION, **arrays)
    plan = annotate(model, PER_CHANNEL.replace(supergroups=()))
    quantized = _quantized_names(plan)
    assert not quantized & {"mask", "m"}  # a grid over [lowest, max] leaves no room for scores
    assert {"q", "kt", "s", "p", "v"} <= quantized  # the MatMuls still run in integers
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 8, 16)).astype(np.float32),
              "keep": rng.random((2, 1, 8)) > 0.3} for _ in range(4)]
    sim = onnxq.quantize(model, calib, config=PER_CHANNEL.replace(supergroups=()))
    feeds = calib[0]
    assert _sqnr(model, sim, feeds) > 20
    # the twin: no sentinel rule, the mask and the masked scores get a grid spanning `lowest`
    off = annotate(model, PER_CHANNEL.replace(supergroups=(), sentinel=0.0))
    assert {"m"} <= _quantized_names(off)
    bad = onnxq.quantize(model, calib, config=PER_CHANNEL.replace(supergroups=(), sentinel=0.0))
    assert _sqnr(model, bad, feeds) < _sqnr(model, sim, feeds) - 10


# -- groups --------------------------------------------------------------------------------------
def test_views_of_a_tensor_are_quantized_but_not_observed_twice():
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8] x) => (float[N,4] y) <float[8,8] w1, int64[2] shape, float[8,4] w2> {
  h = MatMul(x, w1)
  r = Reshape(h, shape)
  y = MatMul(r, w2)
}"""
    plan = annotate(model_from_text(text, shape=np.array([-1, 8], np.int64)),
                    PER_CHANNEL.replace(supergroups=()))
    group = next(g for g in plan.groups if any(v.name == "r" for v in g.quantized))
    assert {v.name for v in group.quantized} == {"h", "r"}
    assert [v.name for v in group.members] == ["h"]


# -- config ----------------------------------------------------------------------------------------
def test_placement_is_configurable_and_checked():
    config = QuantConfig(placement="all", fold_scalar_scales=False, integer_ops=("Conv",))
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="placement 'everywhere'"):
        QuantConfig(placement="everywhere")
    aimet = QuantConfig.from_aimet({"defaults": {"ops": {}, "params": {}}})
    assert aimet.placement == "all"  # AIMET simulates a fixed-point target: every op boundary


def test_an_encodings_file_rebuilds_folded_scales_and_constants(tmp_path):
    arrays = {"half": np.array([0.5], np.float32), "four": np.float32(4.0)}
    model = model_from_text(SCALED.replace("d = Div(m, four)", "e = Div(m, four)\n  d = Add(e, half)"),
                            **arrays)
    sim = onnxq.quantize(model, _calib((2, 3, 8, 8)), config=PER_CHANNEL)
    assert any(g.source for g in sim.plan.groups) and sim.plan.constants
    paths = sim.export(tmp_path, "m")
    again = onnxq.quant.sim.quantize_with_encodings(sim.float_model, paths["encodings"], sim.config)
    feeds = {"x": _calib((2, 3, 8, 8), 1, seed=9)[0]}
    np.testing.assert_array_equal(sim.run(feeds)[0], again.run(feeds)[0])


def test_a_version_1_config_keeps_a_quantizer_at_every_boundary():
    old = {k: v for k, v in QuantConfig().to_dict().items()
           if k not in ("placement", "integer_neighbours", "fold_scalar_scales", "sentinel")}
    old["version"] = 1
    assert QuantConfig.from_dict(old).placement == "all"
    assert QuantConfig.from_dict(QuantConfig().to_dict()).placement == "runtime"
