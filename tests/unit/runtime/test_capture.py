"""collect_statistics: one session with intermediates exposed, statistics equal to a hand run."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import model_from_text

from onnxq.errors import ConfigError
from onnxq.runtime import create_session
from onnxq.runtime.capture import collect_statistics

CONV_RELU = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w, float[4] b> {
  c = Conv<pads=[1,1,1,1]>(x, w, b)
  y = Relu(c)
  s = Shape(y)
}"""


def _batches(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32) * (i + 1)} for i in range(n)]


def _by_hand(model: ir.Model, name: str, batches) -> np.ndarray:
    """Expose ``name`` as the only output of a copy and run every batch."""
    copy = model.clone()
    value = next(v for n in copy.graph for v in n.outputs if v.name == name)
    copy.graph.outputs.clear()
    copy.graph.outputs.append(value)
    # capture runs onnxruntime with its optimizations on (fused kernels round a little
    # differently from the plain graph, ~1e-7 relative); compare like with like
    sess = create_session(copy, optimize=True)
    return np.concatenate([sess.run(None, b)[0] for b in batches])


def test_matches_a_hand_exposed_run():
    model = model_from_text(CONV_RELU)
    before = [v.name for v in model.graph.outputs]
    batches = _batches()
    calls = []
    stats = collect_statistics(
        model, ["x", "c", "y"], iter(batches), per_channel_axes={"c": 1}, progress=calls.append
    )
    assert calls == [1, 1, 1, 1]
    assert [v.name for v in model.graph.outputs] == before  # the model is untouched
    assert set(stats) == {"x", "c", "y"}
    for name in ("c", "y"):
        ref = _by_hand(model, name, batches)
        obs = stats[name]
        assert (obs.min, obs.max, obs.count, obs.batches) == (
            float(ref.min()),
            float(ref.max()),
            ref.size,
            4,
        )
        hist, _ = np.histogram(ref.astype(np.float64), bins=obs.edges)
        assert np.abs(hist - obs.hist).sum() <= 2
    ref = _by_hand(model, "c", batches)
    np.testing.assert_array_equal(stats["c"].channel_min, ref.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(stats["c"].channel_max, ref.max(axis=(0, 2, 3)))
    x = np.concatenate([b["x"] for b in batches])
    assert (stats["x"].min, stats["x"].max) == (float(x.min()), float(x.max()))
    assert stats["y"].zeros == int((ref <= 0).sum())


def test_inputs_only_and_untyped_intermediates():
    model = model_from_text(CONV_RELU)
    assert next(v for n in model.graph for v in n.outputs if v.name == "c").dtype is None
    stats = collect_statistics(model, ["x"], _batches(2))
    assert stats["x"].batches == 2
    stats = collect_statistics(model, ["c"], _batches(1), bins=64)
    assert stats["c"].hist.shape == (64,) and stats["c"].count == 2 * 4 * 8 * 8


@pytest.mark.parametrize(
    "names, axes, message",
    [
        (["nope"], None, r"tensor 'nope' is neither an input nor a node output"),
        (["w"], None, r"tensor 'w' is a constant initializer"),
        (["s"], None, r"tensor 's' is INT64: only float tensors"),
        (["c"], {"y": 1}, r"per-channel axis given for 'y'"),
        (["c"], {"c": 5}, r"tensor 'c': per-channel axis 5 is out of range for rank 4"),
    ],
)
def test_bad_requests(names, axes, message):
    model = model_from_text(CONV_RELU)
    with pytest.raises(ConfigError, match=message):
        collect_statistics(model, names, _batches(1), per_channel_axes=axes)


@pytest.mark.parametrize(
    "data, message",
    [
        ([{"image": np.zeros((1, 3, 8, 8), np.float32)}], r"unknown input 'image'"),
        ([np.zeros((1, 3, 8), np.float32)], r"input 'x' has shape \(1, 3, 8\)"),
        ([np.zeros((1, 3, 8, 8), np.int64)], r"input 'x' is int64 but the model expects float32"),
        ([np.full((1, 3, 8, 8), np.nan, np.float32)], r"input 'x' has 192 NaN"),
        ([], r"no batches \(model inputs: 'x'\)"),
    ],
)
def test_bad_data_is_a_config_error_naming_the_input(data, message):
    with pytest.raises(ConfigError, match=message):
        collect_statistics(model_from_text(CONV_RELU), ["y"], data)


def test_onnxruntime_failure_names_the_batch():
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] a, float[N,4] b) => (float[N,4] y) { y = Add(a, b) }""")
    good = {"a": np.ones((2, 4), np.float32), "b": np.ones((2, 4), np.float32)}
    bad = {"a": np.ones((2, 4), np.float32), "b": np.ones((3, 4), np.float32)}
    with pytest.raises(ConfigError, match=r"calibration batch 1: onnxruntime could not run"):
        collect_statistics(model, ["y"], [good, bad])


def test_outputs_written_into_reused_buffers_stay_exact_across_shapes():
    """Batches of one shape reuse the first batch's output arrays (an I/O binding); a new batch
    size rebinds; an output whose shape depends on the data falls back to plain runs."""
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,4] x) => (float[N,3,4] y) {
  y = Relu(x)
  pos = Less(x, y)
  idx = NonZero(pos)
  at = Transpose<perm=[1,0]>(idx)
  neg = GatherND(x, at)
}""")
    rng = np.random.default_rng(5)
    batches = [{"x": rng.standard_normal((n, 3, 4)).astype(np.float32)} for n in (2, 2, 2, 3, 3, 2)]
    stats = collect_statistics(model, ["y", "neg"], iter(batches))
    xs = [b["x"] for b in batches]
    relu = np.concatenate([np.maximum(x, 0).ravel() for x in xs])
    negative = np.concatenate([x[x < 0] for x in xs])
    for name, ref in (("y", relu), ("neg", negative)):
        obs = stats[name]
        assert (obs.min, obs.max, obs.count, obs.batches) == (
            float(ref.min()), float(ref.max()), ref.size, len(batches))
        hist, _ = np.histogram(ref.astype(np.float64), bins=obs.edges)
        assert np.abs(hist - obs.hist).sum() <= 2
    assert stats["y"].zeros == int((relu == 0).sum())


def test_observer_threads_do_not_change_the_statistics():
    model = model_from_text(CONV_RELU)
    one = collect_statistics(model, ["x", "c", "y"], _batches(), threads=1)
    many = collect_statistics(model, ["x", "c", "y"], _batches(), threads=3)
    for name in one:
        a, b = one[name], many[name]
        fields = ("min", "max", "count", "zeros", "lo", "width")
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
        np.testing.assert_array_equal(a.hist, b.hist)


def test_nan_and_inf_inside_the_graph_are_left_out_with_min_max_only():
    """Log of negative values is NaN, of 0 is -inf: counted and left out of the extremes."""
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6] x) => (float[N,6] y) { y = Log(x) }""")
    good = np.array([[1, 2, 3, 4, 5, 6]], np.float32)
    bad = np.array([[0, -1, 2, 3, 0.5, 8]], np.float32)
    stats = collect_statistics(model, ["y"], [good, bad, good], histogram=False)
    obs = stats["y"]
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log(np.concatenate([good, bad, good]).astype(np.float64)).ravel()
    finite = values[np.isfinite(values)]
    assert obs.nonfinite == 2 and obs.count == finite.size and obs.batches == 3
    assert obs.min == pytest.approx(finite.min(), rel=1e-6)
    assert obs.max == pytest.approx(finite.max(), rel=1e-6)


# -- batches run in pieces -------------------------------------------------------------------------
def _big_batches(n: int = 3, rows: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((rows, 3, 8, 8)).astype(np.float32) * (i + 1)}
            for i in range(n)]


def test_pieces_give_the_statistics_of_whole_batches():
    model = model_from_text(CONV_RELU)
    batches = _big_batches()
    whole = collect_statistics(model, ["c", "y"], batches, per_channel_axes={"c": 1},
                               piece_mb=None, sample=None)
    # c and y: 2 kB observed per sample; a 2 kB budget runs pieces of one sample
    pieces = collect_statistics(model, ["c", "y"], batches, per_channel_axes={"c": 1},
                                piece_mb=2048 / 2**20, sample=None)
    for name in ("c", "y"):
        a, b = whole[name], pieces[name]
        assert (a.min, a.max, a.count, a.batches) == (b.min, b.max, b.count, b.batches)
        assert a.batch_min == b.batch_min and a.batch_max == b.batch_max  # per whole batch
        ref = _by_hand(model, name, batches)
        hist, _ = np.histogram(ref.astype(np.float64), bins=b.edges)
        # runs of one sample round a little differently from runs of eight (~1e-7 relative):
        # a few values near a bin edge change bins
        assert np.abs(hist - b.hist).sum() <= 0.002 * b.count
    np.testing.assert_array_equal(whole["c"].channel_max, pieces["c"].channel_max)


def test_a_piece_takes_its_share_of_the_histogram_sample(monkeypatch):
    from onnxq.quant.observers import Observer

    calls = []
    update = Observer.update

    def spy(self, x, **options):
        if self.histogram:  # the calibration's observers (not the first batch's min / max pass)
            calls.append((x.shape[0], options))
        return update(self, x, **options)

    monkeypatch.setattr(Observer, "update", spy)
    model = model_from_text(CONV_RELU)
    stats = collect_statistics(model, ["c"], _big_batches(n=2, rows=8), piece_mb=1024 / 2**20,
                               sample=512)  # c: 1 kB per sample, so pieces of one sample
    assert len(calls) == 16 and all(rows == 1 for rows, _ in calls)
    assert [o["continues"] for _, o in calls] == ([False] + [True] * 7) * 2
    assert all(o["sample"] == 512 // 8 for _, o in calls)
    obs = stats["c"]
    assert obs.batches == 2 and obs.count == 2 * 8 * 256
    assert abs(int(obs.hist.sum()) - obs.count) <= 0.1 * obs.count


MIXES_SAMPLES = """<ir_version: 8, opset_import: ["" : 18]>
g (float[N,4] x) => (float[N,4] y) {
  axes = Constant<value = int64[1] {0}>()
  m = ReduceMean<keepdims=1>(x, axes)
  y = Sub(x, m)
}"""

FIXED_BATCH = """<ir_version: 8, opset_import: ["" : 17]>
g (float[8,3,8,8] x) => (float[8,4,8,8] y) <float[4,3,3,3] w, float[4] b> {
  c = Conv<pads=[1,1,1,1]>(x, w, b)
  y = Relu(c)
}"""


def test_a_model_that_mixes_samples_along_axis_0_runs_whole_batches():
    model = model_from_text(MIXES_SAMPLES)
    rng = np.random.default_rng(2)
    batches = [{"x": rng.standard_normal((8, 4)).astype(np.float32)} for _ in range(2)]
    stats = collect_statistics(model, ["y"], batches, piece_mb=1e-9)
    ref = _by_hand(model, "y", batches)
    # in pieces of one sample y would be all zeros
    assert (stats["y"].min, stats["y"].max) == (float(ref.min()), float(ref.max()))
    assert stats["y"].max > 0.1


def test_a_model_with_a_fixed_batch_size_runs_whole_batches():
    model = model_from_text(FIXED_BATCH)
    batches = _big_batches(n=2, rows=8)
    stats = collect_statistics(model, ["y"], batches, piece_mb=1e-9)
    ref = _by_hand(model, "y", batches)
    assert (stats["y"].min, stats["y"].max, stats["y"].count) == (
        float(ref.min()), float(ref.max()), ref.size)


MOVES_SAMPLES = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[3,N,8,8] t) <float[3,3,1,1] w> {
  c = Conv(x, w)
  t = Transpose<perm=[1,0,2,3]>(c)
}"""


def test_samples_moved_to_another_axis_still_run_in_pieces_unless_that_is_a_channel_axis(
        monkeypatch):
    from onnxq.quant.observers import Observer

    rows = []
    update = Observer.update
    monkeypatch.setattr(Observer, "update",
                        lambda self, x, **o: (rows.append(x.shape), update(self, x, **o))[1])
    model = model_from_text(MOVES_SAMPLES)
    batches = _big_batches(n=2, rows=8)
    # t holds the samples on axis 1 (768 B per sample): pieces of one sample
    stats = collect_statistics(model, ["t"], batches, piece_mb=768 / 2**20)
    assert rows and all(shape == (3, 1, 8, 8) for shape in rows)
    ref = _by_hand(model, "t", batches)
    assert (stats["t"].min, stats["t"].max, stats["t"].batches) == (
        float(ref.min()), float(ref.max()), 2)
    rows.clear()
    # per-channel statistics along the axis that holds the samples: whole batches
    stats = collect_statistics(model, ["t"], batches, per_channel_axes={"t": 1},
                               piece_mb=768 / 2**20)
    assert rows == [(3, 8, 8, 8)] * 2
    assert stats["t"].channel_max.shape == (8,)


def test_a_first_batch_in_pieces_starts_the_histogram_on_the_whole_batch_range():
    model = model_from_text(CONV_RELU)
    batches = _big_batches(n=1, rows=8)
    whole = collect_statistics(model, ["c"], batches, piece_mb=None, sample=None)["c"]
    pieces = collect_statistics(model, ["c"], batches, piece_mb=1024 / 2**20, sample=None)["c"]
    # without the start range, the first piece (one sample) would set narrower bins
    np.testing.assert_allclose(pieces.edges, whole.edges, rtol=1e-6)
    assert np.abs(pieces.hist - whole.hist).sum() <= 0.002 * whole.count
