"""Observers: exact histogram growth, constant memory, and the range-setting methods."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.errors import ConfigError
from onnxq.quant.observers import (
    HISTOGRAM_FREE,
    RANGE_METHODS,
    Observer,
    batch_median,
    channel_minmax,
    compute_range,
    entropy,
    minmax,
    mse,
    percentile,
    weight_range,
)
from onnxq.quant.qparams import fake_quantize, qrange


def _fed(*arrays: np.ndarray, **kw) -> Observer:
    obs = Observer("t", **kw)
    for a in arrays:
        obs.update(a)
    return obs


def _fq_mse(x: np.ndarray, lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> float:
    if symmetric:
        rng = qrange(bits, signed=True, strict=True)
        scale, zp = hi / rng.qmax, 0.0
    else:
        rng = qrange(bits, signed=False)
        scale = (hi - lo) / rng.qmax
        zp = np.clip(np.rint(-lo / scale), rng.qmin, rng.qmax)
    x = x.astype(np.float64)
    return float(np.mean((fake_quantize(x, scale, zp, rng) - x) ** 2))


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(200_000).astype(np.float32)


def test_growth_is_exact_and_keeps_count_and_extremes():
    rng = np.random.default_rng(1)
    batches = [
        rng.standard_normal(5000).astype(np.float32) * s + o
        for s, o in [(0.1, 0), (1, 0), (3, 2), (0.5, -9), (10, 0), (1, 40)]
    ]
    obs = _fed(*batches)
    data = np.concatenate(batches)
    assert obs.hist.sum() == obs.count == data.size
    assert obs.min == float(data.min()) and obs.max == float(data.max())
    ref, _ = np.histogram(data.astype(np.float64), bins=obs.edges)
    # counts are summed bin into bin, never split: the histogram of all data on the final edges
    # (a value on an edge may land on either side by float rounding of the edges)
    assert np.abs(ref - obs.hist).sum() <= 2
    assert obs.edges[0] <= data.min() and obs.edges[-1] >= data.max()
    # the data fills at least half the range
    assert (data.max() - data.min()) >= 0.5 * (obs.edges[-1] - obs.edges[0]) - 2 * obs.width


def test_growth_only_on_the_side_that_grew():
    rng = np.random.default_rng(2)
    first = np.abs(rng.standard_normal(1000)) + 0.5
    obs = _fed(first, *(np.abs(rng.standard_normal(1000)) * s + 0.5 for s in (5, 30)))
    assert obs.lo == float(first.min())  # no bins wasted below data that only grew upwards
    assert obs.edges[-1] >= obs.max


def test_constant_batches_then_spread():
    obs = _fed(np.full(10, 3.0), np.full(5, 3.0))
    assert obs.width == 0 and obs.hist.sum() == 15
    assert minmax(obs) == (0.0, 3.0)
    obs.update(np.array([-1.0, 5.0]))
    assert obs.hist.sum() == 17 and obs.min == -1.0 and obs.max == 5.0
    assert obs.hist[int((3.0 - obs.lo) / obs.width)] >= 15


def test_memory_does_not_grow():
    rng = np.random.default_rng(3)
    obs = Observer("t", axis=1)
    obs.update(rng.standard_normal((2, 4, 8)))
    after_one = obs.nbytes
    for i in range(99):
        obs.update(rng.standard_normal((2, 4, 8)) * (1 + i))
    assert obs.nbytes == after_one and obs.batches == 100
    assert obs.hist.shape == (2048,)


def test_nonfinite_values_are_counted_and_left_out():
    x = np.array([1.0, -np.inf, 2.0, np.nan, -3.0], dtype=np.float32)
    obs = _fed(x, axis=0)
    assert obs.nonfinite == 2 and obs.count == 3
    assert (obs.min, obs.max) == (-3.0, 2.0)
    assert np.isinf(obs.channel_min[1])  # a channel with no finite value keeps ±inf


def test_minmax_is_exact_and_includes_zero(gauss):
    obs = _fed(gauss)
    assert minmax(obs) == (float(gauss.min()), float(gauss.max()))
    t = float(np.abs(gauss).max())
    assert minmax(obs, symmetric=True) == (-t, t)
    assert minmax(_fed(np.array([2.0, 5.0]))) == (0.0, 5.0)


def test_batch_median_clips_an_extreme_that_few_batches_reach():
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1.0, 2.0, 1000).astype(np.float32) for _ in range(9)]
    batches[3][7] = 40.0  # one outlier in one batch
    batches[5][0] = -30.0
    obs = _fed(*batches)
    assert obs.batch_min == [float(b.min()) for b in batches]
    assert obs.batch_max == [float(b.max()) for b in batches]
    lo, hi = batch_median(obs)
    assert (lo, hi) == (float(np.median([b.min() for b in batches])),
                        float(np.median([b.max() for b in batches])))
    assert -1.0 <= lo < -0.99 and 1.99 < hi <= 2.0  # the outliers are gone, the rest is kept
    assert minmax(obs) == (-30.0, 40.0)
    # the order of the batches does not matter
    assert batch_median(_fed(*batches[::-1])) == (lo, hi)
    t = float(np.median([np.abs(b).max() for b in batches]))
    assert batch_median(obs, symmetric=True) == (-t, t)


def test_batch_median_of_one_batch_is_minmax_and_needs_no_histogram(gauss):
    for histogram in (True, False):
        obs = _fed(gauss, histogram=histogram)
        assert batch_median(obs) == minmax(obs)
        assert batch_median(obs, symmetric=True) == minmax(obs, symmetric=True)
    assert set(HISTOGRAM_FREE) == {"minmax", "batch-median"}
    # 0 stays inside the range; batches with no finite value are left out
    obs = _fed(np.array([2.0, 3.0]), np.array([np.nan, np.inf]), np.array([1.0, 5.0]))
    assert obs.batch_max == [3.0, 5.0] and batch_median(obs) == (0.0, 4.0)
    # a batch larger than one chunk: its extremes span all its chunks
    big = np.zeros(300_000, np.float32)
    big[5], big[-5] = -2.0, 7.0
    assert _fed(big).batch_min == [-2.0] and _fed(big).batch_max == [7.0]


def test_per_channel_minmax():
    x = np.random.default_rng(4).standard_normal((3, 5, 7)).astype(np.float32)
    obs = _fed(x[:2], x[2:], axis=1)
    np.testing.assert_array_equal(obs.channel_min, x.min(axis=(0, 2)))
    np.testing.assert_array_equal(obs.channel_max, x.max(axis=(0, 2)))
    lo, hi = channel_minmax(obs, symmetric=True)
    np.testing.assert_array_equal(hi, np.abs(x).max(axis=(0, 2)))
    np.testing.assert_array_equal(lo, -hi)


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_one_bin(gauss, p):
    obs = _fed(gauss[:50_000], gauss[50_000:] * 1.5)
    data = np.concatenate([gauss[:50_000], gauss[50_000:] * 1.5])
    lo, hi = percentile(obs, p=p)
    ref_lo, ref_hi = np.percentile(data, [100 - p, p])
    assert abs(lo - ref_lo) <= obs.width and abs(hi - ref_hi) <= obs.width
    _, t = percentile(obs, symmetric=True, p=p)
    assert abs(t - np.percentile(np.abs(data), p)) <= obs.width


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_is_narrower_and_better_than_minmax(gauss, symmetric):
    obs = _fed(gauss)
    lo_m, hi_m = minmax(obs, symmetric=symmetric)
    lo, hi = mse(obs, bits=8, symmetric=symmetric)
    assert lo_m < lo < 0 < hi < hi_m
    assert _fq_mse(gauss, lo, hi, 8, symmetric) < _fq_mse(gauss, lo_m, hi_m, 8, symmetric)


def test_mse_on_relu_output_counts_exact_zeros_as_free():
    x = np.maximum(np.random.default_rng(5).laplace(size=100_000), 0).astype(np.float32)
    obs = _fed(x)
    lo, hi = mse(obs, bits=4)
    assert lo == 0.0 and 0 < hi < obs.max
    assert _fq_mse(x, lo, hi, 4) < _fq_mse(x, 0.0, obs.max, 4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_entropy_range_is_finite_and_inside_minmax(gauss, symmetric):
    for x in (gauss, np.maximum(gauss, 0) ** 2):
        obs = _fed(x)
        lo, hi = entropy(obs, bits=8, symmetric=symmetric)
        lo_m, hi_m = minmax(obs, symmetric=symmetric)
        assert np.isfinite([lo, hi]).all() and lo <= 0 <= hi and hi > 0
        assert lo_m <= lo and hi <= hi_m


def test_every_method_handles_degenerate_and_needs_data():
    const = _fed(np.zeros(7))
    for name in RANGE_METHODS:
        assert compute_range(const, name) == (0.0, 0.0)
        with pytest.raises(ValueError, match="no finite values"):
            compute_range(Observer("empty"), name)


def test_unknown_method_is_a_config_error(gauss):
    with pytest.raises(ConfigError, match="unknown range method 'kl'"):
        compute_range(_fed(gauss), "kl")
    with pytest.raises(ConfigError, match="percentile"):
        percentile(_fed(gauss), p=20)


def test_weight_range_minmax_per_tensor_and_per_channel():
    w = np.random.default_rng(6).standard_normal((4, 3, 3, 3)).astype(np.float32)
    lo, hi = weight_range(w)
    assert lo.shape == () and float(hi) == float(np.abs(w).max()) == -float(lo)
    lo, hi = weight_range(w, axis=0, symmetric=False)
    np.testing.assert_array_equal(lo, np.minimum(w.reshape(4, -1).min(1), 0))
    np.testing.assert_array_equal(hi, np.maximum(w.reshape(4, -1).max(1), 0))
    lo, hi = weight_range(w, axis=-1)
    assert hi.shape == (3,)


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_range_mse_per_channel_lowers_error(symmetric):
    rng = np.random.default_rng(7)
    w = rng.laplace(size=(8, 64)) * rng.uniform(0.5, 2, size=(8, 1))
    lo_m, hi_m = weight_range(w, axis=0, bits=4, symmetric=symmetric)
    lo, hi = weight_range(w, axis=0, method="mse", bits=4, symmetric=symmetric)
    assert np.all(hi <= hi_m) and np.all(lo >= lo_m) and np.any(hi < hi_m)
    for c in range(8):
        if symmetric:
            assert _fq_mse(w[c], lo[c], hi[c], 4, True) <= _fq_mse(w[c], lo_m[c], hi_m[c], 4, True)
        else:
            assert _fq_mse(w[c], lo[c], hi[c], 4) <= _fq_mse(w[c], lo_m[c], hi_m[c], 4) * 1.0001
    with pytest.raises(ConfigError, match="weight range method"):
        weight_range(w, method="entropy")


def _reference_histogram(obs: Observer, data: np.ndarray) -> np.ndarray:
    """float64 histogram of ``data`` on the observer's final edges."""
    ref, _ = np.histogram(data.astype(np.float64), bins=obs.edges)
    return ref


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_float32_histogram_equals_a_float64_reference_within_tolerance(dtype):
    """The float32 one-pass binning (chunks, growth between chunks) against np.histogram in float64
    on the same edges: every count is kept, a value moves at most to the neighbouring bin, and
    only values within ~1e-4 bin widths of an edge may move at all."""
    import onnxq.quant.observers as observers

    rng = np.random.default_rng(11)
    batches = [
        (rng.standard_normal(300_001) * s + o).astype(dtype)
        for s, o in [(0.2, 0), (1, 0.5), (2, -1), (0.5, 30), (8, 0)]
    ]
    batches.append(np.maximum(batches[1], 0))  # many exact zeros
    obs = _fed(*batches, sample=None)  # every value binned (the sampled path: tests below)
    data = np.concatenate([b.astype(np.float64) for b in batches])
    ref = _reference_histogram(obs, data)
    assert obs.hist.sum() == ref.sum() == obs.count == data.size
    assert obs.zeros == int(np.count_nonzero(data == 0))
    assert (obs.min, obs.max) == (float(data.min()), float(data.max()))
    # values move by one bin at most: then the cumulative counts differ only by the few values
    # that sit next to each edge, never by a whole bin's worth
    cum_diff = np.abs(np.cumsum(ref) - np.cumsum(obs.hist))
    assert cum_diff.max() <= max(4, 2e-4 * data.size)
    assert np.abs(ref - obs.hist).sum() <= 1e-3 * data.size
    # more values than one chunk went through several chunks
    assert batches[0].size > observers._CHUNK


def test_histogram_growth_between_chunks_of_one_batch_is_exact():
    """A batch whose later chunks widen the range: counts are merged before each growth."""
    import onnxq.quant.observers as observers

    n = observers._CHUNK
    x = np.concatenate([np.linspace(0, 1, n), np.linspace(-5, 40, n), np.linspace(0, 2, n)])
    obs = Observer("t")
    obs.update(np.full(10, 0.5, np.float32))  # a first batch with a narrow (zero-width) range
    obs.update(x.astype(np.float32))
    data = np.concatenate([np.full(10, 0.5), x.astype(np.float32).astype(np.float64)])
    ref = _reference_histogram(obs, data)
    assert obs.hist.sum() == data.size
    assert np.abs(ref - obs.hist).sum() <= 1e-3 * data.size
    assert obs.edges[0] <= -5 and obs.edges[-1] >= 40


def test_nonfinite_values_inside_a_large_batch():
    x = np.random.default_rng(12).standard_normal(300_000).astype(np.float32)
    x[[5, 200_000]] = np.nan
    x[150_000] = -np.inf
    obs = _fed(x, axis=0, sample=None)
    finite = x[np.isfinite(x)].astype(np.float64)
    assert obs.nonfinite == 3 and obs.count == finite.size == obs.hist.sum()
    assert (obs.min, obs.max) == (float(finite.min()), float(finite.max()))
    assert np.abs(_reference_histogram(obs, finite) - obs.hist).sum() <= 1e-3 * finite.size


# -- histograms of large batches from a strided sample ---------------------------------------------
def test_stride_is_one_up_to_the_sample_size_then_a_prime():
    from onnxq.quant.observers import _stride

    assert _stride(1000, 1000) == 1 and _stride(10**6, None) == 1
    assert _stride(1001, 1000) == 2 and _stride(12_845_056, 1 << 18) == 53  # 49 → next prime
    for size in (300_000, 5_000_000, 38_535_168):
        k = _stride(size, 1 << 18)
        assert all(k % d for d in range(2, k)) and size / k <= 1 << 18


def test_sampled_histogram_keeps_exact_extremes_and_unbiased_counts():
    rng = np.random.default_rng(21)
    batches = [np.maximum(rng.standard_normal((8, 16, 56, 56)) * s + o, 0).astype(np.float32)
               for s, o in [(1.0, 0.2), (2.0, -0.5), (0.5, 1.0)]]
    batches[1].reshape(-1)[123_457] = 40.0  # a lone outlier: min / max see it, the sample may not
    batches[2].reshape(-1)[[7, 99_999]] = np.nan
    sampled = _fed(*batches, sample=1 << 15)
    full = _fed(*batches, sample=None)
    assert (sampled.min, sampled.max, sampled.count, sampled.nonfinite) == (
        full.min, full.max, full.count, full.nonfinite)
    assert sampled.max == 40.0
    # every batch weighs by its size: totals match up to the sampling error
    assert abs(sampled.hist.sum() - full.count) < 0.01 * full.count
    assert abs(sampled.zeros - full.zeros) < 0.02 * full.zeros
    # same edges (growth depends on exact extremes only) and the same distribution
    assert (sampled.lo, sampled.width) == (full.lo, full.width)
    cdf_s = np.cumsum(sampled.hist) / sampled.hist.sum()
    cdf_f = np.cumsum(full.hist) / full.hist.sum()
    assert np.abs(cdf_s - cdf_f).max() < 0.01


@pytest.mark.parametrize("method", ["mse", "entropy", "percentile", "sqnr"])
def test_ranges_from_a_sampled_histogram_match_the_full_one(method):
    rng = np.random.default_rng(22)
    batches = [(rng.standard_normal(2_000_000) * 0.7 + rng.laplace(size=2_000_000) * 0.3)
               .astype(np.float32) for _ in range(3)]
    for symmetric in (False, True):
        lo_f, hi_f = RANGE_METHODS[method](_fed(*batches, sample=None), symmetric=symmetric)
        lo_s, hi_s = RANGE_METHODS[method](_fed(*batches, sample=1 << 18), symmetric=symmetric)
        assert abs(lo_s - lo_f) <= 0.03 * (hi_f - lo_f) and abs(hi_s - hi_f) <= 0.03 * (hi_f - lo_f)


def test_a_sample_larger_than_the_batch_bins_every_value():
    x = np.random.default_rng(23).standard_normal(300_000).astype(np.float32)
    a, b = _fed(x, sample=None), _fed(x, sample=300_000)
    np.testing.assert_array_equal(a.hist, b.hist)
    assert a.zeros == b.zeros
    with pytest.raises(ValueError, match="at least 1 value"):
        Observer("t", sample=0)


def test_vectorized_kl_equals_the_direct_computation():
    """The prefix-sum KL of many windows at once against the direct one window at a time,
    including empty regions, end bins that only hold the outside mass, and integer counts."""
    from onnxq.quant.observers import _kl, _KlTable

    rng = np.random.default_rng(24)
    for trial in range(60):
        bins, n = int(rng.integers(300, 2100)), int(rng.choice([128, 256]))
        h = rng.exponential(1, bins) * (rng.random(bins) > rng.random() * 0.5)
        if trial % 3 == 0:
            h[: rng.integers(1, 50)] = 0
        if trial % 5 == 0:
            h = np.round(h * 3)
        prefix = np.concatenate(([0.0], np.cumsum(h)))
        lengths = rng.integers(n, bins + 1, 10)
        starts = np.array([rng.integers(0, bins - L + 1) for L in lengths])
        got = _KlTable(h)(starts, starts + lengths, n)
        want = np.array([_kl(h, prefix, s, s + L, n) for s, L in zip(starts, lengths)])
        assert (np.isfinite(got) == np.isfinite(want)).all()
        ok = np.isfinite(want)
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-9, atol=1e-12)
