"""Layer inputs and targets on sampled rows, captured once, within a memory budget.

* :func:`materialize` turns the user's calibration data into a list of checked batches (the
  algorithms iterate over it once per layer).
* :class:`RowStore` keeps arrays in memory up to a byte budget and spills the rest to disk
  (``numpy.memmap`` files in a temporary folder that is removed on :meth:`RowStore.close`).
* :func:`capture_targets`: **one** pass of the float model with every layer output exposed;
  each layer keeps its output at its sampled positions only (``rows × C_out``).
* :func:`input_session` / :func:`capture_inputs`: the input of one layer in the partly quantized
  model — a copy of it cut after that input (nodes not needed are removed), one onnxruntime
  session per layer, batches streamed through it, patches at the layer's positions kept.
"""

from __future__ import annotations

__all__ = ["RowStore", "Sample", "capture_inputs", "capture_targets", "find_row_mask", "input_session", "materialize"]

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq.algorithms._layers import Layer
from onnxq.runtime.data import as_batches, input_specs
from onnxq.runtime.session import create_session

log = logging.getLogger(__name__)


def materialize(data: Any, model: ir.Model, max_samples: int | None = None) -> list[dict[str, np.ndarray]]:
    """Checked batches of ``data`` as a list, cut after ``max_samples`` samples (batch axis 0)."""
    batches: list[dict[str, np.ndarray]] = []
    seen = 0
    for feeds in as_batches(data, input_specs(model)):
        if max_samples is not None:
            n = next(iter(feeds.values())).shape[0] if feeds else 1
            if seen + n > max_samples:
                keep = max_samples - seen
                if keep <= 0:
                    break
                feeds = {k: v[:keep] for k, v in feeds.items()}
                n = keep
            seen += n
        batches.append(feeds)
        if max_samples is not None and seen >= max_samples:
            break
    if not batches:
        from onnxq.errors import ConfigError

        raise ConfigError("the calibration data has no samples")
    return batches


class RowStore:
    """Named float32 arrays: in memory up to ``budget_bytes``, then in disk-backed memmaps."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.in_memory = 0
        self.arrays: dict[str, np.ndarray] = {}
        self._dir: str | None = None

    def put(self, key: str, array: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(array, np.float32)
        self.drop(key)
        if self.in_memory + array.nbytes <= self.budget:
            self.in_memory += array.nbytes
            self.arrays[key] = array
            return array
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="onnxq-rows-")
            log.info("row store over its %.0f MiB budget: spilling to %s", self.budget / 2**20, self._dir)
        path = os.path.join(self._dir, f"{len(os.listdir(self._dir))}.f32")
        mm = np.memmap(path, dtype=np.float32, mode="w+", shape=array.shape)
        mm[...] = array
        mm.flush()
        self.arrays[key] = mm
        return mm

    def get(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def drop(self, key: str) -> None:
        old = self.arrays.pop(key, None)
        if old is not None and not isinstance(old, np.memmap):
            self.in_memory -= old.nbytes

    def close(self) -> None:
        self.arrays.clear()
        self.in_memory = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class Sample:
    """A layer's sampled output positions per batch and the output shape of each batch."""

    positions: list[np.ndarray]
    out_shapes: list[tuple[int, ...]]

    @property
    def rows(self) -> int:
        return int(sum(len(p) for p in self.positions))


def _exposed(model: ir.Model, names: list[str]) -> ir.Model:
    """A copy of ``model`` whose outputs are ``names``, without the nodes they do not need."""
    work = model.clone()
    values = {v.name: v for node in work.graph for v in node.outputs if v.name}
    values.update({v.name: v for v in work.graph.inputs})
    outs = [values[n] for n in names]
    work.graph.outputs.clear()
    work.graph.outputs.extend(dict.fromkeys(outs))
    RemoveUnusedNodesPass()(work)
    return work


def capture_targets(
    float_model: ir.Model,
    layers: list[Layer],
    batches: list[dict[str, np.ndarray]],
    rows_per_layer: int,
    store: RowStore,
    seed: int,
    progress: Callable[[int], Any] | None = None,
    row_mask: str | None = None,
) -> dict[str, Sample]:
    """Sample each layer's output positions; store ``f(y)`` there (the float output after the
    layer's activation) as ``<name>/target``.

    ``row_mask``: a model input (``[N, L]``, e.g. ``attention_mask``) whose zeros mark positions
    that are not data (padding): the rows of a MatMul layer with output ``[N, L, C]`` are drawn
    only where it is non-zero."""
    names = list(dict.fromkeys(layer.output.name for layer in layers))
    session = create_session(_exposed(float_model, names), optimize=True)
    out_names = [o.name for o in session.get_outputs()]
    samples = {layer.name: Sample([], []) for layer in layers}
    chunks: dict[str, list[np.ndarray]] = {layer.name: [] for layer in layers}
    per_batch = max(1, -(-rows_per_layer // len(batches)))
    for b, feeds in enumerate(batches):
        outs = dict(zip(out_names, session.run(out_names, feeds)))
        mask = feeds.get(row_mask) if row_mask else None
        for i, layer in enumerate(layers):
            y = outs[layer.output.name]
            rng = np.random.default_rng([seed, i, b])
            valid = layer.valid_positions(y.shape, mask) if mask is not None else None
            pos = layer.positions(y.shape, per_batch, rng, valid)
            samples[layer.name].positions.append(pos)
            samples[layer.name].out_shapes.append(tuple(y.shape))
            # the target is the layer's output after its activation, as the float model computes it
            chunks[layer.name].append(layer.activation(layer.output_rows(y, pos)))
        del outs
        if progress is not None:
            progress(1)
    for layer in layers:
        store.put(f"{layer.name}/target", np.concatenate(chunks.pop(layer.name)))
    return samples


def find_row_mask(model: ir.Model, setting: str | None) -> str | None:
    """The input that marks padding for ``capture_targets(row_mask=...)``: ``setting`` itself
    when it names an input; for ``"auto"``, the one integer or boolean input of rank 2 whose name
    contains ``mask`` (``attention_mask``, ``input_mask``), if there is exactly one."""
    from onnxq.errors import ConfigError

    if setting is None:
        return None
    names = [v.name for v in model.graph.inputs]
    if setting != "auto":
        if setting not in names:
            raise ConfigError(f"row_mask '{setting}' is not an input of the model (inputs: {names})")
        return setting
    found = [v.name for v in model.graph.inputs
             if "mask" in (v.name or "").lower() and v.shape is not None and len(v.shape) == 2
             and v.dtype is not None and not v.dtype.is_floating_point()]
    return found[0] if len(found) == 1 else None


def input_session(model: ir.Model, value_name: str) -> Any:
    """One onnxruntime session computing ``value_name`` of ``model`` (optimized, cut after it);
    the name itself when it is a graph input (read straight from the feeds)."""
    if any(v.name == value_name for v in model.graph.inputs):
        return value_name
    # onnxruntime's fused integer kernels take no 4-bit activations (the QDQ fusion would build
    # a QLinearConv with a uint4 input, which it then cannot run): such models run unfused
    return create_session(_exposed(model, [value_name]), optimize=not _has_4bit_activations(model))


def _has_4bit_activations(model: ir.Model) -> bool:
    four = (ir.DataType.INT4, ir.DataType.UINT4)
    for node in model.graph:
        if node.op_type == "QuantizeLinear" and len(node.inputs) > 2 and node.inputs[2] is not None:
            zero = node.inputs[2]
            dtype = zero.const_value.dtype if zero.const_value is not None else zero.dtype
            if dtype in four:
                return True
    return False


def capture_inputs(
    session: Any,
    layer: Layer,
    sample: Sample,
    batches: list[dict[str, np.ndarray]],
) -> np.ndarray:
    """The layer's input patches at its sampled positions: ``(rows, groups, C_in/g · kernel)``."""
    parts = []
    if isinstance(session, str):
        for b, feeds in enumerate(batches):
            parts.append(layer.input_rows(feeds[session], sample.out_shapes[b], sample.positions[b]))
        return np.concatenate(parts)
    out_name = session.get_outputs()[0].name
    input_names = {i.name for i in session.get_inputs()}
    for b, feeds in enumerate(batches):
        (x,) = session.run([out_name], {k: v for k, v in feeds.items() if k in input_names})
        parts.append(layer.input_rows(x, sample.out_shapes[b], sample.positions[b]))
    return np.concatenate(parts)
