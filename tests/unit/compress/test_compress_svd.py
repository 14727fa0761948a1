"""Weight SVD and spatial SVD: exact at full rank, the Eckart–Young optimum below it, structure,
negative twins, the input model untouched, MAC counting."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import max_rel_diff, model_from_text, random_feeds

from onnxq.compress.macs import count_macs, value_shapes
from onnxq.compress.spatial_svd import SpatialSVD
from onnxq.compress.weight_svd import WeightSVD
from onnxq.passes.cleanup import Cleanup
from onnxq.runtime import run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

CONV = HEADER + """
g (float[N,6,9,11] x) => (float[N,8,5,6] y) <float[8,6,3,3] w, float[8] b> {
  y = Conv<pads=[0,1,1,1], strides=[2,2], dilations=[1,1]>(x, w, b)
}"""

CONV_CHAIN = HEADER + """
g (float[N,4,10,10] x) => (float[N,5] y)
  <float[8,4,3,3] w1, float[8] b1, float[6,8,5,3] w2, float[6] b2, float[5,6] wg, float[5] bg> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(a)
  c = Conv<pads=[2,1,2,1], dilations=[1,1], strides=[1,2]>(r, w2, b2)
  p = GlobalAveragePool(c)
  f = Flatten(p)
  y = Gemm<transB=1>(f, wg, bg)
}"""

GEMM = HEADER + """
g (float[N,12] x) => (float[N,7] y) <float[12,7] w, float[7] c> {
  y = Gemm<alpha=0.5, beta=2.0>(x, w, c)
}"""

MATMUL = HEADER + """
g (float[N,3,12] x) => (float[N,3,7] y) <float[12,7] w, float[7] c> {
  m = MatMul(x, w)
  y = Add(m, c)
}"""

GROUPED = HEADER + """
g (float[N,8,8,8] x) => (float[N,8,8,8] y) <float[8,2,3,3] w, float[8] b> {
  y = Conv<pads=[1,1,1,1], group=4>(x, w, b)
}"""


def _node(model, op):
    return next(n for n in model.graph if n.op_type == op)


def _compress(model, pass_):
    work = model.clone()
    result = pass_(work)
    Cleanup()(work)
    return work, result


def _with_weight(model, node_name, w):
    """A copy of ``model`` whose named node reads weight ``w`` (the reference low-rank model)."""
    ref = model.clone()
    node = next(n for n in ref.graph if n.name == node_name)
    node.inputs[1].const_value = ir.Tensor(np.asarray(w, np.float32), name=node.inputs[1].name)
    return ref


def _check_valid(before, after):
    proto = ir.to_proto(after)
    onnx.checker.check_model(proto)
    assert [v.name for v in before.graph.inputs] == [v.name for v in after.graph.inputs]
    assert [v.name for v in before.graph.outputs] == [v.name for v in after.graph.outputs]
    feeds = random_feeds(before)
    for a, b in zip(run(before, feeds), run(after, feeds)):
        assert a.shape == b.shape


def _snapshot(model):
    return ir.to_proto(model).SerializeToString()


# ---- weight SVD -----------------------------------------------------------------------------
@pytest.mark.parametrize("text,op", [(CONV, "Conv"), (GEMM, "Gemm"), (MATMUL, "MatMul")])
def test_weight_svd_full_rank_exact(text, op):
    model = model_from_text(text)
    node = _node(model, op)
    node.name = "L"
    before = _snapshot(model)
    out, result = _compress(model, WeightSVD(ranks={"L": 10_000}))
    assert result.modified
    assert _snapshot(model) == before  # input untouched
    assert [n.op_type for n in out.graph].count(op) == 2
    _check_valid(model, out)
    assert max_rel_diff(model, out, random_feeds(model)) <= 1e-5


@pytest.mark.parametrize("text,op", [(CONV, "Conv"), (GEMM, "Gemm"), (MATMUL, "MatMul")])
def test_weight_svd_is_the_eckart_young_optimum(text, op):
    model = model_from_text(text)
    node = _node(model, op)
    node.name = "L"
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    # the layer's weight as (outputs, patch)
    mat = w.reshape(w.shape[0], -1) if op == "Conv" else w.T
    rank = 3
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    out, _ = _compress(model, WeightSVD(ranks={"L": rank}))
    a, b = [n for n in out.graph if n.op_type == op]
    wa, wb = a.inputs[1].const_value.numpy(), b.inputs[1].const_value.numpy()
    # structure: r = 3 in the middle; bias on the second layer only
    if op == "Conv":
        assert wa.shape == (3, 6, 3, 3) and wb.shape == (8, 3, 1, 1)
        assert len(a.inputs) == 2 and b.inputs[2] is not None
        assert a.attributes["strides"].value == (2, 2) and b.attributes["kernel_shape"].value == (1, 1)
        product = wb.reshape(8, 3) @ wa.reshape(3, -1)
    elif op == "Gemm":
        assert wa.shape == (3, 12) and wb.shape == (7, 3) and len(a.inputs) == 2
        product = wb @ wa
    else:
        assert wa.shape == (12, 3) and wb.shape == (3, 7)
        product = (wa @ wb).T
    np.testing.assert_allclose(product, best, atol=1e-5)
    err = np.linalg.norm(product - mat) ** 2
    np.testing.assert_allclose(err, np.sum(s[rank:] ** 2), rtol=1e-4)
    # the compressed model computes the layer with the optimal rank-3 weight
    ref_w = best.reshape(w.shape) if op == "Conv" else best.T
    assert max_rel_diff(_with_weight(model, "L", ref_w), out, random_feeds(model)) <= 1e-5
    # and a lower rank is strictly worse than a higher one
    lo, _ = _compress(model, WeightSVD(ranks={"L": 1}))
    feeds = random_feeds(model)
    assert max_rel_diff(model, lo, feeds) > max_rel_diff(model, out, feeds)


def test_weight_svd_ratio_gives_macs_within_ratio():
    model = model_from_text(CONV)
    _node(model, "Conv").name = "L"
    macs = count_macs(model).macs
    for ratio in (0.2, 0.5, 0.8):
        out, _ = _compress(model, WeightSVD(ratios={"L": ratio}))
        got = count_macs(out).macs
        assert got <= ratio * macs
        assert got > (ratio - 0.25) * macs  # the largest rank that fits


def test_weight_svd_skips_grouped_and_unknown():
    model = model_from_text(GROUPED)
    _node(model, "Conv").name = "L"
    p = WeightSVD(ranks={"L": 2, "missing": 1})
    out, result = _compress(model, p)
    assert not result.modified
    reasons = dict(p.report.skipped)
    assert "grouped" in reasons["L"]
    assert any("missing" in r for r in reasons.values())


# ---- spatial SVD ----------------------------------------------------------------------------
def test_spatial_svd_full_rank_exact_with_asymmetric_pads_strides():
    model = model_from_text(CONV_CHAIN)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    convs[0].name, convs[1].name = "c1", "c2"
    before = _snapshot(model)
    out, result = _compress(model, SpatialSVD(ranks={"c1": 1000, "c2": 1000}))
    assert result.modified and _snapshot(model) == before
    ops = [n.op_type for n in out.graph]
    assert ops.count("Conv") == 4
    v, h = [n for n in out.graph if n.name.startswith("c2_")]
    assert v.attributes["kernel_shape"].value == (5, 1) and h.attributes["kernel_shape"].value == (1, 3)
    assert v.attributes["pads"].value == (2, 0, 2, 0) and h.attributes["pads"].value == (0, 1, 0, 1)
    assert v.attributes["strides"].value == (1, 1) and h.attributes["strides"].value == (1, 2)
    assert len(v.inputs) == 2 and h.inputs[2] is not None
    _check_valid(model, out)
    assert max_rel_diff(model, out, random_feeds(model)) <= 1e-5


def test_spatial_svd_is_the_optimum_of_the_reshaped_weight():
    model = model_from_text(CONV)
    _node(model, "Conv").name = "L"
    w = _node(model, "Conv").inputs[1].const_value.numpy().astype(np.float64)
    o, c, kh, kw = w.shape
    mat = w.transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    rank = 4
    best = ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(c, kh, o, kw).transpose(2, 0, 1, 3)
    out, _ = _compress(model, SpatialSVD(ranks={"L": rank}))
    v, h = [n for n in out.graph if n.op_type == "Conv"]
    wv, wh = v.inputs[1].const_value.numpy(), h.inputs[1].const_value.numpy()
    assert wv.shape == (rank, c, kh, 1) and wh.shape == (o, rank, 1, kw)
    product = np.einsum("otj,tci->ocij", wh[:, :, 0, :], wv[..., 0])
    np.testing.assert_allclose(product, best, atol=1e-5)
    np.testing.assert_allclose(np.sum((product - w) ** 2), np.sum(s[rank:] ** 2), rtol=1e-4)
    # the split model computes the Conv with the optimal separable weight, pads/strides included
    assert max_rel_diff(_with_weight(model, "L", best), out, random_feeds(model)) <= 1e-5


def test_spatial_svd_ratio_uses_inferred_shapes():
    model = model_from_text(CONV)
    _node(model, "Conv").name = "L"
    total = count_macs(model).macs
    out, _ = _compress(model, SpatialSVD(ratios={"L": 0.5}))
    got = count_macs(out).macs
    assert 0.3 * total < got <= 0.5 * total


def test_spatial_svd_skips_grouped_conv():
    model = model_from_text(GROUPED)
    _node(model, "Conv").name = "L"
    p = SpatialSVD(ranks={"L": 2})
    before = _snapshot(model)
    out, result = _compress(model, p)
    assert not result.modified
    assert "grouped" in p.report.skipped[0][1]
    assert [n.op_type for n in out.graph] == ["Conv"] and _snapshot(model) == before


def test_spatial_svd_skips_1x1_and_same_padding():
    text = HEADER + """
g (float[N,4,6,6] x) => (float[N,4,6,6] y) <float[4,4,1,1] w1, float[4,4,3,3] w2> {
  a = Conv(x, w1)
  y = Conv<auto_pad="SAME_UPPER">(a, w2)
}"""
    model = model_from_text(text)
    a, b = [n for n in model.graph]
    a.name, b.name = "one", "same"
    p = SpatialSVD(ranks={"one": 1, "same": 1})
    _, result = _compress(model, p)
    reasons = dict(p.report.skipped)
    assert not result.modified
    assert "nothing to split" in reasons["one"] and "SAME_UPPER" in reasons["same"]


# ---- MACs -----------------------------------------------------------------------------------
def test_macs_by_hand():
    model = model_from_text(CONV_CHAIN)
    cost = count_macs(model)
    by_op = {c.op_type: 0 for c in cost.layers}
    for c in cost.layers:
        by_op[c.op_type] += c.macs
    conv1 = 8 * 10 * 10 * 4 * 9
    # c: H = 10 + 4 - 5 + 1 = 10, W = (10 + 2 - 3) // 2 + 1 = 5
    conv2 = 6 * 10 * 5 * 8 * 15
    assert by_op["Conv"] == conv1 + conv2
    assert by_op["Gemm"] == 5 * 6
    assert cost.params == 8 * 4 * 9 + 8 + 6 * 8 * 15 + 6 + 30 + 5
    shapes = value_shapes(model)
    assert shapes["c"] == (1, 6, 10, 5)
