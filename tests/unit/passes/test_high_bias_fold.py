"""HighBiasFold: exact where every input lies above the absorbed bias; skipped with reasons."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import model_from_text, random_feeds

from onnxq.passes._graph import BN_STATS_KEY
from onnxq.passes.high_bias_fold import HighBiasFold

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def build(act: str, seed: int = 0):
    text = HEADER + f"""
g (float[N,4,6,6] x) => (float[N,5,6,6] y)
  <float[6,4,3,3] w1, float[6] b1, float[5,6,1,1] w2, float[5] b2, float lo, float hi> {{
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  {act}
  y = Conv(c, w2, b2)
}}"""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((6, 4, 3, 3)) * 0.01).astype(np.float32)  # a ≈ b1: tiny spread
    b1 = np.array([4.0, 0.5, 3.0, -1.0, 2.0, 5.0], np.float32)
    model = model_from_text(text, w1=w1, b1=b1, lo=np.float32(0), hi=np.float32(6))
    conv = next(n for n in model.graph if n.op_type == "Conv")
    gamma = np.full(6, 0.1)
    conv.meta[BN_STATS_KEY] = {"gamma": gamma, "beta": b1.astype(np.float64)}
    return model


@pytest.mark.parametrize(
    "act", ["c = Relu(a)", "c = Clip(a, lo, hi)", "r = Relu(a)\n  c = Min(r, hi)", "c = Identity(a)"]
)
def test_absorbs_and_stays_exact_above_the_bias(act, assert_equivalent):
    ref, model = build(act), build(act)
    hbf = HighBiasFold()
    assert hbf(model).modified
    assert hbf.report.changed == 1
    b1 = model.graph.initializers["b1"].const_value.numpy()
    expected_h = np.maximum(0, np.array([4.0, 0.5, 3.0, -1.0, 2.0, 5.0]) - 0.4)  # k = 4 sigmas of 0.1
    if "Identity" in act:
        expected_h = np.array([4.0, 0.5, 3.0, -1.0, 2.0, 5.0])
    np.testing.assert_allclose(b1, [4.0, 0.5, 3.0, -1.0, 2.0, 5.0] - expected_h, atol=1e-6)
    feeds = random_feeds(ref)
    assert_equivalent(ref, model, feeds, tol=1e-5)
    if "hi" in act:
        mins = [n for n in model.graph if n.op_type == "Min"]
        bound = mins[0].inputs[1].const_value.numpy().reshape(-1)
        np.testing.assert_allclose(bound, 6.0 - expected_h, atol=1e-6)
    # BN statistics now describe the shifted output
    conv = next(n for n in model.graph if n.op_type == "Conv")
    np.testing.assert_allclose(conv.meta[BN_STATS_KEY]["beta"], [4.0, 0.5, 3.0, -1.0, 2.0, 5.0] - expected_h)


def test_approximate_when_inputs_fall_below():
    """With wide pre-activations the fold changes outputs a little, by design."""
    from conftest import max_rel_diff

    ref, model = build("c = Relu(a)"), build("c = Relu(a)")
    for m in (ref, model):  # widen layer 1 so some inputs fall below h
        w = m.graph.initializers["w1"]
        w.const_value = ir.Tensor(w.const_value.numpy() * 100, name="w1")
    HighBiasFold()(model)
    diff = max_rel_diff(ref, model, random_feeds(ref))
    assert 0 < diff < 0.5


def test_without_bn_statistics_nothing_happens():
    model = build("c = Relu(a)")
    for node in model.graph:
        node.meta.pop(BN_STATS_KEY, None)
    hbf = HighBiasFold()
    assert not hbf(model).modified
    assert any("fold-bn" in r for _, r in hbf.report.skipped)


@pytest.mark.parametrize("act", ["c = LeakyRelu<alpha=0.1>(a)", "c = Clip(a, hi, hi)"])
def test_links_it_cannot_cross(act):
    model = build(act)
    b1 = model.graph.initializers["b1"].const_value.numpy().copy()
    hbf = HighBiasFold()
    assert not hbf(model).modified
    assert hbf.report.skipped
    np.testing.assert_array_equal(model.graph.initializers["b1"].const_value.numpy(), b1)


def test_zero_padding_in_layer_two_is_skipped_unless_asked():
    text = HEADER + """
g (float[N,4,6,6] x) => (float[N,5,6,6] y)
  <float[6,4,3,3] w1, float[6] b1, float[5,6,3,3] w2, float[5] b2> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  c = Relu(a)
  y = Conv<pads=[1,1,1,1]>(c, w2, b2)
}"""
    def make():
        model = model_from_text(text, b1=np.full(6, 4.0, np.float32))
        conv = next(n for n in model.graph if n.op_type == "Conv")
        conv.meta[BN_STATS_KEY] = {"gamma": np.full(6, 0.1), "beta": np.full(6, 4.0)}
        return model

    hbf = HighBiasFold()
    assert not hbf(make()).modified
    assert any("pads its input" in r for _, r in hbf.report.skipped)
    assert HighBiasFold(padded=True)(make()).modified
