"""MAC and parameter counting from the graph and its inferred shapes; measured latency.

Counting (one sample: every symbolic dimension of a graph input is taken as 1):

* ``Conv``: ``MACs = N·C_out·∏ out_spatial · (C_in/g)·∏ kernel`` (one multiply-accumulate per
  weight per output position);
* ``ConvTranspose``: ``MACs = N·C_in·∏ in_spatial · (C_out/g)·∏ kernel`` (every input element
  is scattered through its kernel);
* ``Gemm``: ``M·N·K``; ``MatMul``: ``∏ out_shape · K`` (activation × activation too, e.g.
  attention);
* ``BatchNormalization``, ``InstanceNormalization``, ``LayerNormalization``: one MAC per output
  element; pooling, element-wise ops and data movement: 0 (they are memory bound, not MAC bound).

Parameters of a node: the element count of its constant inputs (initializers or const-folded
values, each counted once per model even when shared). ``count_macs`` never changes the model:
shapes are inferred on a copy (onnx's shape inference with data propagation).

:func:`measure_latency` times the model in onnxruntime with its graph optimizations on (as it
would be deployed), on random inputs of batch 1, and reports the median of ``repeats`` runs
after ``warmup`` runs: MACs are a proxy, users care about milliseconds.
"""

from __future__ import annotations

__all__ = ["LayerCost", "ModelCost", "count_macs", "measure_latency", "value_shapes"]

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.passes._graph import attr, is_op

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclasses.dataclass
class LayerCost:
    name: str
    op_type: str
    macs: int
    params: int


@dataclasses.dataclass
class ModelCost:
    """Per-node costs (nodes with MACs or parameters) and totals."""

    layers: list[LayerCost]

    @property
    def macs(self) -> int:
        return int(sum(c.macs for c in self.layers))

    @property
    def params(self) -> int:
        return int(sum(c.params for c in self.layers))

    def by_name(self) -> dict[str, LayerCost]:
        return {c.name: c for c in self.layers}

    def to_dict(self) -> dict:
        return {
            "macs": self.macs,
            "params": self.params,
            "layers": [dataclasses.asdict(c) for c in self.layers],
        }


def _fixed_inputs(proto: onnx.ModelProto) -> None:
    """Symbolic or unknown dimensions of graph inputs → 1 (one sample)."""
    inits = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        for dim in inp.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = 1


def value_shapes(model: ir.Model) -> dict[str, Shape]:
    """Concrete shapes of the main graph's named values for one sample (batch 1).

    Values whose shape cannot be inferred are missing from the result.
    """
    proto = ir.to_proto(model)
    _fixed_inputs(proto)
    # clear stale value_info (it may carry the symbolic batch) and infer afresh
    del proto.graph.value_info[:]
    for out in proto.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is best effort
        log.warning("shape inference failed (%s): MACs of unknown shapes count as 0", exc)
        inferred = proto
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not vi.type.tensor_type.HasField("shape"):
            continue
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


# ---- per-op MAC formulas (registry) -------------------------------------------------------------
MacFn = Callable[[ir.Node, Callable[[ir.Value | None], "Shape | None"]], int | None]
MACS: dict[tuple[str, str], MacFn] = {}


def _macs(*ops: str):
    def register(fn: MacFn) -> MacFn:
        for op in ops:
            MACS[("", op)] = fn
        return fn

    return register


@_macs("Conv")
def _conv(node, shape):
    out, w = shape(node.outputs[0]), shape(node.inputs[1])
    if out is None or w is None:
        return None
    return int(out[0] * out[1] * math.prod(out[2:]) * math.prod(w[1:]))


@_macs("ConvTranspose")
def _conv_transpose(node, shape):
    x, w = shape(node.inputs[0]), shape(node.inputs[1])
    if x is None or w is None:
        return None
    return int(math.prod(x) * math.prod(w[1:]))


@_macs("Gemm")
def _gemm(node, shape):
    a, out = shape(node.inputs[0]), shape(node.outputs[0])
    if a is None or out is None:
        return None
    k = a[0] if attr(node, "transA", 0) else a[1]
    return int(math.prod(out) * k)


@_macs("MatMul")
def _matmul(node, shape):
    a, out = shape(node.inputs[0]), shape(node.outputs[0])
    if a is None or out is None:
        return None
    return int(math.prod(out) * a[-1])


@_macs("BatchNormalization", "InstanceNormalization", "LayerNormalization")
def _norm(node, shape):
    out = shape(node.outputs[0])
    return None if out is None else int(math.prod(out))


def count_macs(model: ir.Model, shapes: Mapping[str, Shape] | None = None) -> ModelCost:
    """MACs and parameters per node of the main graph (see the module docstring)."""
    shapes = value_shapes(model) if shapes is None else shapes

    def shape(value: ir.Value | None) -> Shape | None:
        if value is None:
            return None
        if value.name in shapes:
            return shapes[value.name]
        if value.shape is not None and all(isinstance(d, int) for d in value.shape):
            return tuple(int(d) for d in value.shape)
        return None

    seen: set[int] = set()
    layers: list[LayerCost] = []
    unknown: list[str] = []
    for node in model.graph:
        params = 0
        for inp in node.inputs:
            arr_value = inp if inp is not None and inp.const_value is not None else None
            if arr_value is None or arr_value.is_graph_input() or id(arr_value) in seen:
                continue
            if is_op(node, ("Reshape", "Clip", "Pad", "Squeeze", "Unsqueeze", "Slice", "Resize")) and inp is not node.inputs[0]:
                continue  # shape operands and bounds are not parameters
            seen.add(id(arr_value))
            dtype = arr_value.const_value.dtype
            if dtype.is_floating_point():
                params += int(math.prod(arr_value.const_value.shape))
        fn = MACS.get(("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type))
        macs = 0
        if fn is not None:
            got = fn(node, shape)
            if got is None:
                unknown.append(node.name or node.op_type)
            else:
                macs = got
        if macs or params:
            layers.append(LayerCost(node.name or "", node.op_type, int(macs), int(params)))
    if unknown:
        log.warning("MACs of %d nodes unknown (shapes not inferred), counted as 0: %s",
                    len(unknown), ", ".join(unknown[:5]))
    return ModelCost(layers)


def _random_feeds(session, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in inp.shape]
        dtype = types.get(inp.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


def measure_latency(
    model: ir.Model,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    repeats: int = 30,
    warmup: int = 3,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """onnxruntime latency of one run in milliseconds: ``{"median_ms", "p10_ms", "p90_ms"}``.

    ``feeds`` default: random inputs of batch 1. Graph optimizations are on (deployment setting).
    """
    from onnxq.runtime.session import create_session

    session = create_session(model, optimize=True, threads=threads)
    feeds = dict(feeds) if feeds is not None else _random_feeds(session, 1, seed)
    for _ in range(max(0, warmup)):
        session.run(None, feeds)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    arr = np.asarray(times)
    return {
        "median_ms": float(np.median(arr)),
        "p10_ms": float(np.percentile(arr, 10)),
        "p90_ms": float(np.percentile(arr, 90)),
        "repeats": int(arr.size),
    }
