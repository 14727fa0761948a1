"""Streaming tensor statistics and range setting (numpy only).

An :class:`Observer` sees a tensor batch after batch and keeps, in memory that does not grow with
the number of batches: the running min / max, the count of finite values (non-finite values, e.g.
the ``-inf`` of an attention mask, are counted and left out), optionally the per-channel min / max
along one axis, and a histogram of ``bins`` equal-width bins.

**One pass, float32.** A batch is read from memory once, in chunks that stay in cache: per chunk
its min / max, then bin indices ``⌊(x − lo)·(1/w)⌋`` computed in float32 and counted with
``np.bincount``, and the count of exact zeros. Counts, extremes and zeros are exact; a value
within about 1e-4 bin widths of an edge may land in the neighbouring bin (float32 rounding of its
position; float64 would cost another pass). Cost on this project's 2-core machine: about 2.5–4 ns
per value with the histogram (the old float64, multi-pass update: 7–8 ns), 0.3 ns for min / max
only.

**Large batches are histogrammed from a sample** (a documented approximation): a batch of more
than :data:`HISTOGRAM_SAMPLE` (2^18) values bins every ``k``-th value only (``k`` the smallest
prime ≥ size / 2^18, a different offset each batch) with weight ``k``; the min / max, the count of
finite values and the histogram's edges stay exact (edges depend on the extremes only). For the
tensors of a CNN at batch 32 (1–40 M values each) this cuts the histogram's cost 5–150× and
leaves ``mse`` / ``entropy`` / ``percentile`` ranges within a few tenths of a percent of the
range (tests/unit/quant/test_observers.py).
``Observer(sample=None)`` bins every value.

**Histogram growth is exact.** The histogram covers ``[lo, lo + bins·w)``. When a chunk falls
outside, the bin width grows by the smallest integer factor ``k`` (``w' = k·w``) and the new left
edge moves by a whole number ``m`` of old bins (``lo' = lo − m·w``), so every old bin lies inside
exactly one new bin (old bin ``i`` → new bin ``(i + m) // k``). Counts are summed, never split:
the result is *exactly* the histogram that all the data seen so far would have on the final edges
(up to float rounding of the edges). Splitting counts proportionally (uniform mass inside an old
bin) would smear the distribution a little at every growth and the errors would add up; the price
of exactness is resolution, since the data always fills at least half of the final range
(``k ≥ 2``: at least ``bins/2`` bins, 1024 of the default 2048, span the data, four per step
of an 8-bit grid). The slack of a growth goes to the side(s) that grew, so a ReLU output that
starts at 0 keeps no bins below 0.

Range setting (``RANGE_METHODS``: name → ``f(obs, bits=8, symmetric=False, **options) -> (lo, hi)``)
reads the histogram with mass uniform inside each bin (the first and last occupied bins clipped to
the exact min / max). Every returned range contains 0, so that 0 is exactly representable and the
zero-point stays on the integer grid; ``symmetric`` ranges are ``(−T, T)``.

- ``minmax``: the running min / max.
- ``batch-median``: the median over the calibration batches of each batch's min and of each batch's
  max (symmetric: of each batch's largest ``|x|``), the robust cousin of onnxruntime's moving-average
  min-max (``CalibMovingAverage``) and TensorFlow's EMA ranges: an extreme that only a few batches
  reach is clipped, one that most batches reach is kept. It needs no histogram (two floats per
  batch), does not depend on the order of the batches, and equals ``minmax`` for one batch. What it
  clips depends on the batch size (a batch's extreme is that of its samples): the same calibration
  set in more, smaller batches clips more.
- ``percentile(p=99.99)``: ``lo, hi`` = the ``100 − p`` and ``p`` percentiles; symmetric:
  ``T`` = the ``p`` percentile of ``|x|``.
- ``mse`` (AIMET's *tf-enhanced* / SQNR idea): minimize over candidate ranges ``[a, b]`` the
  expected squared error ``E(a, b) = n_in(a, b)·s²/12 + γ·(Σ_{x<a}(a − x)² + Σ_{x>b}(x − b)²)``,
  rounding noise of a uniform grid of step ``s`` (``(b − a)/(2^bits − 1)``, symmetric
  ``T/(2^(bits−1) − 1)``) plus clipping error, with moments computed in O(1) per candidate from
  prefix sums over the histogram. ``γ = clip_weight = 1`` is plain MSE; ``sqnr`` is the same with
  γ = 3, as AIMET weighs clipping noise.
  Candidates: a coarse grid of fractions of the extent (linear 1 %…100 % plus geometric
  0.01 %…1 % for heavy tails), then a fine grid around the best.
- ``entropy`` (TensorRT / onnxruntime entropy calibration): for windows of the histogram
  wider than the number of quantized bins ``n``, the reference distribution ``P`` is the window
  with the outside mass added to its end bins, ``Q`` the window merged into ``n`` equal chunks and
  spread back over the non-empty bins; the window minimizing ``KL(P‖Q)`` wins. Symmetric: windows
  ``[0, T)`` of the ``|x|`` histogram, ``n = 2^(bits−1)``; one-signed data: the same with
  ``n = 2^bits``; mixed signs, asymmetric: windows around 0 that keep the data's ratio of negative to
  positive extent, ``n = 2^bits``. When ``n`` reaches the number of bins the range is min-max.

:func:`weight_range` sets weight ranges per tensor or per channel, min-max or MSE (exact
fake-quantization error over a grid of clip ratios, vectorized across channels).
"""

from __future__ import annotations

__all__ = [
    "HISTOGRAM_FREE",
    "HISTOGRAM_SAMPLE",
    "RANGE_METHODS",
    "Observer",
    "batch_median",
    "channel_minmax",
    "compute_range",
    "entropy",
    "minmax",
    "mse",
    "percentile",
    "sqnr",
    "weight_range",
]

import math
import threading
from collections.abc import Callable

import numpy as np

from onnxq.errors import ConfigError
from onnxq.quant.qparams import fake_quantize, qrange

#: elements per step: a chunk, its float32 bin positions and its integer bin indices stay in
#: cache between the passes over it (the chunk is read from memory once)
_CHUNK = 1 << 17
#: default :attr:`Observer.sample`: values per batch that a histogram takes at most (about)
HISTOGRAM_SAMPLE = 1 << 18


def _stride(size: int, sample: int | None) -> int:
    """The histogram stride for a batch of ``size`` values: 1 up to ``sample`` values, else the
    smallest prime ``p ≥ size / sample`` (a prime shares no factor with the tensor's dimensions
    beyond itself, so the sample does not fall on one channel or one column)."""
    if sample is None or size <= sample:
        return 1
    p = max(2, -(-size // sample))
    while any(p % d == 0 for d in range(2, int(p**0.5) + 1)):
        p += 1
    return p


class _Scratch(threading.local):
    """Per-thread work buffers of :data:`_CHUNK` elements."""

    def __init__(self) -> None:
        self.position = np.empty(_CHUNK, np.float32)
        self.index = np.empty(_CHUNK, np.intp)
        self.is_zero = np.empty(_CHUNK, np.bool_)


_SCRATCH = _Scratch()


class Observer:
    """Running min / max and a fixed-size histogram of one tensor; optional per-channel min / max.

    ``axis``: also keep the min / max of every slice along this axis (``channel_min``,
    ``channel_max``). Memory is ``bins`` int64 counts plus two arrays per channel, whatever the
    number of batches.

    **Cost.** A batch is read from memory once, in cache-sized chunks; per chunk: min / max, then
    (histogram) float32 bin positions ``(x − lo)·(1/w)``, truncation to integer indices,
    ``np.bincount``, and a count of exact zeros. The histogram is re-binned (an exact merge of its
    ``bins`` counts) only when a chunk falls outside its range, which then grows by an integer
    factor; the first batch sets the range from its own min / max. Counts, min, max and the
    number of zeros are exact; a value within about 1e-4 bin widths of an edge may land in either
    neighbouring bin (float32 positions).
    """

    def __init__(
        self, name: str = "", bins: int = 2048, axis: int | None = None, histogram: bool = True,
        sample: int | None = HISTOGRAM_SAMPLE,
    ) -> None:
        if bins < 16:
            raise ValueError(f"an observer needs at least 16 bins, got {bins}")
        if sample is not None and sample < 1:
            raise ValueError(f"a histogram sample needs at least 1 value, got {sample}")
        self.name = name
        #: False keeps only min / max (enough for the minmax method, and much cheaper)
        self.histogram = histogram
        #: a batch with more values than this is histogrammed from an evenly strided sample of
        #: about this many values (counts weighted by the stride); None: every value
        self.sample = sample
        self.bins = int(bins)
        self.axis = axis
        self.batches = 0
        self.count = 0  # finite values observed
        self.nonfinite = 0  # NaN / ±Inf values seen and left out
        self.zeros = 0  # values exactly 0 (quantized without error on any grid that holds 0)
        self.min = math.inf
        self.max = -math.inf
        self.hist = np.zeros(self.bins, dtype=np.int64)
        self.lo = 0.0  # left edge of the histogram
        self.width = 0.0  # bin width; 0 while every value seen is the same number (all at ``lo``)
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None
        #: the min / max of the finite values of every batch (two floats per batch), in order
        self.batch_min: list[float] = []
        self.batch_max: list[float] = []
        self._bmin, self._bmax = math.inf, -math.inf
        self._pieces = 0
        self._recorded = False
        self._start: tuple[float, float] | None = None

    # -- accumulation ---------------------------------------------------------------------------
    def start_range(self, lo: float, hi: float) -> None:
        """The range the histogram starts from, given before any value: e.g. the extremes of a
        first batch that arrives in pieces, so that the histogram's bins are those the whole
        batch would have set (a first piece alone would set narrower ones, and every growth
        after that costs resolution). Ignored once values were observed or for non-finite
        bounds."""
        if self.count == 0 and math.isfinite(lo) and math.isfinite(hi) and lo <= hi:
            self._start = (float(lo), float(hi))

    def update(self, x: np.ndarray, *, continues: bool = False, sample: int | None = -1) -> None:
        """Add one batch (any shape; NaN / ±Inf values are counted and left out).

        ``continues=True``: ``x`` is another piece of the batch given to the previous call (a
        batch run in pieces): the number of batches and the per-batch extremes that
        ``batch-median`` reads stay those of whole batches. ``sample``: the histogram sample
        for this call instead of :attr:`sample` (a piece of a batch takes its share of it).
        """
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{self._label()}: cannot observe values of dtype {x.dtype}")
        if self.axis is not None:
            self._channel_axis(x)  # validate before any state changes
        if not (continues and self.batches):
            self.batches += 1
            self._pieces = 0
            self._bmin, self._bmax = math.inf, -math.inf
            self._recorded = False  # this batch has no entry in batch_min / batch_max yet
        self._pieces += 1
        if x.size == 0:
            return
        flat = x.reshape(-1)
        if self.histogram and self.count == 0:
            mn, mx = flat.min(), flat.max()
            if math.isfinite(mn) and math.isfinite(mx):
                if self._start is not None:
                    mn, mx = min(mn, self._start[0]), max(mx, self._start[1])
                self._grow(float(mn), float(mx))  # the first batch's range, not its first chunk's
        nonfinite = 0
        counts = np.zeros(self.bins + 2, np.int64) if self.histogram else None
        step = _stride(flat.size, self.sample if sample == -1 else sample) if self.histogram else 1
        # a different offset each batch and piece (deterministic)
        phase = (self.batches * 7919 + (self._pieces - 1) * 104729) % step
        for start in range(0, flat.size, _CHUNK):
            nonfinite += self._chunk(
                flat[start : start + _CHUNK], counts, step, (phase - start) % step
            )
        if self._bmin <= self._bmax:  # the batch had finite values
            if self._recorded:
                self.batch_min[-1], self.batch_max[-1] = self._bmin, self._bmax
            else:
                self.batch_min.append(self._bmin)
                self.batch_max.append(self._bmax)
                self._recorded = True
        if counts is not None:
            self._flush(counts)
        if self.axis is not None:
            self._update_channels(x, np.isfinite(x) if nonfinite else None)
        self.nonfinite += nonfinite

    def _chunk(
        self, part: np.ndarray, counts: np.ndarray | None, step: int = 1, offset: int = 0
    ) -> int:
        """Add one chunk; returns how many of its values were NaN / ±Inf (left out). The
        histogram takes ``part[offset::step]`` with weight ``step`` (min / max take all)."""
        mn, mx = part.min(), part.max()
        nonfinite = 0
        sample = part if step == 1 else part[offset::step]
        if not (math.isfinite(mn) and math.isfinite(mx)):
            finite = np.isfinite(part)
            kept = int(np.count_nonzero(finite))
            nonfinite = part.size - kept
            if kept == 0:
                return nonfinite
            part = part[finite]
            sample = part if step == 1 else sample[np.isfinite(sample)]
            mn, mx = part.min(), part.max()
        mn, mx = float(mn), float(mx)
        if counts is not None:
            if self.width == 0.0 or mn < self.lo or mx > self.lo + self.width * self.bins:
                self._flush(counts)  # pending counts are on the current edges
                self._grow(mn, mx)
            if self.width == 0.0:  # every value so far equals lo
                self.hist[0] += part.size
                self.zeros += part.size if mn == 0.0 else 0
            elif sample.size:
                self._bin(sample, counts, count_zeros=mn <= 0.0 <= mx, weight=step)
        self.count += part.size
        self.min, self.max = min(self.min, mn), max(self.max, mx)
        self._bmin, self._bmax = min(self._bmin, mn), max(self._bmax, mx)
        return nonfinite

    def _bin(
        self, part: np.ndarray, counts: np.ndarray, count_zeros: bool, weight: int = 1
    ) -> None:
        """Add the bin counts of ``part`` (inside the current range) to ``counts`` (``bins + 2``
        long: float32 rounding may put a value at the top edge one or two bins further)."""
        scratch = _SCRATCH
        n = part.size
        # float32 left edge at or below the float64 one, so no position is below -1
        lo32 = np.float32(self.lo)
        if float(lo32) > self.lo:
            lo32 = np.nextafter(lo32, np.float32(-np.inf))
        pos = scratch.position[:n]
        idx = scratch.index[:n]
        np.subtract(part, lo32, out=pos, casting="same_kind")
        np.multiply(pos, np.float32(1.0 / self.width), out=pos)
        np.copyto(idx, pos, casting="unsafe")  # truncation = floor for positions > -1
        bins = self.bins
        chunk = np.bincount(idx, minlength=bins + 2)
        if chunk.size > bins + 2:
            chunk[bins + 1] += chunk[bins + 2 :].sum()
        if weight != 1:
            chunk *= weight
        counts += chunk[: bins + 2]
        if count_zeros:
            is_zero = scratch.is_zero[:n]
            np.equal(part, 0, out=is_zero)
            self.zeros += int(np.count_nonzero(is_zero)) * weight

    def _flush(self, counts: np.ndarray) -> None:
        """Move pending chunk counts into the histogram (the top overflow into the last bin)."""
        bins = self.bins
        counts[bins - 1] += counts[bins] + counts[bins + 1]
        self.hist += counts[:bins]
        counts[:] = 0

    def _channel_axis(self, x: np.ndarray) -> int:
        if x.ndim == 0:
            raise ValueError(f"{self._label()}: per-channel axis {self.axis} given for a scalar")
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        if not 0 <= axis < x.ndim:
            raise ValueError(
                f"{self._label()}: per-channel axis {self.axis} is out of range for rank {x.ndim}"
            )
        if self.channel_min is not None and x.shape[axis] != self.channel_min.size:
            raise ValueError(
                f"{self._label()}: {x.shape[axis]} channels along axis {self.axis}, "
                f"earlier batches had {self.channel_min.size}"
            )
        return axis

    def _update_channels(self, x: np.ndarray, finite: np.ndarray | None) -> None:
        axis = self._channel_axis(x)
        others = tuple(i for i in range(x.ndim) if i != axis)
        if finite is None:
            cmin, cmax = x.min(axis=others), x.max(axis=others)
        else:
            cmin = np.where(finite, x, np.inf).min(axis=others)
            cmax = np.where(finite, x, -np.inf).max(axis=others)
        cmin, cmax = cmin.astype(np.float64), cmax.astype(np.float64)
        if self.channel_min is None:
            self.channel_min, self.channel_max = cmin, cmax
            return
        if cmin.shape != self.channel_min.shape:
            raise ValueError(
                f"{self._label()}: {cmin.size} channels along axis {self.axis}, "
                f"earlier batches had {self.channel_min.size}"
            )
        np.minimum(self.channel_min, cmin, out=self.channel_min)
        np.maximum(self.channel_max, cmax, out=self.channel_max)

    def _grow(self, mn: float, mx: float) -> None:
        """Make the histogram cover ``[mn, mx]`` (exact integer-factor merge, see module doc)."""
        if self.count == 0:
            self.lo, self.width = mn, (mx - mn) / self.bins
            return
        if self.width == 0.0:  # all earlier mass sits at lo: start a real histogram
            if mn == mx == self.lo:
                return
            point, mass = self.lo, self.hist[0]
            self.hist[0] = 0
            self.lo = min(mn, point)
            self.width = (max(mx, point) - self.lo) / self.bins
            i = min(int((point - self.lo) / self.width), self.bins - 1)
            self.hist[i] += mass
            return
        w, b = self.width, self.bins
        hi = self.lo + w * b
        if mn >= self.lo and mx <= hi:
            return
        below = math.ceil((self.lo - mn) / w) if mn < self.lo else 0
        above = math.ceil((mx - hi) / w) if mx > hi else 0
        need = b + below + above  # in old bins
        k = -(-need // b)
        slack = k * b - need
        if below and above:
            m = below + slack // 2
        elif below:
            m = below + slack
        else:
            m = below
        new_index = (np.arange(b, dtype=np.int64) + m) // k
        self.hist = np.bincount(new_index, weights=self.hist, minlength=b).astype(np.int64)
        self.lo -= m * w
        self.width = k * w

    # -- views ----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics (constant in the number of batches)."""
        total = self.hist.nbytes
        if self.channel_min is not None:
            total += self.channel_min.nbytes + self.channel_max.nbytes
        return total

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` histogram edges."""
        return self.lo + self.width * np.arange(self.bins + 1, dtype=np.float64)

    def _label(self) -> str:
        return f"tensor '{self.name}'" if self.name else "observer"

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError(f"{self._label()}: no finite values observed")

    def _zero_bin(self) -> int:
        return min(max(math.floor(-self.lo / self.width), 0), self.bins - 1)

    def _clipped_edges(self) -> np.ndarray:
        """Edges clamped to the exact [min, max]: mass is uniform on the clamped bins."""
        return np.clip(self.edges, self.min, self.max)

    def __repr__(self) -> str:
        return (
            f"Observer({self.name!r}, min={self.min:.6g}, max={self.max:.6g}, count={self.count}, "
            f"batches={self.batches}, bins={self.bins})"
        )


# -- helpers on the histogram --------------------------------------------------------------------
def _with_zero(lo: float, hi: float) -> tuple[float, float]:
    return float(min(lo, 0.0)), float(max(hi, 0.0))


def _degenerate(obs: Observer) -> bool:
    return obs.width == 0.0 or obs.max <= obs.min


def _cdf(obs: Observer, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-linear CDF: (x at clamped edges, count below x)."""
    xs = obs._clipped_edges()
    counts = obs.hist if counts is None else counts
    cum = np.concatenate(([0.0], np.cumsum(counts, dtype=np.float64)))
    return xs, cum


def _cdf_at(obs: Observer, t: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Count of values below each ``t`` (uniform mass inside bins)."""
    xs, cum = _cdf(obs, counts)
    # np.interp needs increasing xp: drop the zero-width bins at the clamped ends
    keep = np.concatenate(([True], np.diff(xs) > 0))
    return np.interp(t, xs[keep], cum[keep], left=0.0, right=cum[-1])


def _nonzero_counts(obs: Observer) -> np.ndarray:
    """Histogram counts without the exact zeros (which quantize without error)."""
    c = obs.hist.astype(np.float64)
    if obs.zeros:
        z = obs._zero_bin()
        c[z] = max(c[z] - obs.zeros, 0.0)
    return c


def _inverse_cdf(xs: np.ndarray, cum: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Smallest x with CDF(x) = target, linear inside each bin."""
    targets = np.asarray(targets, dtype=np.float64)
    j = np.clip(np.searchsorted(cum, targets, side="left"), 1, len(cum) - 1)
    c0, c1 = cum[j - 1], cum[j]
    frac = np.where(c1 > c0, (targets - c0) / np.where(c1 > c0, c1 - c0, 1.0), 0.0)
    return xs[j - 1] + np.clip(frac, 0.0, 1.0) * (xs[j] - xs[j - 1])


def _abs_cdf_points(obs: Observer) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints t and G(t) = count of |x| < t (exact under the uniform-in-bin model)."""
    xs, _ = _cdf(obs)
    t = np.unique(np.concatenate(([0.0], np.abs(xs))))
    g = _cdf_at(obs, t) - _cdf_at(obs, -t)
    return t, np.maximum.accumulate(np.maximum(g, 0.0))


# -- range methods --------------------------------------------------------------------------------
def minmax(obs: Observer, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
    """Running min / max (with 0 included); symmetric: ``±max|x|``."""
    obs._require_data()
    if symmetric:
        t = max(abs(obs.min), abs(obs.max))
        return -t, t
    return _with_zero(obs.min, obs.max)


def batch_median(obs: Observer, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
    """Median over batches of each batch's min / max (with 0 included); symmetric: ``±`` the
    median of each batch's largest ``|x|`` (module doc)."""
    obs._require_data()  # finite values seen: at least one batch has its extremes recorded
    lo, hi = np.asarray(obs.batch_min), np.asarray(obs.batch_max)
    if symmetric:
        t = float(np.median(np.maximum(-lo, hi)))
        return -t, t
    return _with_zero(float(np.median(lo)), float(np.median(hi)))


def percentile(
    obs: Observer, bits: int = 8, symmetric: bool = False, p: float = 99.99
) -> tuple[float, float]:
    """Clip at the ``p`` percentile (and ``100 − p`` below); symmetric: ``p`` percentile of |x|."""
    obs._require_data()
    if not 50.0 < p <= 100.0:
        raise ConfigError(f"percentile must be in (50, 100], got {p}")
    if _degenerate(obs):
        return minmax(obs, bits, symmetric)
    if symmetric:
        t, g = _abs_cdf_points(obs)
        thr = float(_inverse_cdf(t, g, g[-1] * p / 100.0))
        return -thr, thr
    xs, cum = _cdf(obs)
    lo, hi = _inverse_cdf(xs, cum, cum[-1] * np.array([1.0 - p / 100.0, p / 100.0]))
    return _with_zero(max(float(lo), obs.min), min(float(hi), obs.max))


class _Moments:
    """Mass, Σx and Σx² of the observed distribution below any t, in O(log bins) per query."""

    def __init__(self, obs: Observer) -> None:
        xs = obs._clipped_edges()
        self.l, self.r = xs[:-1], xs[1:]
        c = _nonzero_counts(obs)  # exact zeros cost nothing: no rounding noise, never clipped
        self.c = c
        zero = np.zeros(1)
        self.p0 = np.concatenate((zero, np.cumsum(c)))
        self.p1 = np.concatenate((zero, np.cumsum(c * (self.l + self.r) / 2)))
        self.p2 = np.concatenate(
            (zero, np.cumsum(c * (self.l**2 + self.l * self.r + self.r**2) / 3))
        )
        self.total = (self.p0[-1], self.p1[-1], self.p2[-1])

    def below(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        j = np.searchsorted(self.r, t, side="right")  # bins entirely below t
        m0, m1, m2 = self.p0[j], self.p1[j], self.p2[j]
        jj = np.minimum(j, len(self.c) - 1)
        l, r, c = self.l[jj], self.r[jj], self.c[jj]
        width = r - l
        inside = (j < len(self.c)) & (width > 0) & (t > l)
        frac = np.where(inside, (t - l) / np.where(width > 0, width, 1.0), 0.0)
        part = c * np.clip(frac, 0.0, 1.0)
        return (
            m0 + part,
            m1 + part * (l + t) / 2,
            m2 + part * (l * l + l * t + t * t) / 3,
        )

    def error(
        self, a: np.ndarray, b: np.ndarray, step: np.ndarray, clip_weight: float
    ) -> np.ndarray:
        a0, a1, a2 = self.below(a)
        b0, b1, b2 = self.below(b)
        t0, t1, t2 = self.total
        clip_lo = a * a * a0 - 2 * a * a1 + a2
        clip_hi = (t2 - b2) - 2 * b * (t1 - b1) + b * b * (t0 - b0)
        inside = b0 - a0
        return inside * step * step / 12.0 + clip_weight * (
            np.maximum(clip_lo, 0.0) + np.maximum(clip_hi, 0.0)
        )


_COARSE = np.unique(np.concatenate((np.geomspace(1e-4, 1e-2, 20), np.linspace(0.01, 1.0, 100))))


def _refine(best: float) -> np.ndarray:
    """Fractions around ``best``, between its coarse neighbours."""
    i = int(np.searchsorted(_COARSE, best))
    lo = _COARSE[max(i - 1, 0)]
    hi = _COARSE[min(i + 1, len(_COARSE) - 1)]
    return np.unique(np.clip(np.linspace(lo, hi, 41), 1e-6, 1.0))


def mse(
    obs: Observer, bits: int = 8, symmetric: bool = False, clip_weight: float = 1.0
) -> tuple[float, float]:
    """Range minimizing rounding noise + ``clip_weight`` × clipping error (see module doc)."""
    obs._require_data()
    if _degenerate(obs):
        return minmax(obs, bits, symmetric)
    mom = _Moments(obs)
    if symmetric:
        amax = max(abs(obs.min), abs(obs.max))
        levels = 2 ** (bits - 1) - 1

        def cost(f: np.ndarray) -> np.ndarray:
            t = f * amax
            return mom.error(-t, t, t / levels, clip_weight)

        f = _COARSE[np.argmin(cost(_COARSE))]
        fine = _refine(f)
        f = fine[np.argmin(cost(fine))]
        return -float(f * amax), float(f * amax)

    lo0, hi0 = _with_zero(obs.min, obs.max)
    levels = 2**bits - 1

    def cost2(fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
        a = lo0 * fa[:, None]
        b = hi0 * fb[None, :]
        step = np.maximum(b - a, 1e-300) / levels
        return mom.error(a, b, step, clip_weight)

    ca = _COARSE if lo0 < 0 else np.ones(1)
    cb = _COARSE if hi0 > 0 else np.ones(1)
    e = cost2(ca, cb)
    i, j = np.unravel_index(np.argmin(e), e.shape)
    fa = _refine(ca[i]) if lo0 < 0 else ca
    fb = _refine(cb[j]) if hi0 > 0 else cb
    e = cost2(fa, fb)
    i, j = np.unravel_index(np.argmin(e), e.shape)
    return float(lo0 * fa[i]), float(hi0 * fb[j])


def sqnr(obs: Observer, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
    """AIMET's tf-enhanced weighting: :func:`mse` with clipping error counted 3×."""
    return mse(obs, bits, symmetric, clip_weight=3.0)


def _resample(obs: Observer, edges: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``counts`` (on the observer's bins) moved to other edges (uniform mass inside bins)."""
    return np.diff(_cdf_at(obs, edges, counts))


def _kl(hist: np.ndarray, prefix: np.ndarray, start: int, end: int, n: int) -> float:
    sliced = hist[start:end]
    p = sliced.copy()
    p[0] += prefix[start]
    p[-1] += prefix[-1] - prefix[end]
    length = end - start
    chunk = np.minimum(np.arange(length) // (length // n), n - 1)
    nonzero = p > 0
    qsum = np.bincount(chunk, weights=sliced, minlength=n)
    qnz = np.bincount(chunk, weights=nonzero, minlength=n)
    q = np.where(nonzero, qsum[chunk] / np.maximum(qnz[chunk], 1.0), 0.0)
    if q.sum() <= 0:
        return math.inf
    p = p[nonzero] / p.sum()
    q = q[nonzero] / q.sum()
    q = np.where(q > 0, q, 1e-12)
    return float(np.sum(p * np.log(p / q)))


class _KlTable:
    """KL(P‖Q) of many windows of one histogram at once, from prefix sums (what :func:`_kl`
    computes for one window, in O(n) per window instead of O(window) with Python overhead).

    Inside chunk ``j`` of a window every nonzero bin of P gets ``Q = qsum_j / qnz_j`` (then
    normalized), so ``Σ P log Q = Σ_j P_j log(qsum_j / (qnz_j·Σq))`` with per-chunk masses from
    prefix sums; ``Σ P log P`` comes from a prefix sum of ``h log h`` with the two end bins
    (which also hold the mass outside the window) replaced."""

    def __init__(self, hist: np.ndarray) -> None:
        self.h = np.asarray(hist, np.float64)
        zero = np.zeros(1)
        self.c = np.concatenate((zero, np.cumsum(self.h)))
        self.nz = np.concatenate((zero, np.cumsum(self.h > 0)))
        self.hlogh = np.concatenate((zero, np.cumsum(_xlogx(self.h))))

    def __call__(self, starts: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
        h, c, nz = self.h, self.c, self.nz
        starts = np.asarray(starts, np.int64)[:, None]
        ends = np.asarray(ends, np.int64)[:, None]
        m = (ends - starts) // n
        j = np.arange(n)[None, :]
        a = starts + j * m
        b = np.where(j == n - 1, ends, a + m)
        qsum = c[b] - c[a]
        qnz = nz[b] - nz[a]
        s, e = starts[:, 0], ends[:, 0]
        below, above = c[s], c[-1] - c[e]
        first, last = h[s], h[e - 1]
        p_first, p_last = first + below, last + above
        qnz[:, 0] += (p_first > 0).astype(np.float64) - (first > 0)
        qnz[:, -1] += (p_last > 0).astype(np.float64) - (last > 0)
        pmass = qsum.copy()
        pmass[:, 0] += below
        pmass[:, -1] += above
        total = c[-1]
        qtotal = np.where(qnz > 0, qsum, 0.0).sum(axis=1)
        plogp = (self.hlogh[e] - self.hlogh[s] - _xlogx(first) - _xlogx(last)
                 + _xlogx(p_first) + _xlogx(p_last))
        with np.errstate(divide="ignore", invalid="ignore"):
            qval = np.where(
                qsum > 0, qsum / (np.maximum(qnz, 1.0) * qtotal[:, None]), 1e-12
            )
            cross = np.where(pmass > 0, pmass * np.log(qval), 0.0).sum(axis=1)
        kl = (plogp - cross) / total - math.log(total)
        return np.where(qtotal > 0, kl, math.inf)


def _xlogx(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _kl_search(
    hist: np.ndarray, n: int, windows: Callable[[int], tuple[int, int]], total: int
) -> int:
    """The window size (in bins, ``n`` … ``total``) whose window minimizes KL(P‖Q)."""
    table = _KlTable(hist)

    def scores(sizes: list[int]) -> np.ndarray:
        bounds = np.array([windows(size) for size in sizes], np.int64).reshape(-1, 2)
        return table(bounds[:, 0], bounds[:, 1], n)

    stride = max(1, (total - n) // 256)
    sizes = list(range(n, total + 1, stride))
    if sizes[-1] != total:
        sizes.append(total)
    best = sizes[int(np.argmin(scores(sizes)))]
    if stride > 1:
        fine = list(range(max(n, best - stride + 1), min(total, best + stride - 1) + 1))
        best = fine[int(np.argmin(scores(fine)))]
    return best


def entropy(obs: Observer, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
    """Range minimizing KL(P‖Q) between the histogram and its quantized version (module doc)."""
    obs._require_data()
    if _degenerate(obs):
        return minmax(obs, bits, symmetric)
    bins = obs.bins
    one_signed = obs.min >= 0 or obs.max <= 0
    if symmetric or one_signed:
        n = 2 ** (bits - 1) if symmetric else 2**bits
        amax = max(abs(obs.min), abs(obs.max))
        if n >= bins:
            return minmax(obs, bits, symmetric)
        t_edges = np.linspace(0.0, amax, bins + 1)
        counts = _nonzero_counts(obs)
        hist = _resample(obs, t_edges, counts) + _resample(obs, -t_edges[::-1], counts)[::-1]
        size = _kl_search(hist, n, lambda s: (0, s), bins)
        t = float(t_edges[size])
        if symmetric:
            return -t, t
        return (0.0, t) if obs.max > 0 else (-t, 0.0)
    n = 2**bits
    if n >= bins:
        return minmax(obs, bits, symmetric)
    w = (obs.max - obs.min) / bins
    neg, pos = math.ceil(-obs.min / w), math.ceil(obs.max / w)
    edges = w * np.arange(-neg, pos + 1, dtype=np.float64)
    hist = _resample(obs, edges, _nonzero_counts(obs))
    total = neg + pos

    def window(size: int) -> tuple[int, int]:
        k = min(max(round(size * neg / total), 0), neg)
        return neg - k, min(neg - k + size, total)

    start, end = window(_kl_search(hist, n, window, total))
    return _with_zero(float(edges[start]), float(edges[end]))


RangeMethod = Callable[..., tuple[float, float]]

#: range methods that need only the min / max of every batch (no histogram)
HISTOGRAM_FREE = ("minmax", "batch-median")

#: name → ``f(observer, bits=8, symmetric=False, **options) -> (lo, hi)``
RANGE_METHODS: dict[str, RangeMethod] = {
    "minmax": minmax,
    "batch-median": batch_median,
    "percentile": percentile,
    "mse": mse,
    "sqnr": sqnr,
    "entropy": entropy,
}


def compute_range(
    obs: Observer, method: str = "minmax", bits: int = 8, symmetric: bool = False, **options
) -> tuple[float, float]:
    """Look ``method`` up in :data:`RANGE_METHODS` and apply it to ``obs``."""
    try:
        fn = RANGE_METHODS[method]
    except KeyError:
        raise ConfigError(
            f"unknown range method '{method}'; choose one of {', '.join(RANGE_METHODS)}"
        ) from None
    return fn(obs, bits=bits, symmetric=symmetric, **options)


def channel_minmax(obs: Observer, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (lo, hi) arrays from an observer created with ``axis`` (0 included)."""
    if obs.channel_min is None:
        raise ValueError(f"{obs._label()}: no per-channel statistics (create it with axis=...)")
    lo = np.minimum(obs.channel_min, 0.0)
    hi = np.maximum(obs.channel_max, 0.0)
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    return lo, hi


# -- weights ---------------------------------------------------------------------------------------
_WEIGHT_SAMPLE = 1 << 18  # elements used by the MSE search (all channels together)
_WEIGHT_COARSE = np.unique(np.concatenate((np.geomspace(0.01, 0.2, 12), np.linspace(0.2, 1.0, 33))))


def weight_range(
    w: np.ndarray,
    axis: int | None = None,
    method: str = "minmax",
    bits: int = 8,
    symmetric: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of a weight: 0-d arrays per tensor, ``(C,)`` arrays per channel along ``axis``.

    ``minmax``: the extremes (0 included; symmetric ``±max|w|``). ``mse``: the extremes scaled by the
    clip ratio (one per channel) minimizing the exact squared fake-quantization error of the
    weight, searched on a coarse grid of ratios then refined around each channel's best; symmetric
    grids are strict (``±(2^(bits−1) − 1)``, as onnxruntime quantizes symmetric weights). Large
    weights are searched on a fixed subsample of ≤ 2^18 elements (at least 256 per channel).
    """
    if method not in ("minmax", "mse"):
        raise ConfigError(f"unknown weight range method '{method}'; choose minmax or mse")
    w = np.asarray(w)
    if axis is None:
        flat = w.reshape(1, -1)
    else:
        if not -w.ndim <= axis < w.ndim:
            raise ValueError(f"axis {axis} out of range for a weight of rank {w.ndim}")
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    flat = flat.astype(np.float64)
    if flat.size == 0:
        raise ValueError("empty weight")
    lo = np.minimum(flat.min(axis=1), 0.0)
    hi = np.maximum(flat.max(axis=1), 0.0)
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    if method == "mse":
        ratio = _weight_mse_ratio(flat, lo, hi, bits, symmetric)
        lo, hi = lo * ratio, hi * ratio
    if axis is None:
        return lo.reshape(()), hi.reshape(())
    return lo, hi


def _weight_mse_ratio(
    flat: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool
) -> np.ndarray:
    channels, k = flat.shape
    keep = max(256, _WEIGHT_SAMPLE // channels)
    if k > keep:
        cols = np.sort(np.random.default_rng(0).choice(k, keep, replace=False))
        flat = flat[:, cols]
    rng = qrange(bits, signed=True, strict=True) if symmetric else qrange(bits, signed=False)

    def errors(ratio: np.ndarray) -> np.ndarray:
        """Squared error per channel for each ratio: ratio (R, C) or (R, 1) → (R, C)."""
        out = np.empty((ratio.shape[0], channels))
        for i, r in enumerate(ratio):
            a, b = lo * r, hi * r
            if symmetric:
                scale = np.maximum(b / rng.qmax, 1e-12)
                zp = np.zeros_like(scale)
            else:
                scale = np.maximum((b - a) / (rng.qmax - rng.qmin), 1e-12)
                zp = np.clip(np.rint(rng.qmin - a / scale), rng.qmin, rng.qmax)
            fq = fake_quantize(flat, scale[:, None], zp[:, None], rng)
            out[i] = np.square(fq - flat).sum(axis=1)
        return out

    coarse = _WEIGHT_COARSE
    err = errors(np.broadcast_to(coarse[:, None], (len(coarse), channels)))
    best = np.argmin(err, axis=0)
    lo_r = coarse[np.maximum(best - 1, 0)]
    hi_r = coarse[np.minimum(best + 1, len(coarse) - 1)]
    fine = lo_r[None, :] + (hi_r - lo_r)[None, :] * np.linspace(0.0, 1.0, 17)[:, None]
    candidates = np.concatenate((coarse[best][None, :], fine))
    err = errors(candidates)
    return candidates[np.argmin(err, axis=0), np.arange(channels)]
