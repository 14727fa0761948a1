"""CrossLayerEqualization: structure, exactness under onnxruntime, ranges equalized, negatives."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import model_from_text, random_feeds
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.passes._chains import channel_range_in, channel_range_out, find_pair
from onnxq.passes._layers import as_layer
from onnxq.passes.cleanup import Cleanup
from onnxq.passes.cross_layer_equalization import CrossLayerEqualization

HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>\n'


def skewed(shape, seed=0, lo=0.01, hi=20.0):
    """Weights whose output channels have very different ranges (what CLE is for)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    scale = np.exp(rng.uniform(np.log(lo), np.log(hi), (shape[0],) + (1,) * (len(shape) - 1)))
    return (w * scale).astype(np.float32)


def feeds_for(model, scale=3.0):
    feeds = random_feeds(model)
    return {k: v * scale for k, v in feeds.items()}


def spreads(model):
    out = []
    for node in model.graph:
        layer = as_layer(node)
        if not isinstance(layer, str):
            r = channel_range_out(layer.canonical())
            out.append(float(r.max() / np.median(r)))
    return out


RELU6_TRIPLET = HEADER.format(opset=17) + """
g (float[N,3,8,8] x) => (float[N,10] y)
  <float[8,3,3,3] w1, float[8] b1, float[8,1,3,3] w2, float[8] b2, float[16,8,1,1] w3,
   float[16] b3, float[10,16] wg, float[10] bg, float lo, float hi> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  a2 = Clip(a, lo, hi)
  c = Conv<pads=[1,1,1,1], group=8>(a2, w2, b2)
  c2 = Clip(c, lo, hi)
  d = Conv(c2, w3, b3)
  d2 = Relu(d)
  e = GlobalAveragePool(d2)
  f = Flatten(e)
  y = Gemm<transB=1>(f, wg, bg)
}"""


def relu6_model():
    return model_from_text(
        RELU6_TRIPLET, w1=skewed((8, 3, 3, 3)), w2=skewed((8, 1, 3, 3), 1),
        lo=np.float32(0), hi=np.float32(6),
    )


def test_relu6_triplet_is_exact_and_equalized(assert_equivalent):
    ref, model = relu6_model(), relu6_model()
    cle = CrossLayerEqualization()
    result = cle(model)
    assert result.modified
    assert cle.report.changed == 3  # conv→dw, dw→conv, conv→gemm (through GAP+Flatten)
    ops = [n.op_type for n in model.graph]
    assert "Clip" not in ops and ops.count("Min") == 2  # ReLU6 crossed as Relu + per-channel Min
    mins = [n for n in model.graph if n.op_type == "Min"]
    assert all(n.inputs[1].const_value.shape == (8, 1, 1) for n in mins)
    assert_equivalent(ref, model, feeds_for(ref))
    # every pair now has equal per-channel ranges on both sides
    for node in model.graph:
        layer = as_layer(node)
        if isinstance(layer, str):
            continue
        pair = find_pair(layer)
        if isinstance(pair, str):
            continue
        r1 = channel_range_out(pair.first.canonical())
        r2 = channel_range_in(pair.second, pair.second.canonical(), pair.repeat)
        np.testing.assert_allclose(r1, r2, rtol=1e-3)
    assert max(spreads(model)[:2]) < max(spreads(ref)[:2])


def test_second_run_changes_nothing():
    model = relu6_model()
    CrossLayerEqualization()(model)
    again = CrossLayerEqualization()
    assert not again(model).modified
    assert again.report.changed == 0


def test_triplet_matches_closed_form():
    model = relu6_model()
    layers = [as_layer(n) for n in model.graph if n.op_type == "Conv"]
    r1 = channel_range_out(layers[0].canonical())
    r2 = channel_range_out(layers[1].canonical())
    r3 = channel_range_in(layers[2], layers[2].canonical())
    # the Gemm pair moves r3 too; compare conv ranges to the 3-layer fixed point only loosely:
    CrossLayerEqualization(max_iterations=500, tolerance=1e-9)(model)
    after = [as_layer(n) for n in model.graph if n.op_type == "Conv"]
    a1 = channel_range_out(after[0].canonical())
    a2 = channel_range_out(after[1].canonical())
    np.testing.assert_allclose(a1, a2, rtol=1e-6)  # layer 1 and the depthwise agree exactly
    assert np.all(a1 > 0) and r1.shape == r2.shape == r3.shape


@pytest.mark.parametrize("opset", [6, 10, 13])
def test_clip_attribute_and_input_forms(opset, assert_equivalent):
    clip = "Clip<min=0.0, max=6.0>(a)" if opset < 11 else "Clip(a, lo, hi)"
    extra = "" if opset < 11 else ", float lo, float hi"
    text = HEADER.format(opset=opset) + f"""
g (float[N,4,6,6] x) => (float[N,5,6,6] y) <float[6,4,3,3] w1, float[6] b1, float[5,6,1,1] w2, float[5] b2{extra}> {{
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  c = {clip}
  y = Conv(c, w2, b2)
}}"""
    kw = {} if opset < 11 else {"lo": np.float32(0), "hi": np.float32(6)}
    ref = model_from_text(text, w1=skewed((6, 4, 3, 3)), **kw)
    model = model_from_text(text, w1=skewed((6, 4, 3, 3)), **kw)
    cle = CrossLayerEqualization()
    # opset < 8: Min/Max do not broadcast, so a per-channel bound cannot be written
    assert cle(model).modified == (opset >= 8), cle.report
    assert_equivalent(ref, model, feeds_for(ref))


@pytest.mark.parametrize(
    "link",
    [
        "c = LeakyRelu<alpha=0.1>(a)",
        "c = PRelu(a, slope)",
        "c = MaxPool<kernel_shape=[2,2]>(a)",
        "c = AveragePool<kernel_shape=[3,3], pads=[1,1,1,1]>(a)",
        "c = Pad<mode=\"reflect\">(a, pads)",
        "r = Relu(a)\n  c = Min(r, six)",
    ],
)
def test_commuting_links(link, assert_equivalent):
    text = HEADER.format(opset=17) + f"""
g (float[N,4,6,6] x) => (float[N,5,H,W] y)
  <float[6,4,3,3] w1, float[6] b1, float[5,6,3,3] w2, float[5] b2, float[6,1,1] slope,
   int64[8] pads, float six> {{
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  {link}
  y = Conv(c, w2, b2)
}}"""
    kw = dict(w1=skewed((6, 4, 3, 3)), pads=np.array([0, 0, 1, 1, 0, 0, 1, 1]),
              six=np.float32(6), slope=np.abs(np.random.default_rng(3).standard_normal((6, 1, 1))))
    ref, model = model_from_text(text, **kw), model_from_text(text, **kw)
    cle = CrossLayerEqualization()
    assert cle(model).modified, cle.report
    assert_equivalent(ref, model, feeds_for(ref))


def test_gemm_and_matmul_chains(assert_equivalent):
    text = HEADER.format(opset=17) + """
g (float[N,7,12] x) => (float[N,7,5] y)
  <float[12,16] m1, float[16] c1, float[16,9] m2, float[9] c2, float[9,5] m3> {
  a = MatMul(x, m1)
  ab = Add(a, c1)
  r = Relu(ab)
  b = MatMul(r, m2)
  bb = Add(b, c2)
  r2 = Relu(bb)
  y = MatMul(r2, m3)
}"""
    kw = dict(m1=skewed((16, 12)).T.copy(), m2=skewed((9, 16), 2).T.copy())
    ref, model = model_from_text(text, **kw), model_from_text(text, **kw)
    cle = CrossLayerEqualization()
    assert cle(model).modified
    assert cle.report.changed == 2
    assert_equivalent(ref, model, feeds_for(ref))


def test_convtranspose_pair(assert_equivalent):
    text = HEADER.format(opset=17) + """
g (float[N,4,5,5] x) => (float[N,3,H,W] y)
  <float[4,6,3,3] w1, float[6] b1, float[6,3,3,3] w2, float[3] b2> {
  a = ConvTranspose<strides=[2,2]>(x, w1, b1)
  r = Relu(a)
  y = ConvTranspose(r, w2, b2)
}"""
    w1 = skewed((6, 4, 3, 3)).transpose(1, 0, 2, 3).copy()
    ref, model = model_from_text(text, w1=w1), model_from_text(text, w1=w1)
    assert CrossLayerEqualization()(model).modified
    assert_equivalent(ref, model, feeds_for(ref))


def test_dead_channels_stay_unscaled(assert_equivalent):
    w1 = skewed((6, 4, 3, 3))
    w1[2] = 0.0  # dead output channel with a bias: scaling it would blow the bias up
    text = HEADER.format(opset=17) + """
g (float[N,4,6,6] x) => (float[N,5,6,6] y) <float[6,4,3,3] w1, float[6] b1, float[5,6,1,1] w2, float[5] b2> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(a)
  y = Conv(r, w2, b2)
}"""
    ref, model = model_from_text(text, w1=w1), model_from_text(text, w1=w1)
    CrossLayerEqualization()(model)
    b_ref = ref.graph.initializers["b1"].const_value.numpy()
    b_new = model.graph.initializers["b1"].const_value.numpy()
    assert b_new[2] == b_ref[2]
    assert np.max(np.abs(b_new)) < 1e3
    assert_equivalent(ref, model, feeds_for(ref))


NEGATIVE_LINKS = {
    "HardSwish": "c = HardSwish(a)",
    "Sigmoid": "c = Sigmoid(a)",
    "residual Add": "c = Add(a, a)",
    "nonzero Pad": 'c = Pad<mode="constant">(a, pads, fill)',
}


@pytest.mark.parametrize("name", sorted(NEGATIVE_LINKS))
def test_not_positively_homogeneous_links_block(name):
    text = HEADER.format(opset=17) + f"""
g (float[N,4,6,6] x) => (float[N,5,H,W] y)
  <float[6,4,3,3] w1, float[6] b1, float[5,6,1,1] w2, float[5] b2, int64[8] pads, float fill> {{
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  {NEGATIVE_LINKS[name]}
  y = Conv(c, w2, b2)
}}"""
    kw = dict(pads=np.array([0, 0, 1, 1, 0, 0, 1, 1]), fill=np.float32(1.0))
    model = model_from_text(text, w1=skewed((6, 4, 3, 3)), **kw)
    before = [v.const_value.numpy().copy() for v in model.graph.initializers.values()]
    cle = CrossLayerEqualization()
    assert not cle(model).modified
    assert cle.report.changed == 0 and cle.report.skipped
    after = [v.const_value.numpy() for v in model.graph.initializers.values()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_shared_weight_and_graph_input_weight_are_skipped():
    text = HEADER.format(opset=17) + """
g (float[N,4,6,6] x, float[5,6,1,1] w2) => (float[N,5,6,6] y, float[N,6,6,6] z)
  <float[6,4,3,3] w1, float[6] b1, float[5] b2> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(a)
  y = Conv(r, w2, b2)
  z = Conv<pads=[1,1,1,1]>(x, w1, b1)
}"""
    model = model_from_text(text, w1=skewed((6, 4, 3, 3)))
    cle = CrossLayerEqualization()
    assert not cle(model).modified
    reasons = " ".join(r for _, r in cle.report.skipped)
    assert "shared" in reasons or "graph input" in reasons


def test_grouped_conv_is_skipped():
    text = HEADER.format(opset=17) + """
g (float[N,4,6,6] x) => (float[N,8,6,6] y) <float[8,4,3,3] w1, float[8] b1, float[8,4,1,1] w2, float[8] b2> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(a)
  y = Conv<group=2>(r, w2, b2)
}"""
    model = model_from_text(text, w1=skewed((8, 4, 3, 3)))
    cle = CrossLayerEqualization()
    assert not cle(model).modified
    assert any("grouped" in r for _, r in cle.report.skipped)


def test_inside_if_branch(assert_equivalent):
    text = HEADER.format(opset=17) + """
g (bool cond, float[N,4,6,6] x) => (float[N,5,6,6] y)
  <float[6,4,3,3] w1, float[6] b1, float[5,6,1,1] w2, float[5] b2> {
  y = If(cond) <
    then_branch = t () => (float[N,5,6,6] yt) {
      a = Conv<pads=[1,1,1,1]>(x, w1, b1)
      r = Relu(a)
      yt = Conv(r, w2, b2)
    },
    else_branch = e () => (float[N,5,6,6] ye) {
      ye = Conv<pads=[1,1,1,1]>(x, w1, b1)
    }
  >
}"""
    # the weights live in the main graph and are read from inside the branch: shared → skipped
    model = model_from_text(text, w1=skewed((6, 4, 3, 3)))
    cle = CrossLayerEqualization()
    cle(model)
    feeds = {"cond": np.array(True), "x": np.ones((2, 4, 6, 6), np.float32)}
    ref = model_from_text(text, w1=skewed((6, 4, 3, 3)))
    assert_equivalent(ref, model, feeds)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    blocks=st.lists(
        st.tuples(
            st.sampled_from(["relu", "relu6", "none", "leaky"]),
            st.booleans(),  # depthwise
            st.sampled_from([1, 3]),
        ),
        min_size=2,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
def test_random_chains_are_exact(blocks, seed):
    """Random Conv(+depthwise)/activation chains stay exact after CLE + cleanup."""
    from conftest import max_rel_diff

    c = 6
    lines, decls, arrays = [], [], {}
    prev = "x"
    rng = np.random.default_rng(seed)
    for i, (act, dw, k) in enumerate(blocks):
        groups = c if dw else 1
        shape = (c, 1 if dw else c, k, k)
        decls += [f"float[{c},{shape[1]},{k},{k}] w{i}", f"float[{c}] b{i}"]
        arrays[f"w{i}"] = skewed(shape, seed + i, lo=0.05, hi=5.0) / np.sqrt(shape[1] * k * k)
        arrays[f"b{i}"] = rng.standard_normal(c).astype(np.float32)
        p = k // 2
        lines.append(f"a{i} = Conv<pads=[{p},{p},{p},{p}], group={groups}>({prev}, w{i}, b{i})")
        if act == "relu":
            lines.append(f"o{i} = Relu(a{i})")
        elif act == "relu6":
            lines.append(f"o{i} = Clip(a{i}, zero, six)")
        elif act == "leaky":
            lines.append(f"o{i} = LeakyRelu<alpha=0.2>(a{i})")
        else:
            lines.append(f"o{i} = Identity(a{i})")
        prev = f"o{i}"
    lines.append(f"y = Identity({prev})")
    text = HEADER.format(opset=17) + (
        f"g (float[N,{c},7,7] x) => (float[N,{c},7,7] y) <{', '.join(decls)}, float zero, float six> {{\n  "
        + "\n  ".join(lines) + "\n}"
    )
    arrays.update(zero=np.float32(0), six=np.float32(6))
    ref, model = model_from_text(text, **arrays), model_from_text(text, **arrays)
    CrossLayerEqualization()(model)
    Cleanup()(model)
    feeds = feeds_for(ref, scale=1.0)
    assert max_rel_diff(ref, model, feeds) <= 1e-5
