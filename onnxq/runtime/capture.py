"""Activation statistics: one onnxruntime session, every needed intermediate exposed, batches streamed.

:func:`collect_statistics` clones the model (the clone shares the weights, nothing is copied),
makes the requested values the clone's graph outputs, and builds **one** onnxruntime session
(optimizations on: graph outputs are never fused away, so every exposed value is the value of the
graph node that produces it). Batches from :func:`onnxq.runtime.data.as_batches` run one at a
time; each output updates its :class:`~onnxq.quant.observers.Observer` (running min / max,
fixed-size histogram) before the next batch runs, so memory stays at one batch of activations
plus ``bins`` counts per tensor whatever the number of samples. Requested model inputs are
observed straight from the feeds.

**Cost.** While the input shapes stay the same, the outputs are written into the same buffers
batch after batch (an onnxruntime I/O binding to the arrays of the first batch): no new
allocation, no page faults on hundreds of MB per batch. The session's worker threads do not spin
between runs (``session.intra_op.allow_spinning = 0``) and the observers of one batch are updated
by a small thread pool (numpy releases the GIL), so they share the cores. Measured on this
project's 2-core machine (EfficientNet-Lite0, 256 images; PP-OCR rec, 150 lines), the min / max
pass costs about 2.2x FP32 inference; computing min / max inside the graph instead
(ReduceMin / ReduceMax, plus a ReduceSum to see NaN, which onnxruntime's ReduceMin skips) was no
faster (2.2x without the sum, 2.5x with it) and is not used.

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
from onnxq.io import PROTOBUF_LIMIT_BYTES, internalized, load, weight_bytes
from onnxq.quant.observers import HISTOGRAM_SAMPLE, Observer
from onnxq.runtime.data import as_batches, input_specs

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


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
    than unoptimized).
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
    work = model.clone()
    from_inputs, from_nodes = _resolve(work.graph, names)
    if any(v.dtype is None for v in from_nodes):
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
            outputs = graph.run(feeds, index)
            _observe_outputs(graph.names, outputs, observers, pool, check_types=batches == 0)
            del outputs
        del feeds
        batches += 1
        if progress is not None:
            progress(1)
    return batches


def _observe_outputs(
    names: list[str],
    outputs: list[np.ndarray],
    observers: Mapping[str, Observer],
    pool: ThreadPoolExecutor | None,
    check_types: bool,
) -> None:
    if check_types:
        for name, array in zip(names, outputs):
            if array.dtype.kind != "f":
                raise ConfigError(
                    f"tensor '{name}' is {array.dtype}: only float tensors can be calibrated"
                )
    pairs = sorted(zip(names, outputs), key=lambda p: -p[1].size)  # big ones first
    if pool is None:
        for name, array in pairs:
            _observe(observers[name], array)
    else:  # numpy releases the GIL in every step of Observer.update
        for _ in pool.map(lambda p: _observe(observers[p[0]], p[1]), pairs):
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
    providers = ["CPUExecutionProvider"]
    if weight_bytes(model) <= PROTOBUF_LIMIT_BYTES:
        with internalized(model):
            data = ir.to_proto(model).SerializeToString()
        return ort.InferenceSession(data, options, providers=providers)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onnxq-calib-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir.save(model, path, external_data="model.onnx.data")
        return ort.InferenceSession(path, options, providers=providers)


class _CalibrationGraph:
    """The model with the requested tensors as its outputs, in one onnxruntime session."""

    def __init__(self, work: ir.Model, names: list[str]) -> None:
        self.names = names
        self.runner: _Runner | None = None
        if names:
            produced = {v.name: v for node in work.graph for v in node.outputs if v.name}
            work.graph.outputs.clear()
            work.graph.outputs.extend(produced[n] for n in names)
            self.runner = _Runner(_calibration_session(work), names)

    def run(self, feeds: Mapping[str, np.ndarray], index: int) -> list[np.ndarray]:
        try:
            return self.runner.run(feeds)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise ConfigError(
                f"calibration batch {index}: onnxruntime could not run the model "
                f"({_first_line(exc)})"
            ) from exc


class _Runner:
    """Runs the calibration session; outputs go to the same arrays while input shapes repeat.

    The arrays returned by one :meth:`run` are overwritten by the next: observe them first.
    """

    def __init__(self, session: Any, out_names: list[str]) -> None:
        self.session = session
        self.out_names = out_names
        self.binding: Any = None
        self.key: tuple | None = None
        self.buffers: list[np.ndarray] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        key = tuple((k, v.shape, v.dtype.str) for k, v in sorted(feeds.items()))
        if self.binding is not None and key == self.key:
            for name, array in feeds.items():
                self.binding.bind_cpu_input(name, np.ascontiguousarray(array))
            try:
                self.session.run_with_iobinding(self.binding, self._quiet())
                return self.buffers
            except Exception:  # noqa: BLE001 - e.g. an output whose shape depends on the data
                logger.debug("calibration: output binding failed; plain runs from now on")
                self.binding, self.key = None, None
                return self.session.run(self.out_names, dict(feeds))
        outputs = self.session.run(self.out_names, dict(feeds))
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
        self.binding, self.key = None, None
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
        self.binding, self.key, self.buffers = binding, key, buffers


def _observe(obs: Observer, array: np.ndarray) -> None:
    try:
        obs.update(array)
    except ValueError as exc:  # per-channel axis out of range or channel count changed
        raise ConfigError(str(exc)) from exc
