"""Bias correction: planted mean shift removed; analytic E[x] against Monte Carlo."""

import numpy as np
import pytest

import onnxq
from onnxq.algorithms import bias_correction
from onnxq.algorithms.bias_correction import clipped_normal_mean
from onnxq.quant.config import QuantConfig, QuantSpec
from onnxq.runtime import run
from tests.conftest import model_from_text


@pytest.mark.parametrize("bounds", [(None, None), (0.0, None), (0.0, 6.0), (-1.0, 0.5)])
def test_clipped_normal_mean_matches_monte_carlo(bounds):
    rng = np.random.default_rng(0)
    mu = np.array([-2.0, 0.0, 0.7, 3.0, 5.5])
    sigma = np.array([1.0, 0.5, 2.0, 1.5, 3.0])
    z = rng.standard_normal((400_000, 1)) * sigma + mu
    lo, hi = bounds
    mc = np.clip(z, -np.inf if lo is None else lo, np.inf if hi is None else hi).mean(axis=0)
    np.testing.assert_allclose(clipped_normal_mean(mu, sigma, lo, hi), mc, atol=0.01)


CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,6,6] x) => (float[N,5,6,6] y) <float[5,4,3,3] w, float[5] b> {
    y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
}"""


def _shifted_model():
    # every weight sits at 0.4 of a grid step above a code: nearest rounding drops 0.4·s from
    # each, a systematic shift of the output mean since the inputs are positive
    rng = np.random.default_rng(0)
    step = 0.05
    codes = rng.integers(-6, 6, size=(5, 4, 3, 3))
    w = (codes + 0.4) * step
    w[0, 0, 0, 0] = 7 * step  # pins the 4-bit per-tensor grid at exactly `step`
    return model_from_text(CONV, w=w.astype(np.float32), b=np.zeros(5, np.float32))


def test_empirical_bias_correction_removes_a_planted_mean_shift():
    model = _shifted_model()
    rng = np.random.default_rng(1)
    data = [np.abs(rng.standard_normal((8, 4, 6, 6))).astype(np.float32) + 0.5 for _ in range(4)]
    config = QuantConfig(weights=QuantSpec(bits=4, symmetric=True), activations=QuantSpec(bits=16))
    sim = onnxq.quantize(model, data, config)
    fixed = bias_correction(sim, data, mode="empirical")
    feeds = {"x": np.concatenate(data)}
    (ref,) = run(sim.float_model, feeds)
    shift = lambda m: (run(m, feeds)[0] - ref).mean(axis=(0, 2, 3))  # noqa: E731
    before, after = shift(sim.model), shift(fixed.model)
    assert np.all(np.abs(before) > 0.05)  # the plant is real
    assert np.max(np.abs(after)) < 1e-3 * np.max(np.abs(before)) + 1e-4
    # the float model carries the corrected bias too
    b = fixed.float_model.graph.initializers["b"].const_value.numpy()
    np.testing.assert_allclose(b, -before, rtol=0.02, atol=1e-4)


CONV_VALID = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,6,6] x) => (float[N,5,4,4] y) <float[5,4,3,3] w, float[5] b> {
    y = Conv (x, w, b)
}"""


def test_measured_bias_correction_removes_a_planted_mean_shift_in_one_pass():
    """Without padding Σ(W_q − W)·E[x] is the exact output shift: the measured-mean correction
    removes it as completely as the empirical one, from one float pass."""
    w = _shifted_model().graph.initializers["w"].const_value.numpy()
    model = model_from_text(CONV_VALID, w=w, b=np.zeros(5, np.float32))
    rng = np.random.default_rng(1)
    # channel means differ (0.5 .. 2): a wrong E[x] would leave a shift
    data = [(np.abs(rng.standard_normal((8, 4, 6, 6))) * np.array([0.5, 1, 1.5, 2])[:, None, None])
            .astype(np.float32) for _ in range(4)]
    config = QuantConfig(weights=QuantSpec(bits=4, symmetric=True), activations=QuantSpec(bits=16))
    sim = onnxq.quantize(model, data, config)
    measured = bias_correction(sim, data, mode="measured")
    empirical = bias_correction(sim, data, mode="empirical")
    feeds = {"x": np.concatenate(data)}
    (ref,) = run(sim.float_model, feeds)
    shift = lambda m: (run(m, feeds)[0] - ref).mean(axis=(0, 2, 3))  # noqa: E731
    before = shift(sim.model)
    assert np.all(np.abs(before) > 0.05)
    assert np.max(np.abs(shift(measured.model))) < 1e-3 * np.max(np.abs(before)) + 1e-4
    b = lambda s: s.float_model.graph.initializers["b"].const_value.numpy()  # noqa: E731
    np.testing.assert_allclose(b(measured), b(empirical), rtol=1e-3, atol=1e-4)
    with pytest.raises(onnxq.errors.ConfigError, match="needs calibration data"):
        bias_correction(sim, mode="measured")


CONV_BN_RELU_CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[6,3,3,3] w1, float[6] gamma, float[6] beta, float[6] mean, float[6] var, float[4,6,1,1] w2, float[4] b2> {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    n = BatchNormalization (a, gamma, beta, mean, var)
    r = Relu (n)
    y = Conv (r, w2, b2)
}"""


def test_analytic_bias_correction_uses_folded_batchnorm_statistics():
    model = model_from_text(CONV_BN_RELU_CONV)
    rng = np.random.default_rng(2)
    data = [rng.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    config = QuantConfig(weights=QuantSpec(bits=4, symmetric=True))
    sim = onnxq.quantize(model, data, config, passes=["fold-bn"])
    fixed = bias_correction(sim, mode="analytic")
    b_before = sim.float_model.graph.initializers["b2"].const_value.numpy()
    b_after = fixed.float_model.graph.initializers["b2"].const_value.numpy()
    assert not np.allclose(b_before, b_after)  # the second conv was corrected
    # activations keep their encodings without data
    acts = lambda s: {e.name: e.scale for e in s.encodings if e.kind == "activation"}  # noqa: E731
    assert acts(fixed) == acts(sim)


def test_empirical_mode_without_data_is_a_clear_error():
    model = _shifted_model()
    rng = np.random.default_rng(1)
    data = [rng.standard_normal((2, 4, 6, 6)).astype(np.float32)]
    sim = onnxq.quantize(model, data)
    with pytest.raises(onnxq.errors.ConfigError, match="needs calibration data"):
        bias_correction(sim, mode="empirical")


def test_analytic_input_mean_walks_cle_clips_pads_residual_adds_and_pooling():
    """E[x] through ``Relu → Min(·, c_ch)`` (CLE's ReLU6), a zero Pad, a residual Add (sum of the
    branch means), and GlobalAveragePool → Flatten before a Gemm; Monte Carlo on the Gaussians
    that BN statistics describe. A clip after an Add is refused with a reason."""
    from onnxq.algorithms._layers import find_layers
    from onnxq.algorithms.bias_correction import _input_mean
    from onnxq.passes._graph import BN_STATS_KEY

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,4,8,8] d, float[N,4,8,8] f, float[N,5] y, float[N,4,8,8] k) <float[4,3,1,1] w1, float[4] b1, float[4,1,1] c, int64[8] pads, float[4,1,3,3] w2, float[4] b2, float[4,3,1,1] w3, float[4] b3, float[4,4,1,1] w4, float[4] b4, float[4,5] wfc, float[5] bfc, float[4,4,1,1] w5, float[4] b5> {
        a = Conv (x, w1, b1)
        r = Relu (a)
        m = Min (r, c)
        p = Pad (m, pads)
        d = Conv <group = 4> (p, w2, b2)
        e = Conv (x, w3, b3)
        s = Add (a, e)
        f = Conv (s, w4, b4)
        gp = GlobalAveragePool (m)
        h = Flatten (gp)
        y = Gemm (h, wfc, bfc)
        rs = Relu (s)
        k = Conv (rs, w5, b5)
    }"""
    rng = np.random.default_rng(0)
    cvec = np.array([6.0, 1.5, 3.0, 0.7], np.float32)
    model = model_from_text(text, c=cvec.reshape(4, 1, 1), pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    beta1, gamma1 = np.array([1.0, -0.5, 2.0, 0.3]), np.array([2.0, 1.0, 0.5, 1.5])
    beta3, gamma3 = np.array([0.2, 0.1, -1.0, 4.0]), np.array([1.0, 1.0, 1.0, 1.0])
    convs = {n.outputs[0].name: n for n in model.graph if n.op_type == "Conv"}
    convs["a"].meta[BN_STATS_KEY] = {"gamma": gamma1, "beta": beta1}
    convs["e"].meta[BN_STATS_KEY] = {"gamma": gamma3, "beta": beta3}
    layers = {layer.output.name: layer for layer in find_layers(model)[0]}
    by_output = {id(layer.output): layer for layer in layers.values()}
    z = rng.standard_normal((400_000, 4)) * gamma1 + beta1
    clipped = np.minimum(np.maximum(z, 0), cvec).mean(axis=0)
    np.testing.assert_allclose(_input_mean(layers["d"], by_output), clipped, atol=0.01)
    np.testing.assert_allclose(_input_mean(layers["y"], by_output), clipped, atol=0.01)
    np.testing.assert_allclose(_input_mean(layers["f"], by_output), beta1 + beta3, atol=1e-9)
    reason = _input_mean(layers["k"], by_output)
    assert isinstance(reason, str) and "clip after the Add" in reason


def test_dfq_preset_ends_with_measured_bias_correction_unless_turned_off():
    """quantize(passes="dfq") corrects biases from input means measured on its data by default."""
    model = model_from_text(CONV_BN_RELU_CONV)
    rng = np.random.default_rng(2)
    data = [rng.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    config = QuantConfig(weights=QuantSpec(bits=4, symmetric=True))
    bias = lambda s: next(i.const_value.numpy() for i in s.float_model.graph.initializers.values()  # noqa: E731
                          if i.const_value is not None and i.const_value.numpy().shape == (4,))
    default = onnxq.quantize(model, data, config, passes="dfq")
    off = onnxq.quantize(model, data, config, passes="dfq", bias_correction=False)
    explicit = bias_correction(off, data, mode="measured")
    assert not np.allclose(bias(default), bias(off))
    np.testing.assert_allclose(bias(default), bias(explicit), rtol=1e-6)
