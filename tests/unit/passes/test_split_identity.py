"""SplitIdentity: a dominant diagonal (a folded identity branch) leaves the conv as Mul + Add.

Structure, numerical equivalence under onnxruntime (optimizations off), per-tensor quantization
gains, and twins where the rule must not fire (grouped, strided, non-square, shape-changing
padding, no dominant diagonal, a shared weight).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import model_from_text, random_feeds

import onnxq
from onnxq.passes.cleanup import Cleanup
from onnxq.passes.pipelines import PRESETS
from onnxq.passes.split_identity import SplitIdentity
from onnxq.runtime import run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def _weight(c: int, k: int = 1, cin: int | None = None, identity: float = 20.0, seed: int = 0,
            channels=(0, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((c, cin or c, k, k)) * 0.3).astype(np.float32)
    for i in channels:  # a re-parameterized identity branch on a few channels
        w[i, i, k // 2, k // 2] += identity
    return w


def _conv_model(w: np.ndarray, attrs: str = "", act: str = "y = Relu(h)") -> ir.Model:
    cout, cin, k, _ = w.shape
    text = HEADER + f"""
g (float[N,{cin},8,8] x) => (float[N,{cout},?,?] y) <float[{cout},{cin},{k},{k}] w, float[{cout}] b> {{
  h = Conv{attrs}(x, w, b)
  {act}
}}"""
    return model_from_text(text, w=w)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("k, attrs", [(1, ""), (3, "<pads=[1,1,1,1]>"),
                                      (3, "<pads=[2,2,2,2], dilations=[2,2]>"),
                                      (3, '<auto_pad="SAME_UPPER">')])
def test_identity_is_split_off_exactly(k, attrs, assert_equivalent):
    w = _weight(8, k)
    ref, model = _conv_model(w, attrs), _conv_model(w, attrs)
    p = SplitIdentity()
    assert p(model).modified and p.report.changed == 1
    assert _ops(model) == ["Conv", "Mul", "Add", "Relu"]
    conv, mul, add, relu = list(model.graph)
    new_w = conv.inputs[1].const_value.numpy()
    d = mul.inputs[1].const_value.numpy().reshape(-1)
    assert np.flatnonzero(d).tolist() == [0, 3]
    np.testing.assert_array_equal(d[[0, 3]], w[[0, 3], [0, 3], k // 2, k // 2])
    assert new_w[0, 0, k // 2, k // 2] == 0 and np.abs(new_w).max() < 2  # range 20 → ~1
    assert mul.inputs[0] is model.graph.inputs[0] and relu.inputs[0] is add.outputs[0]
    assert add.outputs[0].name == "h" and conv.outputs[0].name == "h_conv"
    assert_equivalent(ref, model)


def test_identity_at_a_graph_output(assert_equivalent):
    w = _weight(6)
    text = HEADER + """
g (float[N,6,8,8] x) => (float[N,6,8,8] h) <float[6,6,1,1] w, float[6] b> {
  h = Conv(x, w, b)
}"""
    ref, model = model_from_text(text, w=w), model_from_text(text, w=w)
    assert SplitIdentity()(model).modified
    assert model.graph.outputs[0].name == "h" and model.graph.outputs[0].producer().op_type == "Add"
    assert_equivalent(ref, model)


def test_per_tensor_quantization_gains():
    """The point of the pass: per-tensor int8 weights keep the off-diagonal entries (16-bit
    activations, so that the weights' error shows)."""
    w = _weight(16, identity=30.0, channels=(2,))
    model = _conv_model(w, act="y = Identity(h)")
    split = _conv_model(w, act="y = Identity(h)")
    SplitIdentity()(split)
    rng = np.random.default_rng(5)
    calib = [rng.standard_normal((4, 16, 8, 8)).astype(np.float32) for _ in range(4)]
    feeds = {"x": rng.standard_normal((4, 16, 8, 8)).astype(np.float32)}
    ref = run(model, feeds)[0].astype(np.float64)

    others = [c for c in range(16) if c != 2]  # the channels that the identity does not drown

    def sqnr(m):
        config = onnxq.QuantConfig(activations=onnxq.QuantSpec(bits=16))
        out = onnxq.quantize(m, calib, config=config).run(feeds)[0][:, others]
        r = ref[:, others]
        return 10 * np.log10(np.sum(r**2) / np.sum((r - out) ** 2))

    assert sqnr(split) > sqnr(model) + 15


def test_in_the_dfq_preset():
    assert PRESETS["dfq"][-1] == "split-identity"
    model = _conv_model(_weight(8))
    out = onnxq.optimize(model, passes="dfq")
    assert "Mul" in _ops(out) and "Add" in _ops(out)


# -- twins -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("w, attrs, reason", [
    (_weight(8, 3), "", "padding changes the spatial shape"),
    (_weight(8, 3), "<pads=[1,1,1,1], strides=[2,2]>", "strided"),
    (_weight(8, 1, cin=6, channels=(0,)), "", "not square"),
    (_weight(8, 1, identity=0.0), "", "no dominant identity"),
    (_weight(8, 1, identity=0.8), "", "gain below 2"),
])
def test_not_split(w, attrs, reason):
    model = _conv_model(w, attrs)
    before = _ops(model)
    p = SplitIdentity()
    assert not p(model).modified
    assert _ops(model) == before
    assert any(reason in r for _, r in p.report.skipped), p.report.skipped


def test_grouped_and_shared_weights_are_skipped():
    text = HEADER + """
g (float[N,8,8,8] x) => (float[N,8,8,8] y) <float[8,4,1,1] wg, float[8,8,1,1] w> {
  a = Conv<group=2>(x, wg)
  b = Conv(a, w)
  y = Conv(b, w)
}"""
    model = model_from_text(text, wg=np.ones((8, 4, 1, 1)), w=_weight(8))
    p = SplitIdentity()
    assert not p(model).modified
    reasons = [r for _, r in p.report.skipped]
    assert "grouped convolution" in reasons and sum("shared" in r for r in reasons) == 2


def test_even_kernel_and_min_gain_option():
    w = np.zeros((4, 4, 2, 2), np.float32)
    p = SplitIdentity()
    assert not p(_conv_model(w, "<pads=[0,0,1,1]>")).modified
    assert "even kernel" in p.report.skipped[0][1]
    with pytest.raises(ValueError):
        SplitIdentity(min_gain=0.5)
    assert SplitIdentity(min_gain=1.0)(_conv_model(_weight(8, 1, identity=0.8))).modified


def test_cleanup_after_split_keeps_the_graph_valid():
    model = _conv_model(_weight(8))
    SplitIdentity()(model)
    Cleanup()(model)
    out = run(model, random_feeds(model))
    assert out[0].shape == (2, 8, 8, 8)


def test_split_conv_no_longer_carries_the_folded_bn_statistics():
    """The folded BN's N(β, γ²) describes the sum conv + identity, not the conv alone: the
    statistics leave the conv so that analytic bias correction does not misread them."""
    from onnxq.passes._graph import BN_STATS_KEY

    model = _conv_model(_weight(8))
    conv = next(iter(model.graph))
    conv.meta[BN_STATS_KEY] = {"gamma": np.ones(8), "beta": np.zeros(8)}
    assert SplitIdentity()(model).modified
    assert BN_STATS_KEY not in conv.meta
