"""AdaRound: the maths (rectified sigmoid, annealing, gradient) and end-to-end behaviour."""

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

import onnxq
from onnxq.algorithms import AdaRoundConfig, adaround
from onnxq.algorithms._driver import LayerJob
from onnxq.algorithms._layers import Activation
from onnxq.algorithms.adaround import (
    GAMMA, ZETA, _init_v, _Problem, beta_at, reconstruction_loss, rectified_sigmoid, round_layer,
)
from onnxq.quant.config import QuantConfig, QuantSpec
from onnxq.quant.insert_qdq import Encoding
from onnxq.quant.qparams import qrange
from tests.conftest import model_from_text


def test_rectified_sigmoid_bounds_and_inverse():
    v = np.linspace(-20, 20, 1001)
    h = rectified_sigmoid(v)
    assert h.min() == 0.0 and h.max() == 1.0
    assert np.all(np.diff(h) >= 0)
    r = np.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(rectified_sigmoid(_init_v(r)), r, atol=1e-9)
    # h = σ(v)(ζ − γ) + γ inside (0, 1)
    np.testing.assert_allclose(rectified_sigmoid(np.array([0.0])), [0.5 * (ZETA - GAMMA) + GAMMA])


def test_beta_schedule_warm_start_then_cosine_from_20_to_2():
    cfg = AdaRoundConfig(iterations=100, warm_start=0.2)
    assert all(beta_at(i, cfg) is None for i in range(20))
    assert beta_at(20, cfg) == pytest.approx(20.0)
    assert beta_at(60, cfg) == pytest.approx(11.0)
    assert beta_at(99, cfg) == pytest.approx(2.0, abs=0.01)
    betas = [beta_at(i, cfg) for i in range(20, 100)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))


class _L:
    name, op_type = "layer", "Conv"

    def __init__(self, act):
        self.activation = act


def _job(act=Activation("clip", (0.0, 6.0)), shape=(1, 6, 12), rows=600, seed=0, bits=4):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.3
    x = np.abs(rng.standard_normal((rows, shape[0], shape[2]))).astype(np.float32)
    b = rng.standard_normal(shape[0] * shape[1]).astype(np.float32) * 0.1
    y = np.einsum("rgk,gok->rgo", x, w).reshape(rows, -1) + b
    grid = qrange(bits)
    s = np.abs(w).max(axis=2, keepdims=True).astype(np.float64) / grid.qmax
    enc = Encoding("w", "param", bits, True, True, tuple(s.reshape(-1).tolist()),
                   (0,) * s.size, 0)
    return LayerJob(_L(act), w, s, np.zeros_like(s, np.int64), grid, b, x, act(y), enc,
                    np.random.default_rng(seed))


@pytest.mark.parametrize("act", [Activation("identity"), Activation("relu"), Activation("clip", (0.0, 6.0)),
                                 Activation("hard_swish", (1 / 6, 0.5)), Activation("swish")])
def test_gradient_matches_finite_differences(act):
    job = _job(act, shape=(2, 3, 5), rows=50)
    w_s = job.weight.astype(np.float64) / job.scale
    base = np.floor(w_s)
    const = (base * job.scale).astype(np.float32)
    slope = job.scale.astype(np.float32) * np.ones_like(const)
    problem = _Problem(const, slope, job.bias, act, job.weight.shape, reg=0.01)
    v = _init_v(w_s - base).astype(np.float32)
    t = np.asarray(job.target)
    _, grad = problem.loss_and_grad(v, job.inputs, t, beta=8.0)
    v64 = v.astype(np.float64)
    rng = np.random.default_rng(3)
    for _ in range(6):
        idx = tuple(int(rng.integers(n)) for n in v.shape)
        eps = 1e-3
        vp, vm = v64.copy(), v64.copy()
        vp[idx] += eps
        vm[idx] -= eps
        lp, _ = problem.loss_and_grad(vp.astype(np.float32), job.inputs, t, 8.0, with_loss=True)
        lm, _ = problem.loss_and_grad(vm.astype(np.float32), job.inputs, t, 8.0, with_loss=True)
        assert grad[idx] == pytest.approx((lp - lm) / (2 * eps), rel=0.05, abs=2e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaround_beats_nearest_rounding_on_the_layer_loss(seed):
    job = _job(seed=seed)
    nearest = np.clip(np.rint(job.weight / job.scale), job.grid.qmin, job.grid.qmax)
    loss_nearest = reconstruction_loss(job, (nearest * job.scale).astype(np.float32))
    sol = round_layer(job, AdaRoundConfig(iterations=400, batch_rows=128))
    assert "kept" not in sol.info
    loss = reconstruction_loss(job, (sol.codes * job.scale).astype(np.float32))
    assert loss < 0.9 * loss_nearest
    # every code is the floor or the ceiling of w / s
    floor = np.floor(job.weight / job.scale)
    assert np.all((sol.codes == floor) | (sol.codes == floor + 1))


MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,4,4] y) <float[8,3,3,3] w1, float[8] b1, float[8,1,3,3] w2, float[8] b2, float[4,8,1,1] w3, float[4] b3> {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (a)
    d = Conv <group = 8, strides = [2, 2], pads = [1, 1, 1, 1]> (r, w2, b2)
    e = LeakyRelu <alpha = 0.1> (d)
    y = Conv (e, w3, b3)
}"""


def _w4():
    return QuantConfig(weights=QuantSpec(bits=4, symmetric=True, per_channel=True))


def test_adaround_end_to_end_is_deterministic_frozen_and_closer_to_float():
    model = model_from_text(MODEL)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    sim = onnxq.quantize(model, data, _w4())
    cfg = AdaRoundConfig(iterations=300, batch_rows=128, rows_per_layer=1024)
    a = adaround(sim, data, cfg)
    b = adaround(sim, data, cfg)
    wa = {e.name: e for e in a.encodings if e.kind == "param"}
    assert all(wa[n].frozen for n in ("w1", "w2", "w3"))
    for init in a.model.graph.initializers.values():
        other = b.model.graph.initializers[init.name]
        np.testing.assert_array_equal(init.const_value.numpy(), other.const_value.numpy())
    # weights of the float model are exactly on the frozen grid
    w1 = a.float_model.graph.initializers["w1"].const_value.numpy().astype(np.float64)
    s = np.asarray(wa["w1"].scale).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(w1 / s, np.rint(w1 / s), atol=1e-4)
    # closer to float than nearest rounding on held-out data
    test = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    (ref,) = onnxq.runtime.run(sim.float_model, {"x": test})
    err = lambda m: float(np.mean((onnxq.runtime.run(m, {"x": test}, optimize=True)[0] - ref) ** 2))  # noqa: E731
    assert err(a.model) < err(sim.model)


def test_encodings_round_trip_keeps_adarounded_weights(tmp_path):
    model = model_from_text(MODEL)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    sim = adaround(onnxq.quantize(model, data, _w4()), data, iterations=50, rows_per_layer=256)
    files = sim.export(tmp_path)
    from onnxq.quant.encodings import read_encodings

    for key in ("encodings", "encodings_v2"):
        read = read_encodings(files[key])
        assert read["w1"].frozen and read["w3"].frozen
    again = onnxq.quant.sim.quantize_with_encodings(onnxq.load(files["float"]), files["encodings"], _w4())
    for name in ("w1_quantized", "w2_quantized", "w3_quantized"):
        np.testing.assert_array_equal(
            again.model.graph.initializers[name].const_value.numpy(),
            sim.model.graph.initializers[name].const_value.numpy(),
        )


@pytest.mark.parametrize("act", [Activation("identity"), Activation("relu"), Activation("clip", (0.0, 6.0))])
def test_fit_bias_recovers_a_planted_shift(act):
    from onnxq.algorithms.adaround import fit_bias

    job = _job(act, shape=(1, 6, 12), rows=800)
    shift = np.array([0.3, -0.2, 0.05, 0.0, 0.4, -0.1], np.float32)
    y = np.einsum("rgk,gok->rgo", job.inputs, job.weight).reshape(800, -1) + job.bias + shift
    job = dataclasses.replace(job, target=act(y))
    b = fit_bias(job, job.weight)
    np.testing.assert_allclose(b - job.bias, shift, atol=1e-4)


def test_adaround_with_bias_fit_writes_the_same_bias_to_both_models():
    model = model_from_text(MODEL)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    sim = onnxq.quantize(model, data, _w4())
    cfg = AdaRoundConfig(iterations=200, batch_rows=128, rows_per_layer=1024)
    plain = adaround(sim, data, dataclasses.replace(cfg, fit_bias=False))
    fitted = adaround(sim, data, dataclasses.replace(cfg, fit_bias=True))
    b_plain = plain.float_model.graph.initializers["b2"].const_value.numpy()
    b_fit = fitted.float_model.graph.initializers["b2"].const_value.numpy()
    assert not np.allclose(b_plain, b_fit)
    # the QDQ model's int32 bias dequantizes to the float model's bias
    qdq = fitted.model.graph
    conv = next(m for m in qdq if m.op_type == "Conv" and m.attributes.get("group") is not None)
    dq = conv.inputs[2].producer()
    assert dq.op_type == "DequantizeLinear"
    codes = dq.inputs[0].const_value.numpy().astype(np.float64)
    scale = dq.inputs[1].const_value.numpy().astype(np.float64)
    np.testing.assert_allclose(codes * scale, b_fit, atol=float(np.max(scale)))
    test = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    (ref,) = onnxq.runtime.run(sim.float_model, {"x": test})
    err = lambda m: float(np.mean((onnxq.runtime.run(m, {"x": test}, optimize=True)[0] - ref) ** 2))  # noqa: E731
    assert err(fitted.model) < err(sim.model)


def test_adaround_with_4bit_activations_runs():
    """W4A4: the layer inputs come from a model with uint4 activations, which onnxruntime runs
    only unfused (its QLinearConv takes no 4-bit input)."""
    model = model_from_text(MODEL)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    config = QuantConfig(weights=QuantSpec(bits=4, symmetric=True, per_channel=True),
                         activations=QuantSpec(bits=4))
    sim = onnxq.quantize(model, data, config)
    out = adaround(sim, data, iterations=50, rows_per_layer=256)
    assert all(e.frozen for e in out.encodings if e.kind == "param" and e.bits == 4)


@pytest.mark.parametrize("act", [Activation("identity"), Activation("relu"), Activation("clip", (0.0, 6.0))])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fit_gain_recovers_a_planted_gain_and_shift(act, with_bias):
    from onnxq.algorithms.adaround import fit_gain

    job = _job(act, shape=(2, 3, 12), rows=800)
    gain = np.array([1.1, 0.9, 1.0, 1.3, 0.8, 1.05])
    shift = np.array([0.2, -0.1, 0.0, 0.3, -0.2, 0.1]) if with_bias else np.zeros(6)
    y = np.einsum("rgk,gok->rgo", job.inputs, job.weight).reshape(800, -1) * gain + job.bias + shift
    job = dataclasses.replace(job, target=act(y.astype(np.float32)))
    g, b = fit_gain(job, job.weight, with_bias=with_bias)
    np.testing.assert_allclose(g, gain, atol=1e-3)
    np.testing.assert_allclose(b - job.bias, shift, atol=1e-3)
    # a gain outside the bounds is refused: the row keeps its scale and bias
    far = dataclasses.replace(job, target=act((y * 3).astype(np.float32)))
    g, b = fit_gain(far, far.weight, with_bias=False)
    assert np.all((g == 1.0) | ((g >= 0.5) & (g <= 2.0)))


def test_round_layer_with_scale_refit_lowers_the_layer_loss():
    job = _job(Activation("relu"), shape=(1, 6, 12), rows=600)
    cfg = AdaRoundConfig(iterations=300, batch_rows=128, fit_bias=False)
    plain = round_layer(job, cfg)
    refit = round_layer(dataclasses.replace(job, rng=np.random.default_rng(0)),
                        dataclasses.replace(cfg, fit_scale=True))
    np.testing.assert_array_equal(plain.codes, refit.codes)  # the codes stay
    assert plain.scale is None and refit.scale is not None
    assert refit.info["loss_scale"] < plain.info["loss"]
    w_refit = ((refit.codes - job.zero) * refit.scale).astype(np.float32)
    assert reconstruction_loss(job, w_refit) == pytest.approx(refit.info["loss_scale"], abs=1e-6)


def test_adaround_with_scale_refit_keeps_the_qdq_and_float_models_consistent(tmp_path):
    model = model_from_text(MODEL)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    sim = onnxq.quantize(model, data, _w4())
    cfg = AdaRoundConfig(iterations=200, batch_rows=128, rows_per_layer=1024, fit_scale=True)
    out = adaround(sim, data, cfg)
    before = {e.name: e for e in sim.encodings if e.kind == "param"}
    after = {e.name: e for e in out.encodings if e.kind == "param"}
    changed = [n for n in ("w1", "w2", "w3") if after[n].scale != before[n].scale]
    assert changed and all(after[n].frozen for n in changed)
    for name in changed:  # the QDQ weight dequantizes to the float model's weight
        dq = next(n for n in out.model.graph if n.op_type == "DequantizeLinear"
                  and n.outputs[0].name.startswith(name))
        codes = dq.inputs[0].const_value.numpy().astype(np.float64)
        scale = dq.inputs[1].const_value.numpy().astype(np.float64).reshape(-1, *[1] * (codes.ndim - 1))
        np.testing.assert_allclose(scale.reshape(-1), after[name].scale, rtol=1e-6)
        np.testing.assert_allclose(codes * scale, out.float_model.graph.initializers[name].const_value.numpy(),
                                   atol=1e-6)
    # the encodings file rebuilds the same model
    out.export(tmp_path)
    again = onnxq.quant.sim.quantize_with_encodings(out.float_model, next(tmp_path.glob("*.encodings.json")), _w4())
    test = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(onnxq.runtime.run(again.model, {"x": test})[0],
                               onnxq.runtime.run(out.model, {"x": test})[0], atol=1e-5)


def _empty_job(sim, weight: str, rng):
    """(layer, a LayerJob without rows) for the layer of ``weight`` in ``sim``: enough for
    _WorkingModel.update, which reads only the layer, its grid and its bias."""
    from onnxq.algorithms._driver import _rows_of
    from onnxq.algorithms._layers import find_layers

    layer = next(la for la in find_layers(sim.fp32_model)[0] if la.weight_layer.weight.name == weight)
    enc = next(e for e in sim.encodings if e.name == weight)
    w = layer.weight_matrix()
    scale, zero = _rows_of(enc, layer, w.shape)
    return layer, LayerJob(layer, w, scale, zero, enc.grid(), layer.bias(), np.zeros((1, 1, w.shape[2]), np.float32),
                           np.zeros((1, w.shape[0] * w.shape[1]), np.float32), enc, rng)


def test_a_new_scale_and_bias_reach_a_float_bias_of_the_working_model():
    """The model that feeds later layers gets a layer's refitted bias with its refitted scale, also
    where the bias is not quantized (it was dropped there, and the later layers compensated)."""
    from onnxq.algorithms._driver import Solution, _WorkingModel

    model = model_from_text(MODEL)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    sim = onnxq.quantize(model, data, dataclasses.replace(_w4(), quantize_bias=False))
    work = _WorkingModel(sim, act_quant=True)
    layer, job = _empty_job(sim, "w1", rng)
    scale, zero = job.scale, job.zero
    codes = np.clip(np.rint(job.weight / scale) + zero, job.grid.qmin, job.grid.qmax).astype(np.int64)
    new_bias = layer.bias() + np.arange(8, dtype=np.float32)
    work.update(layer, job, Solution(codes, scale=scale * 1.1, bias=new_bias))
    conv = next(n for n in work.model.graph if n.op_type == "Conv" and n.inputs[2].name == "b1")
    np.testing.assert_allclose(conv.inputs[2].const_value.numpy(), new_bias)
    dq = conv.inputs[1].producer()
    np.testing.assert_allclose(dq.inputs[1].const_value.numpy().reshape(-1), (scale * 1.1).reshape(-1), rtol=1e-6)


def test_adaround_keeps_the_activation_grids_its_layers_were_fitted_to():
    model = model_from_text(MODEL)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    sim = onnxq.quantize(model, data, _w4())
    out = adaround(sim, data, AdaRoundConfig(iterations=100, batch_rows=128, rows_per_layer=1024))
    acts = lambda s: {e.name: (e.scale, e.zero_point) for e in s.encodings if e.kind == "activation"}  # noqa: E731
    assert acts(out) == acts(sim)
    # the float model's biases moved (bias refit), so a recalibration would have moved some grids
    assert not np.allclose(out.float_model.graph.initializers["b2"].const_value.numpy(),
                           sim.float_model.graph.initializers["b2"].const_value.numpy())


def _masked_text(d_in: int, d_out: int) -> str:
    """A token-wise MatMul whose output is zeroed where ``attention_mask`` is 0 (padding)."""
    return f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,L,{d_in}] x, int64[N,L] attention_mask) => (float[N,L,{d_out}] y) <float[{d_in},{d_out}] w> {{
            h = MatMul (x, w)
            m = Cast <to = 1> (attention_mask)
            axes = Constant <value = int64[1] {{-1}}> ()
            m3 = Unsqueeze (m, axes)
            y = Mul (h, m3)
        }}"""


def test_adaround_fits_the_tokens_and_not_the_padding():
    # a text model: padded positions (attention_mask 0) hold large values the output never
    # uses; drawn as layer rows they would dominate the reconstruction loss
    model = model_from_text(_masked_text(16, 8), seed=3)
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((4, 16))

    def batch(n: int) -> dict[str, np.ndarray]:
        lengths = rng.integers(3, 12, n)
        mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
        # the tokens span 4 directions (AdaRound can trade error into the other 12); padding does not
        x = (rng.standard_normal((n, 12, 4)) @ mix + 0.05 * rng.standard_normal((n, 12, 16))).astype(np.float32)
        pad = 10 * rng.standard_normal(16).astype(np.float32)
        x[mask == 0] = pad + rng.standard_normal((int((mask == 0).sum()), 16)).astype(np.float32)
        return {"x": x, "attention_mask": mask}

    data = [batch(16) for _ in range(4)]
    sim = onnxq.quantize(model, data, QuantConfig(weights=QuantSpec(bits=4, symmetric=True, per_channel=True),
                                                  activations=QuantSpec(bits=16)))
    test = batch(64)
    keep = test["attention_mask"] == 1
    (ref,) = onnxq.runtime.run(sim.float_model, test)

    def err(row_mask):
        out = adaround(sim, data, AdaRoundConfig(iterations=300, batch_rows=128, rows_per_layer=512,
                                                 row_mask=row_mask))
        (y,) = onnxq.runtime.run(out.model, test)
        return float(np.mean((y[keep] - ref[keep]) ** 2))

    assert err("auto") < 0.5 * err(None)


def test_a_weights_only_fit_samples_every_position(monkeypatch):
    # act_quant=False recalibrates the activation grids on every position afterwards: the
    # padding must be fitted too, so "auto" finds no mask there (a named mask is still used)
    import onnxq.algorithms._driver as driver

    model = model_from_text(_masked_text(8, 4), seed=2)
    rng = np.random.default_rng(0)
    mask = np.ones((4, 6), np.int64)
    mask[:, 4:] = 0
    data = [{"x": rng.standard_normal((4, 6, 8)).astype(np.float32), "attention_mask": mask}]
    sim = onnxq.quantize(model, data, _w4())
    seen = []
    real = driver.capture_targets
    monkeypatch.setattr(driver, "capture_targets",
                        lambda *a, row_mask=None, **k: (seen.append(row_mask), real(*a, row_mask=row_mask, **k))[1])
    for act_quant, setting in ((True, "auto"), (False, "auto"), (False, "attention_mask")):
        adaround(sim, data, AdaRoundConfig(iterations=20, act_quant=act_quant, row_mask=setting))
    assert seen == ["attention_mask", None, "attention_mask"]


def test_an_input_target_ignores_the_float_models_outputs():
    # target="input": the layer reconstructs its float weights on its own input rows, whatever
    # the FP32 model's outputs (here replaced by noise) say
    job = _job(seed=3)
    ideal = dataclasses.replace(job, target=job.layer.activation(
        np.einsum("rgk,gok->rgo", job.inputs, job.weight).reshape(len(job.inputs), -1) + job.bias))
    noisy = dataclasses.replace(job, target=np.random.default_rng(9).standard_normal(job.target.shape)
                                .astype(np.float32), rng=np.random.default_rng(3))
    cfg = AdaRoundConfig(iterations=200, batch_rows=128)
    a = round_layer(dataclasses.replace(ideal, rng=np.random.default_rng(3)), cfg)
    b = round_layer(noisy, dataclasses.replace(cfg, target="input"))
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(round_layer(dataclasses.replace(noisy, rng=np.random.default_rng(3)), cfg).codes, a.codes)
    with pytest.raises(onnxq.errors.ConfigError, match="target"):
        AdaRoundConfig(target="output")


def _dequantized_weights(model) -> dict[str, np.ndarray]:
    """{weight name: its DequantizeLinear's value} of every constant-input DQ (axis as given)."""
    out = {}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.inputs[0].const_value is None:
            continue
        q = node.inputs[0].const_value.numpy().astype(np.float64)
        s = node.inputs[1].const_value.numpy().astype(np.float64)
        z = node.inputs[2].const_value.numpy().astype(np.float64) if len(node.inputs) > 2 else 0.0
        if np.ndim(s) == 1 and s.size > 1:
            axis = next((a.value for a in node.attributes.values() if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = s.size
            s, z = s.reshape(shape), np.reshape(z, shape)
        out[node.outputs[0].name] = (q - z) * s
    return out


def test_asymmetric_4bit_codes_are_centred_int8_in_the_working_model():
    """uint4 codes with per-channel zero points run in the working model as int8 ``q − z`` with
    zero point 0 (onnxruntime's integer kernels are slow with weight zero points): the same
    dequantized weights, before and after a layer is replaced; the exported model keeps uint4."""
    from onnxq.algorithms._driver import Solution, _WorkingModel

    model = model_from_text(MODEL)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    cfg = dataclasses.replace(_w4(), weights=dataclasses.replace(_w4().weights, symmetric=False))
    sim = onnxq.quantize(model, data, cfg)
    zeros = [n.inputs[2].const_value for n in sim.model.graph if n.op_type == "DequantizeLinear"
             and n.inputs[0].const_value is not None and n.inputs[0].const_value.dtype == ir.DataType.UINT4]
    assert zeros and any(np.any(z.numpy()) for z in zeros)  # the premise: real zero points
    work = _WorkingModel(sim, act_quant=True)
    before, now = _dequantized_weights(sim.model), _dequantized_weights(work.model)
    assert before.keys() == now.keys()
    for name in before:
        np.testing.assert_array_equal(now[name], before[name])
    for node in work.model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None \
                and node.inputs[0].const_value.dtype != ir.DataType.INT32:
            assert node.inputs[0].const_value.dtype == ir.DataType.INT8
            assert not np.any(node.inputs[2].const_value.numpy())
    # a layer's new codes are centred on its zero points too
    layer, job = _empty_job(sim, "w2", rng)
    scale, zero = job.scale, job.zero
    codes = np.clip(np.floor(job.weight / scale) + zero, job.grid.qmin, job.grid.qmax).astype(np.int64)
    work.update(layer, job, Solution(codes))
    got = next(v for k, v in _dequantized_weights(work.model).items() if k.startswith("w2"))
    want = layer.weight_layer.to_native(((codes - zero) * scale).reshape(layer.weight_layer.canonical_shape))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # the whole algorithm: its exported model keeps uint4 and agrees with the float weights
    out = adaround(sim, data, AdaRoundConfig(iterations=50, batch_rows=64, rows_per_layer=256))
    assert any(n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
               and n.inputs[0].const_value.dtype == ir.DataType.UINT4 for n in out.model.graph)
    checked = 0
    for name, value in _dequantized_weights(out.model).items():
        base = name.split("_")[0]
        if base in ("w1", "w2", "w3"):
            np.testing.assert_allclose(value, out.float_model.graph.initializers[base].const_value.numpy(),
                                       rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 3
