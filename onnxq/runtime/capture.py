"""Activation statistics: one onnxruntime session, every needed intermediate exposed, batches streamed.

:func:`collect_statistics` clones the model (the clone shares the weights, nothing is copied),
makes the requested values the clone's graph outputs, and builds **one** session with graph
optimizations disabled so that every exposed value is exactly the value of the graph node that
produces it (fusions would remove or change intermediates). Batches from
:func:`onnxq.runtime.data.as_batches` run one at a time; each output updates its
:class:`~onnxq.quant.observers.Observer` (running min / max, fixed-size histogram) and is dropped
before the next batch, so memory stays at one batch of activations plus ``bins`` counts per
tensor whatever the number of samples. Requested model inputs are observed straight from the feeds.

Values must be top-level graph inputs or node outputs of float type (float32, float16, float64).
Values without a type get one from ONNX shape inference on the clone; a value whose type stays
unknown (e.g. the output of a custom op) is checked on the first batch instead.
"""

from __future__ import annotations

__all__ = ["collect_statistics"]

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxq.errors import ConfigError
from onnxq.io import load
from onnxq.quant.observers import Observer
from onnxq.runtime.data import as_batches, input_specs
from onnxq.runtime.session import create_session

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
) -> dict[str, Observer]:
    """Observe ``tensor_names`` over every batch of ``data``; returns ``{name: Observer}``.

    ``data``: anything :func:`~onnxq.runtime.data.as_batches` accepts. ``per_channel_axes``:
    ``{name: axis}`` for tensors that also need per-channel min / max. ``progress``: called as
    ``progress(1)`` after each batch (``tqdm(...).update`` fits). ``histogram=False`` keeps only
    min / max (all the minmax method needs). ``model`` is left unchanged. The session runs with
    onnxruntime's optimizations on: the observed tensors are graph outputs of the copy, which
    onnxruntime never fuses away, so their values are the graph's (2x faster than unoptimized).
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
        n: Observer(n, bins=bins, axis=axes.get(n), histogram=histogram) for n in names
    }

    session = None
    out_names = [v.name for v in from_nodes]
    if from_nodes:
        work.graph.outputs.clear()
        work.graph.outputs.extend(from_nodes)
        session = create_session(work, optimize=True)
    del work
    input_names = [v.name for v in from_inputs]

    batches = 0
    for index, feeds in enumerate(as_batches(data, input_specs(model))):
        for name in input_names:
            if name in feeds:
                _observe(observers[name], feeds[name])
        if session is not None:
            try:
                outputs = session.run(out_names, feeds)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
                raise ConfigError(
                    f"calibration batch {index}: onnxruntime could not run the model "
                    f"({_first_line(exc)})"
                ) from exc
            for name, array in zip(out_names, outputs):
                if batches == 0 and array.dtype.kind != "f":
                    raise ConfigError(
                        f"tensor '{name}' is {array.dtype}: only float tensors can be calibrated"
                    )
                _observe(observers[name], array)
            del outputs
        del feeds
        batches += 1
        if progress is not None:
            progress(1)

    for obs in observers.values():
        if obs.nonfinite:
            logger.warning(
                "tensor '%s': %d NaN/Inf values were left out of its statistics",
                obs.name,
                obs.nonfinite,
            )
    logger.info("calibration: %d tensors observed over %d batches", len(observers), batches)
    return observers


def _observe(obs: Observer, array: np.ndarray) -> None:
    try:
        obs.update(array)
    except ValueError as exc:  # per-channel axis out of range or channel count changed
        raise ConfigError(str(exc)) from exc
