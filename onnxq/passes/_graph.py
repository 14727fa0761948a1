"""Small graph helpers shared by the passes: op matching, constant weights, use-def checks.

Nothing here knows about onnxruntime. Matching is by ``(domain, op_type)``; weights are edited
only through their ``ir.Value.const_value`` after checking that the weight is a constant,
not a graph input and not shared with nodes outside the match.
"""

from __future__ import annotations

__all__ = [
    "BN_STATS_KEY",
    "DEFAULT_DOMAINS",
    "is_op",
    "opset_version",
    "constant",
    "weight_problem",
    "set_constant",
    "add_initializer",
    "sole_consumer",
    "clip_bounds",
    "attr",
]

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

DEFAULT_DOMAINS = ("", "ai.onnx")
#: ``Node.meta`` key where fold-bn keeps a folded BN's γ and β (describing the layer output)
BN_STATS_KEY = "onnxq.bn_stats"


def is_op(node: ir.Node | None, op_types: str | Iterable[str], domain: str = "") -> bool:
    """True when ``node`` is one of ``op_types`` in ``domain`` (the default domain by default)."""
    if node is None:
        return False
    if domain in DEFAULT_DOMAINS:
        if node.domain not in DEFAULT_DOMAINS:
            return False
    elif node.domain != domain:
        return False
    if isinstance(op_types, str):
        return node.op_type == op_types
    return node.op_type in op_types


def opset_version(model: ir.Model, domain: str = "") -> int:
    """The opset of ``domain`` the model imports (0 when it imports none)."""
    version = model.opset_imports.get(domain)
    if version is None and domain == "":
        version = model.opset_imports.get("ai.onnx")
    return int(version) if version is not None else 0


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant value (initializer or const-folded), else None.

    A graph input that has an initializer is *not* constant: the user may feed it.
    """
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def weight_problem(value: ir.Value | None, users: Iterable[ir.Node]) -> str | None:
    """Why ``value`` cannot be edited as a weight of ``users``; None when it can.

    Checks that it is a constant, not a graph input or output, and consumed only by ``users``.
    """
    if value is None:
        return "the input is missing"
    if value.is_graph_input():
        return f"'{value.name}' is a graph input (the user may feed it)"
    if value.const_value is None:
        return f"'{value.name}' is not a constant"
    if value.is_graph_output():
        return f"'{value.name}' is a graph output"
    allowed = {id(n) for n in users}
    others = [n for n in value.consumers() if id(n) not in allowed]
    if others:
        return f"'{value.name}' is shared with node '{others[0].name}' ({others[0].op_type})"
    return None


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace the data of a constant value in place (same name, new dtype-checked array)."""
    old = value.const_value
    dtype = old.dtype.numpy() if old is not None else array.dtype
    array = np.asarray(array, dtype=dtype, order="C")
    value.const_value = ir.Tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)


def add_initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    """Register a new initializer in ``graph`` under a name not yet used there."""
    base, k = name, 1
    while name in graph.initializers:
        name = f"{base}_{k}"
        k += 1
    array = np.asarray(array, order="C")  # (ascontiguousarray would turn a 0-d scalar into shape (1,))
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.Tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The only node that reads ``value`` (None if several, none, or it is a graph output)."""
    if value.is_graph_output():
        return None
    consumers = value.consumers()
    if len(consumers) != 1:
        return None
    node = consumers[0]
    # the same node may read the value twice (e.g. Mul(x, x))
    if sum(1 for inp in node.inputs if inp is value) != 1:
        return None
    return node


def attr(node: ir.Node, name: str, default=None):
    """The Python value of attribute ``name`` of ``node``, or ``default``."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def clip_bounds(node: ir.Node) -> tuple[float | None, float | None] | str:
    """(min, max) of a Clip in either form, None for an absent bound; a reason string if unknown.

    opset < 11 stores the bounds as attributes; opset >= 11 as optional inputs that must be
    constant scalars for the bounds to be known.
    """
    if node.attributes.get("min") is not None or node.attributes.get("max") is not None:
        lo = attr(node, "min")
        hi = attr(node, "max")
        return (None if lo is None else float(lo), None if hi is None else float(hi))
    bounds: list[float | None] = []
    for i in (1, 2):
        inp = node.inputs[i] if len(node.inputs) > i else None
        if inp is None:
            bounds.append(None)
            continue
        arr = constant(inp)
        if arr is None:
            return f"Clip bound '{inp.name}' is not a constant"
        if arr.size != 1:
            return f"Clip bound '{inp.name}' is not a scalar"
        bounds.append(float(arr.reshape(())))
    return (bounds[0], bounds[1])
