"""Channel pruning: the least-squares optimum on the calibration data, exact removal of dead
channels through BN/activations/depthwise/pooling/Pad and residual Adds, negative twins."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import max_rel_diff, model_from_text, random_feeds

from onnxq.compress.channel_pruning import ChannelPruning
from onnxq.compress.macs import count_macs
from onnxq.passes.cleanup import Cleanup
from onnxq.runtime import run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

CHAIN = HEADER + """
g (float[N,3,8,8] x) => (float[N,6,8,8] y) <float[8,3,3,3] w1, float[8] b1, float[6,8,3,3] w2, float[6] b2> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(a)
  y = Conv<pads=[1,1,1,1]>(r, w2, b2)
}"""

THROUGH = HEADER + """
g (float[N,3,10,10] x) => (float[N,6,5,5] y)
  <float[8,3,1,1] w1, float[8] b1, float[8] sc, float[8] bi, float[8] mu, float[8] var,
   float lo, float hi, float[8,1,3,3] wd, float[8] bd, float[8,1,1] m,
   float[6,8,3,3] w2, float[6] b2, int64[8] pads> {
  a = Conv(x, w1, b1)
  n = BatchNormalization(a, sc, bi, mu, var)
  c = Clip(n, lo, hi)
  d = Conv<pads=[1,1,1,1], group=8>(c, wd, bd)
  s = Mul(d, m)
  r = Relu(s)
  p = MaxPool<kernel_shape=[2,2], strides=[2,2]>(r)
  q = Pad<mode="reflect">(p, pads)
  y = Conv(q, w2, b2)
}"""

RESIDUAL = HEADER + """
g (float[N,3,6,6] x) => (float[N,5,6,6] y)
  <float[8,3,1,1] w0, float[8] b0, float[8,8,3,3] w1, float[8] b1, float[5,8,1,1] w2, float[5] b2> {
  a = Conv(x, w0, b0)
  b = Conv<pads=[1,1,1,1]>(a, w1, b1)
  s = Add(a, b)
  t = Relu(s)
  y = Conv(t, w2, b2)
}"""

BLOCKED = HEADER + """
g (float[N,3,6,6] x) => (float[N,5,6,6] y, float[N,12,6,6] z)
  <float[8,3,1,1] w0, float[8] b0, float[5,8,1,1] w2, float[5] b2, float[4,3,1,1] w3> {
  a = Conv(x, w0, b0)
  r = Relu(a)
  y = Conv(r, w2, b2)
  e = Conv(x, w3)
  z = Concat<axis=1>(r, e)
}"""


def _name_convs(model, *names):
    convs = [n for n in model.graph if n.op_type == "Conv"]
    for node, name in zip(convs, names):
        node.name = name
    return convs


def _data(model, n=4, seed=3):
    return [random_feeds(model, seed=seed + i, batch=n) for i in range(2)]


def _prune(model, **kwargs):
    work = model.clone()
    p = ChannelPruning(**kwargs)
    result = p(work)
    Cleanup()(work)
    return work, result, p


def _snapshot(model):
    return ir.to_proto(model).SerializeToString()


def _im2col(x, k, pad):
    """(N, C, H, W) → (N·H·W, C, k·k) patches of a stride-1 'same' conv."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((n, h, w, c, k, k), np.float64)
    for i in range(k):
        for j in range(k):
            cols[..., i, j] = xp[:, :, i:i + h, j:j + w].transpose(0, 2, 3, 1)
    return cols.reshape(n * h * w, c, k * k)


def _intermediate(model, name, feeds):
    work = model.clone()
    value = next(v for node in work.graph for v in node.outputs if v.name == name)
    work.graph.outputs.append(value)
    return run(work, feeds)[-1]


def test_refit_is_the_least_squares_optimum_on_the_calibration_data():
    model = model_from_text(CHAIN, seed=5)
    _name_convs(model, "c1", "c2")
    data = _data(model)
    before = _snapshot(model)
    out, result, p = _prune(model, keep={"c2": 5}, data=data, rows=100_000)
    assert result.modified and _snapshot(model) == before
    kept = p.kept["c2"]
    assert len(kept) == 5
    c1, c2 = [n for n in out.graph if n.op_type == "Conv"]
    assert c1.inputs[1].const_value.shape == (5, 3, 3, 3) and c1.inputs[2].const_value.shape == (5,)
    assert c2.inputs[1].const_value.shape == (6, 5, 3, 3)
    onnx.checker.check_model(ir.to_proto(out))
    # the exact optimum over every position of the calibration data, computed here by lstsq
    xs, ts, ys = [], [], []
    for feeds in data:
        r = _intermediate(model, "r", feeds).astype(np.float64)
        xs.append(_im2col(r, 3, 1)[:, kept].reshape(-1, len(kept) * 9))
        ts.append(run(model, feeds)[0].transpose(0, 2, 3, 1).reshape(-1, 6))
        ys.append(run(out, feeds)[0].transpose(0, 2, 3, 1).reshape(-1, 6))
    design = np.concatenate([np.concatenate(xs), np.ones((sum(len(x) for x in xs), 1))], axis=1)
    t = np.concatenate(ts)
    theta, *_ = np.linalg.lstsq(design, t, rcond=None)
    optimum = float(np.sum((design @ theta - t) ** 2))
    got = float(np.sum((np.concatenate(ys) - t) ** 2))
    assert optimum > 0
    assert got <= optimum * (1 + 1e-3) + 1e-6 * np.sum(t * t)
    # and it is better than just dropping the channels (no re-fit)
    w2 = model.graph.initializers["w2"].const_value.numpy()
    naive = sum(
        float(np.sum((np.einsum("pcq,ocq->po", _im2col(_intermediate(model, "r", f), 3, 1)[:, kept],
                                w2[:, kept].reshape(6, len(kept), 9))
                      + model.graph.initializers["b2"].const_value.numpy() - tt) ** 2))
        for f, tt in zip(data, np.split(t, 2)))
    assert got < naive


@pytest.mark.parametrize("method", ["greedy", "lasso"])
def test_selection_drops_dead_and_redundant_channels_exactly(method):
    model = model_from_text(CHAIN, seed=7)
    _name_convs(model, "c1", "c2")
    w1 = model.graph.initializers["w1"].const_value.numpy().copy()
    b1 = model.graph.initializers["b1"].const_value.numpy().copy()
    w2 = model.graph.initializers["w2"].const_value.numpy().copy()
    w1[4], b1[4] = w1[0], b1[0]            # channel 4 duplicates channel 0 ...
    w2[:, 4] = 0.05 * w2[:, 0]             # ... with a small weight: re-fit absorbs it exactly
    w2[:, 5:] = 0.0                        # channels 5, 6, 7 are dead
    for name, arr in (("w1", w1), ("b1", b1), ("w2", w2)):
        model.graph.initializers[name].const_value = ir.Tensor(arr, name=name)
    out, _, p = _prune(model, keep={"c2": 4}, data=_data(model), method=method)
    assert p.kept["c2"] == [0, 1, 2, 3]
    assert max_rel_diff(model, out, random_feeds(model, seed=11)) <= 1e-4


def test_channels_removed_through_bn_clip_depthwise_mul_pool_pad():
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    model = model_from_text(THROUGH, seed=2, lo=np.float32(-6.0), hi=np.float32(6.0),
                            m=np.linspace(0.5, 2.0, 8).reshape(8, 1, 1), pads=pads,
                            bd=np.full(8, 8.0))  # no channel is dead after the Relu
    _name_convs(model, "c1", "dw", "c2")
    w2 = model.graph.initializers["w2"].const_value.numpy().copy()
    w2[:, [1, 6]] = 0.0
    model.graph.initializers["w2"].const_value = ir.Tensor(w2, name="w2")
    out, result, p = _prune(model, keep={"c2": 6}, data=_data(model))
    assert result.modified, p.report.summary()
    assert p.kept["c2"] == [0, 2, 3, 4, 5, 7]
    nodes = {n.name: n for n in out.graph}
    assert nodes["c1"].inputs[1].const_value.shape == (6, 3, 1, 1)
    assert nodes["dw"].inputs[1].const_value.shape == (6, 1, 3, 3)
    assert nodes["dw"].attributes["group"].value == 6
    bn = next(n for n in out.graph if n.op_type == "BatchNormalization")
    assert all(v.const_value.shape == (6,) for v in bn.inputs[1:])
    mul = next(n for n in out.graph if n.op_type == "Mul")
    assert mul.inputs[1].const_value.shape == (6, 1, 1)
    assert count_macs(out).macs < count_macs(model).macs
    assert max_rel_diff(model, out, random_feeds(model, seed=11)) <= 1e-4


def test_residual_add_pruned_when_every_branch_follows():
    model = model_from_text(RESIDUAL, seed=4)
    _name_convs(model, "c0", "c1", "c2")
    w1 = model.graph.initializers["w1"].const_value.numpy().copy()
    w2 = model.graph.initializers["w2"].const_value.numpy().copy()
    w1[:, 6:] = 0.0  # c1 does not read channels 6, 7 of a ...
    w2[:, 6:] = 0.0  # ... and c2 does not read them from the sum
    for name, arr in (("w1", w1), ("w2", w2)):
        model.graph.initializers[name].const_value = ir.Tensor(arr, name=name)
    out, result, p = _prune(model, keep={"c2": 6}, data=_data(model))
    assert result.modified and p.kept["c2"] == [0, 1, 2, 3, 4, 5]
    nodes = {n.name: n for n in out.graph}
    assert nodes["c0"].inputs[1].const_value.shape == (6, 3, 1, 1)  # producer of one branch
    assert nodes["c1"].inputs[1].const_value.shape == (6, 6, 3, 3)  # reads and feeds the sum
    assert nodes["c2"].inputs[1].const_value.shape == (5, 6, 1, 1)
    assert max_rel_diff(model, out, random_feeds(model, seed=11)) <= 1e-4


def test_negative_twin_concat_branch_cannot_follow():
    model = model_from_text(BLOCKED, seed=4)
    _name_convs(model, "c0", "c2", "c3")
    before = _snapshot(model)
    out, result, p = _prune(model, keep={"c2": 4}, data=_data(model))
    assert not result.modified
    assert "Concat" in p.report.skipped[0][1]
    assert _snapshot(model) == before
    assert max_rel_diff(model, out, random_feeds(model)) == 0.0


def test_skips_graph_input_and_grouped_targets():
    text = HEADER + """
g (float[N,4,6,6] x) => (float[N,4,6,6] y) <float[4,4,1,1] w1, float[4,2,3,3] w2> {
  a = Conv(x, w1)
  y = Conv<pads=[1,1,1,1], group=2>(a, w2)
}"""
    model = model_from_text(text)
    _name_convs(model, "first", "grouped")
    _, result, p = _prune(model, keep={"first": 2, "grouped": 2}, data=_data(model))
    reasons = dict(p.report.skipped)
    assert not result.modified
    assert "graph input" in reasons["first"] and "grouped" in reasons["grouped"]


STREAM = HEADER + """
g (float[N,3,6,6] x) => (float[N,5,6,6] y)
  <float[8,3,1,1] w0, float[8] b0, float[16,8,1,1] w1, float[16] b1, float[8,16,1,1] w2, float[8] b2,
   float[5,8,1,1] w3, float[5] b3> {
  s0 = Conv(x, w0, b0)
  e = Conv(s0, w1, b1)
  r = Relu(e)
  p = Conv(r, w2, b2)
  s1 = Add(s0, p)
  y = Conv(s1, w3, b3)
}"""


def test_a_later_target_whose_outputs_an_earlier_plan_cut():
    model = model_from_text(STREAM, seed=6)
    _name_convs(model, "c0", "c1", "c2", "c3")
    # c1 prunes the residual stream: c0's and c2's outputs follow, c3's inputs too; then c2 is
    # pruned itself and re-fit to its 6 remaining outputs
    out, result, p = _prune(model, keep={"c1": 6, "c2": 12}, data=_data(model))
    assert result.modified and set(p.kept) == {"c1", "c2"}
    nodes = {n.name: n for n in out.graph}
    assert nodes["c0"].inputs[1].const_value.shape == (6, 3, 1, 1)
    assert nodes["c1"].inputs[1].const_value.shape == (12, 6, 1, 1)
    assert nodes["c2"].inputs[1].const_value.shape == (6, 12, 1, 1)
    assert nodes["c3"].inputs[1].const_value.shape == (5, 6, 1, 1)
    onnx.checker.check_model(ir.to_proto(out))
    feeds = random_feeds(model, seed=11)
    assert run(out, feeds)[0].shape == run(model, feeds)[0].shape


def test_kept_counts_round_to_a_multiple():
    from onnxq.compress.channel_pruning import kept_count

    assert kept_count(None, 0.3, 24, 8) == 8 and kept_count(None, 0.5, 24, 8) == 16
    assert kept_count(None, 0.7, 24, 8) == 16 and kept_count(None, 0.05, 24, 8) == 8
    assert kept_count(None, 0.3, 24) == 7 and kept_count(5, None, 24, 8) == 5  # exact counts stay
    model = model_from_text(CHAIN, seed=5)
    _name_convs(model, "c1", "c2")
    _, _, p = _prune(model, ratios={"c2": 0.6}, data=_data(model), multiple=4)
    assert len(p.kept["c2"]) == 4
