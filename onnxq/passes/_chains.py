"""Pairs of weight layers joined by ops that commute with a positive per-channel scale.

Shared by cross-layer equalization and high-bias fold. A *pair* is layer 1 → links → layer 2 where
every link value has a single reader (so a scale cannot leak into another branch) and every link
is one of (registry :data:`LINKS`):

* ``Relu``, ``LeakyRelu``, ``PRelu`` (positively homogeneous: f(x/s) = f(x)/s for s > 0),
  ``Identity``, ``Dropout`` (inference);
* ``Clip(lo, hi)`` and ``Min``/``Max``/``Add`` with a constant operand: f(x/s) = f'(x)/s where the
  bounds (or offset) of f' are divided by s **per channel** — bounded activations such as ReLU6
  are crossed exactly by rewriting them as ``Relu``/``Max`` + ``Min`` with a per-channel bound;
* ``Mul`` by a constant (scalar or per channel): (x/s)·a = (x·a)/s;
* ``MaxPool``, ``AveragePool``, ``GlobalAveragePool``, ``GlobalMaxPool`` (per channel, linear or
  max), ``Pad`` (zero constant, reflect or edge, not on the batch or channel axis);
* ``Flatten(axis=1)``, ``Squeeze`` of spatial axes, ``Reshape`` to 2-D keeping the batch: channel
  c becomes features ``c·k … c·k + k − 1`` (channel-major), so its scale repeats k times.

Everything else ends the search with a reason (e.g. HardSwish, Sigmoid, Add).
"""

from __future__ import annotations

__all__ = ["Link", "Pair", "find_pair", "channel_range_out", "channel_range_in", "rebound"]

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxq.passes._graph import add_initializer, attr, clip_bounds, constant, is_op, sole_consumer
from onnxq.passes._layers import WeightLayer, as_layer


@dataclasses.dataclass
class Link:
    node: ir.Node
    #: "pass" (commutes as is), "bound" (Clip / Min / Max: bounds scale per channel)
    kind: str
    #: True once the channel axis was flattened into features (scale repeats k times)
    flat: bool
    #: rank of the activation at this link (None when the layout is channel-last)
    rank: int | None


@dataclasses.dataclass
class Pair:
    first: WeightLayer
    second: WeightLayer
    links: list[Link]
    #: features of layer 2 per channel of layer 1 (> 1 after a Flatten of a spatial map)
    repeat: int = 1

    @property
    def channels(self) -> int:
        return self.first.out_channels


Handler = Callable[[ir.Node, ir.Value, bool, "int | None"], "tuple[str, bool, int | None] | str"]
LINKS: dict[tuple[str, str], Handler] = {}


def _link(*ops: str):
    def register(fn: Handler) -> Handler:
        for op in ops:
            LINKS[("", op)] = fn
        return fn

    return register


@_link("Relu", "LeakyRelu", "Identity")
def _elementwise(node, value, flat, rank):
    return ("pass", flat, rank)


@_link("PRelu")
def _prelu(node, value, flat, rank):
    if node.inputs[0] is not value:
        return "the chain enters PRelu as its slope"
    return ("pass", flat, rank)


@_link("Dropout")
def _dropout(node, value, flat, rank):
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = constant(node.inputs[2])
        if mode is None or bool(mode.reshape(())):
            return "Dropout may run in training mode"
    return ("pass", flat, rank)


@_link("Clip")
def _clip(node, value, flat, rank):
    if node.inputs[0] is not value:
        return "the chain enters Clip as a bound"
    bounds = clip_bounds(node)
    if isinstance(bounds, str):
        return bounds
    return ("bound", flat, rank)


@_link("Min", "Max", "Add", "Mul")
def _minmax(node, value, flat, rank):
    if len(node.inputs) != 2:
        return f"{node.op_type} with {len(node.inputs)} operands"
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    arr = constant(other)
    if arr is None:
        return f"{node.op_type} with the non-constant '{other.name}'"
    if arr.size != 1 and (flat or rank is None) and arr.ndim > 1:
        return f"{node.op_type} operand '{other.name}' is not per channel"
    if arr.size != 1 and not flat and rank is not None and arr.ndim != rank - 1:
        return f"{node.op_type} operand '{other.name}' of shape {arr.shape} is not per channel"
    # x/s · a = (x · a)/s: a constant factor commutes as is; bounds and offsets scale with s
    return ("pass" if node.op_type == "Mul" else "bound", flat, rank)


@_link("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
def _pool(node, value, flat, rank):
    if flat or rank is None:
        return f"{node.op_type} on a channel-last activation"
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
        return "MaxPool indices are used"
    return ("pass", flat, rank)


@_link("Pad")
def _pad(node, value, flat, rank):
    if flat or rank is None:
        return "Pad on a channel-last activation"
    mode = attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if len(node.inputs) > 1:
        pads = constant(node.inputs[1])
        if pads is None:
            return "Pad amounts are not constant"
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return "Pad with explicit axes"
        if mode == "constant" and len(node.inputs) > 2 and node.inputs[2] is not None:
            fill = constant(node.inputs[2])
            if fill is None or np.any(fill != 0):
                return "Pad fills with a non-zero constant"
    else:
        pads = np.asarray(attr(node, "pads", []))
        if mode == "constant" and float(attr(node, "value", 0.0)) != 0.0:
            return "Pad fills with a non-zero constant"
    pads = np.asarray(pads).reshape(-1)
    half = len(pads) // 2
    if half < 2 or pads[0] or pads[1] or pads[half] or pads[half + 1]:
        return "Pad on the batch or channel axis"
    return ("pass", flat, rank)


@_link("Flatten")
def _flatten(node, value, flat, rank):
    if flat or rank is None:
        return "Flatten of an already flat activation"
    if int(attr(node, "axis", 1)) != 1:
        return "Flatten with axis != 1"
    return ("pass", True, 2)


@_link("Squeeze")
def _squeeze(node, value, flat, rank):
    if flat or rank is None:
        return "Squeeze of a channel-last activation"
    axes = attr(node, "axes") if "axes" in node.attributes else None
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant(node.inputs[1])
    if axes is None:
        return "Squeeze without constant axes"
    axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    if 0 in axes or 1 in axes or len(axes) != rank - 2:
        return "Squeeze does not drop exactly the spatial axes"
    return ("pass", True, 2)


@_link("Reshape")
def _reshape(node, value, flat, rank):
    if flat or rank is None:
        return "Reshape of a channel-last activation"
    shape = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None or shape.size != 2:
        return "Reshape is not to a constant 2-D shape"
    if int(shape[0]) not in (0, -1) and int(shape[1]) != -1 and int(shape[0]) <= 0:
        return "Reshape does not keep the batch axis"
    return ("pass", True, 2)


def _layout_rank(layer: WeightLayer) -> int | None:
    """Rank of layer 1's output when its channel axis is 1; None for channel-last outputs."""
    if layer.op_type in ("Conv", "ConvTranspose"):
        return len(layer.canonical_shape)
    return None


def find_pair(first: WeightLayer, max_links: int = 16) -> Pair | str:
    """Follow layer 1's output to the next weight layer through commuting links."""
    value = first.output
    rank = _layout_rank(first)
    flat = rank is None
    links: list[Link] = []
    for _ in range(max_links):
        node = sole_consumer(value)
        if node is None:
            if value.is_graph_output():
                return f"'{value.name}' is a graph output"
            gated = _gated_activation(value)
            if gated:
                return f"{gated} on '{value.name}' is not positively homogeneous"
            return f"'{value.name}' is read by several nodes"
        second = as_layer(node)
        if isinstance(second, str) and is_op(node, ("Conv", "ConvTranspose", "Gemm", "MatMul")):
            return f"{node.op_type} '{node.name}': {second}"
        if isinstance(second, WeightLayer):
            if node.inputs[0] is not value:
                return f"'{value.name}' enters {node.op_type} '{node.name}' as its weight"
            return _close(first, second, links, flat, rank)
        handler = LINKS.get(("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type))
        if handler is None:
            return f"{_describe(node, value)} '{node.name}' does not commute with a per-channel scale"
        out = handler(node, value, flat, rank)
        if isinstance(out, str):
            return f"{node.op_type} '{node.name}': {out}"
        kind, flat_after, rank_after = out
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return f"{node.op_type} '{node.name}' has extra outputs in use"
        links.append(Link(node, kind, flat, rank))
        flat, rank = flat_after, rank_after
        value = node.outputs[0]
    return "chain too long"


def _gated_activation(value: ir.Value) -> str | None:
    """Name the decomposed activation x·gate(x) (HardSwish, SiLU) that reads ``value``, if any."""
    consumers = value.consumers()
    if len(consumers) != 2:
        return None
    for node in consumers:
        if is_op(node, "Mul"):
            name = _describe(node, value)
            if name != "Mul":
                return name
    return None


def _describe(node: ir.Node, value: ir.Value) -> str:
    """The op as a user would name it: x·gate(x) activations (HardSwish, SiLU) are recognized."""
    if is_op(node, "Mul") and len(node.inputs) == 2:
        other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
        seen: list[str] = []
        gate = other.producer() if other is not None else None
        while gate is not None and len(seen) < 4:  # e.g. Clip(Add(x, 3), 0, 6) [/ 6]
            seen.append(gate.op_type)
            if any(i is value for i in gate.inputs):
                if "Sigmoid" in seen:
                    return "SiLU (x·Sigmoid(x))"
                if "HardSigmoid" in seen or "Clip" in seen:
                    return "HardSwish (x·HardSigmoid(x))"
                return f"a gated activation x·{'('.join(reversed(seen))}(x)"
            data = [i for i in gate.inputs if i is not None and constant(i) is None]
            gate = data[0].producer() if len(data) == 1 else None
    return node.op_type


def _close(first: WeightLayer, second: WeightLayer, links, flat, rank) -> Pair | str:
    op2 = second.op_type
    if op2 in ("Conv", "ConvTranspose"):
        if flat:
            return f"{op2} '{second.node.name}' after a flattened activation"
        if second.groups > 1 and not second.is_depthwise:
            return f"grouped (non-depthwise) {op2} '{second.node.name}'"
    elif op2 == "Gemm" and attr(second.node, "transA", 0):
        return f"Gemm '{second.node.name}' with transA=1"
    elif not flat and rank is not None:
        return f"{op2} '{second.node.name}' reads a channel-first activation"
    if first.groups > 1 and not first.is_depthwise:
        return f"grouped (non-depthwise) {first.op_type} '{first.node.name}'"
    c = first.out_channels
    cin = second.in_channels
    if cin % c:
        return f"{c} channels do not map onto {cin} inputs of '{second.node.name}'"
    repeat = cin // c
    if repeat > 1 and not any(link.node.op_type in ("Flatten", "Reshape", "Squeeze") for link in links):
        return f"{c} channels do not map onto {cin} inputs of '{second.node.name}'"
    return Pair(first, second, links, repeat)


def channel_range_out(wc: np.ndarray) -> np.ndarray:
    """max |w| per output channel of a canonical weight."""
    rows = wc.reshape(wc.shape[0], -1)
    return np.maximum(rows.max(axis=1), -rows.min(axis=1))


def channel_range_in(layer: WeightLayer, wc: np.ndarray, repeat: int = 1) -> np.ndarray:
    """max |w| per *input* channel of a canonical weight, grouped ``repeat`` features a channel."""
    out = layer.in_ranges(wc)
    return out.reshape(-1, repeat).max(axis=1) if repeat > 1 else out


def _bound_vectors(link: Link, channels: int) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """(lo, hi, operand index) of a bound link as per-channel vectors (None: no bound)."""
    node = link.node
    if node.op_type == "Clip":
        lo, hi = clip_bounds(node)
        as_vec = lambda b: None if b is None else np.full(channels, b, dtype=np.float64)  # noqa
        return as_vec(lo), as_vec(hi), -1
    idx = 1 if constant(node.inputs[1]) is not None else 0
    arr = constant(node.inputs[idx]).astype(np.float64).reshape(-1)
    vec = np.broadcast_to(arr, (channels,)).copy()
    return (vec, None, idx) if node.op_type == "Max" else (None, vec, idx)  # Min, Add: "hi"


def _derived(node: ir.Node, suffix: str) -> str | None:
    """A name for a node that replaces ``node`` (None lets the graph name it)."""
    return f"{node.name}_{suffix}" if node.name else None


def rebound(
    graph: ir.Graph,
    link: Link,
    channels: int,
    lo_fn: Callable[[np.ndarray], np.ndarray],
    hi_fn: Callable[[np.ndarray], np.ndarray],
) -> Link:
    """Rewrite a bound link with per-channel bounds ``lo_fn(lo)``, ``hi_fn(hi)``.

    ``channels`` counts the features at this link (channels × repeat after a Flatten). A Clip
    becomes ``Relu`` (lower bound 0 everywhere) or ``Max``, then ``Min``; the last node keeps the
    Clip's output name. Returns the link that now carries the upper bound (or the only one).
    """
    node = link.node
    base = node.name or node.outputs[0].name or "bound"
    lo, hi, idx = _bound_vectors(link, channels)
    shape = (channels,) if (link.flat or link.rank is None) else (channels,) + (1,) * (link.rank - 2)
    dtype = node.outputs[0].dtype.numpy() if node.outputs[0].dtype is not None else np.float32
    if node.op_type in ("Min", "Max", "Add"):
        vec = lo_fn(lo) if node.op_type == "Max" else hi_fn(hi)
        new = add_initializer(graph, vec.reshape(shape).astype(dtype), f"{base}_c")
        node.replace_input_with(idx, new)
        return link
    # Clip → Relu/Max (+ Min)
    x = node.inputs[0]
    nodes: list[ir.Node] = []
    if lo is not None:
        lo = lo_fn(lo)
        if np.all(lo == 0):
            nodes.append(ir.node("Relu", [x], name=_derived(node, "relu")))
        else:
            c = add_initializer(graph, lo.reshape(shape).astype(dtype), f"{base}_lo")
            nodes.append(ir.node("Max", [x, c], name=_derived(node, "max")))
    if hi is not None:
        hi = hi_fn(hi)
        c = add_initializer(graph, hi.reshape(shape).astype(dtype), f"{base}_hi")
        prev = nodes[-1].outputs[0] if nodes else x
        nodes.append(ir.node("Min", [prev, c], name=_derived(node, "min")))
    if not nodes:
        nodes.append(ir.node("Identity", [x], name=_derived(node, "id")))
    old = node.outputs[0]
    for n in nodes:
        n.outputs[0].type, n.outputs[0].shape = old.type, old.shape
    graph.insert_after(node, nodes)
    name = old.name
    out = nodes[-1].outputs[0]
    if old.is_graph_output():
        for i, o in enumerate(graph.outputs):
            if o is old:
                graph.outputs[i] = out
    old.replace_all_uses_with(out)
    graph.remove(node, safe=True)
    out.name = name
    last = Link(nodes[-1], "bound" if nodes[-1].op_type in ("Min", "Max") else "pass", link.flat, link.rank)
    return last
