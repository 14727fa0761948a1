"""Activation statistics: one onnxruntime session, every needed intermediate exposed, batches streamed.

:func:`collect_statistics` makes the requested values the model's graph outputs just long enough
to build **one** onnxruntime session from it (its own outputs are put back; weights are shared
with the session, not serialized: :func:`onnxq.runtime.session.session_from_model`), with
optimizations on: graph outputs are never fused away, so every exposed value is the value of the
graph node that produces it. Batches from :func:`onnxq.runtime.data.as_batches` run one at a
time; each output updates its :class:`~onnxq.quant.observers.Observer` (running min / max,
fixed-size histogram) before the next batch runs, so memory stays at one batch of activations
plus ``bins`` counts per tensor whatever the number of samples. Requested model inputs are
observed straight from the feeds.

**Cost.** While the input shapes stay the same, the outputs are written into the same buffers
batch after batch (an onnxruntime I/O binding to the arrays of the first batch): no new
allocation, no page faults on hundreds of MB per batch. The session's worker threads do not spin
between runs (``session.intra_op.allow_spinning = 0``) and the observers of one batch are updated
by a small thread pool (numpy releases the GIL), so they share the cores. Measured on this
project's 2-core machine (EfficientNet-Lite0, 256 images; PP-OCR rec, 150 lines; MiniLM, 128
texts), the min / max pass, session build included, costs 2.0x, 2.2x and 1.7x FP32 inference
(2.0-2.4x and 2.8x while the session was built from a clone with serialized weights, a fixed
0.45 s that was half of MiniLM's pass); computing min / max inside the graph instead
(ReduceMin / ReduceMax, plus a ReduceSum to see NaN, which onnxruntime's ReduceMin skips) was no
faster (2.2x without the sum, 2.5x with it) and is not used.

**Pieces.** A batch whose observed tensors would take more than ``piece_mb`` (256 MB) per run
is run in pieces of fewer samples along its first axis, when that axis is a batch axis (checked
once, on two samples: see :class:`_Pieces`); the observers still count whole batches (what
``batch-median`` reads) and each piece takes its share of the histogram sample; when histograms
are kept, the first batch's pieces run once more beforehand (min / max only) so that every
histogram starts on the whole first batch's range, as it would unpieced (started on a first
piece's narrower range, it grows more and keeps fewer bins on the data: PP-OCR rec's entropy
ranges moved by up to 40 % and its CER went from 0.63 % to 3.5 %). Measured on this
project's 2-core machine, peak resident memory of the statistics pass: EfficientNet-Lite0 (8
batches of 32, 26.5 MB observed per image) 2378 → 889 MiB, PP-OCR rec (25 batches of 6 lines,
106 MB per line) 4332 → 2102 MiB, at the same or slightly better speed (min / max on
EfficientNet-Lite0 about 10 % faster; pieces of one PP-OCR line, ``piece_mb=128``, need 1165 MiB
but run 10 % slower). MiniLM (10 MB per sentence, batches of 16) runs whole batches.

Histograms of large batches are built from a strided sample (``sample``; min / max stay exact,
see :mod:`onnxq.quant.observers`), so the mse / entropy / percentile methods cost little more
than min / max: the rest is onnxruntime writing every exposed tensor out of its blocked NCHWc
layout.

Values must be top-level graph inputs or node outputs of float type (float32, float16, float64).
Values without a type get one from ONNX shape inference on the clone; a value whose type stays
unknown (e.g. the output of a custom op) is checked on the first batch instead.
"""

from __future__ import annotations

__all__ = ["collect_statistics"]

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxq.errors import ConfigError
from onnxq.io import load
from onnxq.quant.observers import HISTOGRAM_SAMPLE, Observer
from onnxq.runtime.data import as_batches, input_specs

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)

#: default ``piece_mb`` of :func:`collect_statistics`: observed bytes per run of the calibration
#: session above which a batch is run in pieces
PIECE_MB = 256.0


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def _resolve(graph: ir.Graph, names: list[str]) -> tuple[list[ir.Value], list[ir.Value]]:
    """(requested graph inputs, requested node outputs) of ``graph``, in request order."""
    inputs = {v.name: v for v in graph.inputs}
    produced = {v.name: v for node in graph for v in node.outputs if v.name}
    from_inputs, from_nodes = [], []
    for name in names:
        if name in inputs:
            from_inputs.append(inputs[name])
        elif name in produced:
            from_nodes.append(produced[name])
        elif name in graph.initializers:
            raise ConfigError(
                f"tensor '{name}' is a constant initializer, not an activation: "
                "set its range with onnxq.quant.observers.weight_range"
            )
        else:
            raise ConfigError(
                f"tensor '{name}' is neither an input nor a node output of the main graph"
            )
    return from_inputs, from_nodes


def _check_float(value: ir.Value) -> None:
    if value.dtype is not None and value.dtype not in _FLOAT_TYPES:
        raise ConfigError(
            f"tensor '{value.name}' is {value.dtype.name}: only float tensors "
            "(float32, float16, float64) can be calibrated"
        )


def collect_statistics(
    model: ir.Model,
    tensor_names: Iterable[str],
    data: Any,
    *,
    per_channel_axes: Mapping[str, int] | None = None,
    bins: int = 2048,
    histogram: bool = True,
    progress: Callable[[int], Any] | None = None,
    threads: int | None = None,
    sample: int | None = HISTOGRAM_SAMPLE,
    piece_mb: float | None = PIECE_MB,
) -> dict[str, Observer]:
    """Observe ``tensor_names`` over every batch of ``data``; returns ``{name: Observer}``.

    ``data``: anything :func:`~onnxq.runtime.data.as_batches` accepts. ``per_channel_axes``:
    ``{name: axis}`` for tensors that also need per-channel min / max. ``progress``: called as
    ``progress(1)`` after each batch (``tqdm(...).update`` fits). ``histogram=False`` keeps only
    min / max (all the minmax method needs). ``sample``: a batch of a tensor with more values is
    histogrammed from an evenly strided sample of about this many values (min / max stay exact;
    see :class:`~onnxq.quant.observers.Observer`); None bins every value. ``threads``: how many threads update observers
    (default: up to 4, one per core; numpy releases the GIL). ``model`` is left unchanged. The
    session runs with onnxruntime's optimizations on: the observed tensors are graph outputs of
    the copy, which onnxruntime never fuses away, so their values are the graph's (2x faster
    than unoptimized). ``piece_mb``: a batch whose observed tensors take more than this is run in
    pieces along its first axis, once a test on two of its samples shows that axis is a batch
    axis (module doc); None runs every batch whole.
    Raises :class:`ConfigError` for unknown or non-float tensors, bad data, or a batch that
    onnxruntime refuses.
    """
    model = load(model)
    names = list(dict.fromkeys(tensor_names))
    axes = dict(per_channel_axes or {})
    stray = [n for n in axes if n not in names]
    if stray:
        raise ConfigError(
            f"per-channel axis given for '{stray[0]}', which is not a requested tensor"
        )
    # the session is built from the model itself, its outputs swapped for the observed tensors
    # meanwhile (a clone costs about 0.1 s per 250 nodes); a copy only where types must be inferred
    work = model
    from_inputs, from_nodes = _resolve(work.graph, names)
    if any(v.dtype is None for v in from_nodes):
        work = model.clone()
        from_inputs, from_nodes = _resolve(work.graph, names)
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(work)
    for value in from_inputs + from_nodes:
        _check_float(value)
    observers = {
        n: Observer(n, bins=bins, axis=axes.get(n), histogram=histogram, sample=sample)
        for n in names
    }

    graph = _CalibrationGraph(work, [v.name for v in from_nodes])
    del work
    input_names = [v.name for v in from_inputs]
    graph.pieces = _Pieces(graph, model, piece_mb, axes)

    workers = _workers(threads, len(from_nodes))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="onnxq-observe") if workers > 1 else None
    try:
        batches = _stream(data, model, observers, input_names, graph, pool, progress)
    finally:
        if pool is not None:
            pool.shutdown()

    for obs in observers.values():
        if obs.nonfinite:
            logger.warning(
                "tensor '%s': %d NaN/Inf values were left out of its statistics",
                obs.name,
                obs.nonfinite,
            )
    logger.info("calibration: %d tensors observed over %d batches", len(observers), batches)
    return observers


def _stream(
    data: Any,
    model: ir.Model,
    observers: dict[str, Observer],
    input_names: list[str],
    graph: _CalibrationGraph,
    pool: ThreadPoolExecutor | None,
    progress: Callable[[int], Any] | None,
) -> int:
    """Run every batch and update the observers; returns the number of batches."""
    batches = 0
    for index, feeds in enumerate(as_batches(data, input_specs(model))):
        for name in input_names:
            if name in feeds:
                _observe(observers[name], feeds[name])
        if graph.names:
            pieces = graph.pieces.split(feeds)
            if batches == 0 and len(pieces) > 1:
                _start_ranges(graph, pieces, observers, index)
            for part, piece in enumerate(pieces):
                outputs = graph.run(piece, index)
                _observe_outputs(
                    graph.names, outputs, observers, pool, check_types=batches == 0 and part == 0,
                    continues=part > 0, share=len(pieces),
                )
                del outputs
        del feeds
        batches += 1
        if progress is not None:
            progress(1)
    return batches


def _start_ranges(
    graph: _CalibrationGraph,
    pieces: list[Mapping[str, np.ndarray]],
    observers: Mapping[str, Observer],
    index: int,
) -> None:
    """Start each histogram at the first batch's finite extremes (one extra run of the first
    batch's pieces, min / max only), as a whole first batch would (Observer.start_range)."""
    wanted = [name for name in graph.names if observers[name].histogram]
    if not wanted:
        return
    extremes = {name: Observer(name, histogram=False) for name in wanted}
    for piece in pieces:
        for name, x in zip(graph.names, graph.run(piece, index)):
            if name in extremes and x.dtype.kind == "f":
                extremes[name].update(x)  # finite min / max (NaN / Inf left out)
    for name, seen in extremes.items():
        observers[name].start_range(seen.min, seen.max)


def _observe_outputs(
    names: list[str],
    outputs: list[np.ndarray],
    observers: Mapping[str, Observer],
    pool: ThreadPoolExecutor | None,
    check_types: bool,
    continues: bool = False,
    share: int = 1,
) -> None:
    """Update each tensor's observer; ``continues``/``share``: this is one of ``share`` pieces of
    a batch (not the first), so it adds to that batch and takes 1/``share`` of its sample."""
    if check_types:
        for name, array in zip(names, outputs):
            if array.dtype.kind != "f":
                raise ConfigError(
                    f"tensor '{name}' is {array.dtype}: only float tensors can be calibrated"
                )
    pairs = sorted(zip(names, outputs), key=lambda p: -p[1].size)  # big ones first

    def observe(pair: tuple[str, np.ndarray]) -> None:
        obs = observers[pair[0]]
        sample = obs.sample if obs.sample is None or share == 1 else max(1, obs.sample // share)
        _observe(obs, pair[1], continues=continues, sample=sample)

    if pool is None:
        for pair in pairs:
            observe(pair)
    else:  # numpy releases the GIL in every step of Observer.update
        for _ in pool.map(observe, pairs):
            pass


def _workers(threads: int | None, tensors: int) -> int:
    """Threads that update observers (each observer is updated by one thread at a time)."""
    if threads is None:
        threads = min(4, os.cpu_count() or 1)
    return max(1, min(int(threads), tensors))


def _calibration_session(model: ir.Model) -> Any:
    """An onnxruntime session with all graph optimizations whose worker threads do not spin."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from onnxq.runtime.session import session_from_model

    return session_from_model(model, options)


class _CalibrationGraph:
    """The model with the requested tensors as its outputs, in one onnxruntime session."""

    def __init__(self, work: ir.Model, names: list[str]) -> None:
        self.names = names
        self.runner: _Runner | None = None
        self.pieces: _Pieces | None = None
        if names:
            produced = {v.name: v for node in work.graph for v in node.outputs if v.name}
            saved = list(work.graph.outputs)
            try:  # the model's own outputs are back before this returns
                work.graph.outputs.clear()
                work.graph.outputs.extend(produced[n] for n in names)
                session = _calibration_session(work)
            finally:
                work.graph.outputs.clear()
                work.graph.outputs.extend(saved)
            self.runner = _Runner(session, names)

    def run(self, feeds: Mapping[str, np.ndarray], index: int) -> list[np.ndarray]:
        try:
            return self.runner.run(feeds)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise ConfigError(
                f"calibration batch {index}: onnxruntime could not run the model "
                f"({_first_line(exc)})"
            ) from exc


class _Pieces:
    """Splits batches whose observed tensors are large into pieces along the first axis.

    Exposing many intermediates of a big batch makes onnxruntime write hundreds of MB per run
    out of its blocked layout; in pieces of a few samples the same work stays closer to the
    caches and needs a fraction of the memory. A batch is only split when its first axis is a
    batch axis, which is checked once, on the first batch with at least two samples: every input
    has that many rows, the model declares that axis dynamic (or not at all), and every observed
    tensor of the first two samples run together is the two single-sample runs stacked along one
    of its axes (the samples may move to another axis inside the model, as in an attention
    block's ``[3, N, heads, L, d]``), and that axis is not the tensor's per-channel axis. A model
    that mixes samples (a reduction over the batch, a recurrent net whose first axis is time)
    fails the check and runs whole batches.
    """

    def __init__(self, graph: _CalibrationGraph, model: ir.Model, piece_mb: float | None,
                 channel_axes: Mapping[str, int] | None = None) -> None:
        self.graph = graph
        self.channel_axes = dict(channel_axes or {})
        self.budget = None if piece_mb is None else float(piece_mb) * 2**20
        self.dynamic = {
            spec.name: spec.shape is None or (len(spec.shape) > 0 and spec.shape[0] is None)
            for spec in input_specs(model)
        }
        #: samples per piece once decided; 0: never split
        self.rows: int | None = None if self.budget and graph.names else 0

    def split(self, feeds: Mapping[str, np.ndarray]) -> list[Mapping[str, np.ndarray]]:
        n = self._rows(feeds)
        if self.rows is None and n >= 2:
            self.rows = self._decide(feeds)
        if not self.rows or n <= self.rows:
            return [feeds]
        count = -(-n // self.rows)
        bounds = [n * i // count for i in range(count + 1)]  # near-equal pieces: <= 2 shapes
        return [{k: v[a:b] for k, v in feeds.items()} for a, b in zip(bounds, bounds[1:])]

    def _rows(self, feeds: Mapping[str, np.ndarray]) -> int:
        sizes = {v.shape[0] if v.ndim else -1 for v in feeds.values()}
        return sizes.pop() if len(sizes) == 1 else -1

    def _decide(self, feeds: Mapping[str, np.ndarray]) -> int:
        if not all(self.dynamic.get(name, False) for name in feeds):
            return 0
        session, names = self.graph.runner.session, self.graph.names
        try:
            pair = session.run(names, {k: v[:2] for k, v in feeds.items()})
            singles = [session.run(names, {k: v[i : i + 1] for k, v in feeds.items()})
                       for i in (0, 1)]
        except Exception as exc:  # noqa: BLE001 - the whole batch will run (and report) as usual
            logger.debug("calibration: no pieces (%s)", _first_line(exc))
            return 0
        for i, single in enumerate(singles):
            for name, both, one in zip(names, pair, single):
                axis = _batch_axis(both, one, i)
                if axis is None:
                    logger.debug("calibration: no pieces: '%s' does not keep samples apart", name)
                    return 0
                channel = self.channel_axes.get(name)
                if channel is not None and channel % both.ndim == axis:
                    logger.debug("calibration: no pieces: '%s' has its samples on its channel "
                                 "axis", name)
                    return 0
        per_sample = sum(a.nbytes for a in singles[0])
        rows = max(1, int(self.budget // max(per_sample, 1)))
        logger.debug("calibration: %d bytes observed per sample; pieces of %d", per_sample, rows)
        return rows


def _batch_axis(both: np.ndarray, one: np.ndarray, i: int) -> int | None:
    """The axis along which ``both`` (a run on two samples) stacks two runs on one sample, when
    ``one`` (the run on sample ``i`` alone) is its ``i``-th half along that axis; else None."""
    if both.ndim != one.ndim or both.ndim == 0:
        return None
    differ = [a for a in range(both.ndim) if both.shape[a] != one.shape[a]]
    if len(differ) != 1 or both.shape[differ[0]] != 2 * one.shape[differ[0]]:
        return None
    axis = differ[0]
    k = one.shape[axis]
    half = np.take(both, range(i * k, (i + 1) * k), axis=axis)
    if both.dtype.kind != "f":
        return axis if np.array_equal(half, one) else None
    scale = float(np.max(np.abs(np.nan_to_num(both, posinf=0, neginf=0)), initial=0.0))
    same = np.allclose(half, one, rtol=1e-3, atol=1e-4 * scale + 1e-6, equal_nan=True)
    return axis if same else None


class _Runner:
    """Runs the calibration session; outputs go to the same arrays while input shapes repeat.

    The arrays returned by one :meth:`run` are overwritten by the next: observe them first.
    """

    #: input shapes whose output buffers are kept (a batch run in pieces has up to two)
    KEEP = 2

    def __init__(self, session: Any, out_names: list[str]) -> None:
        self.session = session
        self.out_names = out_names
        #: input-shape key → (binding, output buffers), most recently used last
        self.bound: dict[tuple, tuple[Any, list[np.ndarray]]] = {}
        self.plain = False  # a binding failed once: plain runs from then on

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        key = tuple((k, v.shape, v.dtype.str) for k, v in sorted(feeds.items()))
        if key in self.bound:
            binding, buffers = self.bound.pop(key)
            self.bound[key] = (binding, buffers)
            for name, array in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            try:
                self.session.run_with_iobinding(binding, self._quiet())
                return buffers
            except Exception:  # noqa: BLE001 - e.g. an output whose shape depends on the data
                logger.debug("calibration: output binding failed; plain runs from now on")
                self.bound.clear()
                self.plain = True
                return self.session.run(self.out_names, dict(feeds))
        outputs = self.session.run(self.out_names, dict(feeds))
        if not self.plain:
            self._bind(key, outputs)
        return outputs

    @staticmethod
    def _quiet() -> Any:
        """Run options that keep a refused binding (data-dependent shapes) out of the log."""
        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4
        return options

    def _bind(self, key: tuple, outputs: list[np.ndarray]) -> None:
        """Bind the outputs of the next runs with the same input shapes to these arrays."""
        if any(array.size == 0 for array in outputs):
            return  # nothing to reuse; plain runs
        buffers, seen = [], set()
        for array in outputs:
            if (
                not array.flags.c_contiguous
                or not array.flags.writeable
                or array.ctypes.data in seen
                or array.dtype.kind != "f"
            ):
                array = np.empty_like(array, order="C")  # our own buffer (aliased or read-only)
            seen.add(array.ctypes.data)
            buffers.append(array)
        binding = self.session.io_binding()
        for name, array in zip(self.out_names, buffers):
            binding.bind_output(
                name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data
            )
        while len(self.bound) >= self.KEEP:
            self.bound.pop(next(iter(self.bound)))
        self.bound[key] = (binding, buffers)


def _observe(obs: Observer, array: np.ndarray, **options: Any) -> None:
    try:
        obs.update(array, **options)
    except ValueError as exc:  # per-channel axis out of range or channel count changed
        raise ConfigError(str(exc)) from exc
