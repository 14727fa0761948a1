"""Helpers shared by the compression passes: conv geometry, node replacement, rank/ratio maths."""

from __future__ import annotations

__all__ = [
    "ConvGeometry",
    "conv_geometry",
    "float_problem",
    "new_initializer",
    "rank_for_ratio",
    "replace_with",
    "truncated_svd",
]

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.passes._graph import add_initializer, attr

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Explicit Conv attributes: kernel, strides, dilations, pads (begin…, end…)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.kernel)


def conv_geometry(node: ir.Node, weight_shape: Sequence[int]) -> ConvGeometry | str:
    """A Conv's geometry with padding made explicit, or why it cannot be (``auto_pad=SAME_*``)."""
    kernel = tuple(int(k) for k in weight_shape[2:])
    d = len(kernel)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad={auto_pad} (padding depends on the input size)"
    strides = tuple(int(s) for s in (attr(node, "strides") or [1] * d))
    dilations = tuple(int(s) for s in (attr(node, "dilations") or [1] * d))
    pads = tuple(int(s) for s in (attr(node, "pads") or [0] * (2 * d)))
    if auto_pad == "VALID":
        pads = (0,) * (2 * d)
    return ConvGeometry(kernel, strides, dilations, pads)


def float_problem(value: ir.Value) -> str | None:
    dtype = value.const_value.dtype
    if dtype not in _FLOAT_TYPES:
        return f"weight '{value.name}' has dtype {dtype}"
    return None


def new_initializer(graph: ir.Graph, array: np.ndarray, dtype: ir.DataType, name: str) -> ir.Value:
    return add_initializer(graph, np.asarray(array, dtype=dtype.numpy()), name)


def replace_with(graph: ir.Graph, old: ir.Node, new_nodes: Sequence[ir.Node]) -> None:
    """Insert ``new_nodes`` before ``old``; its output's uses move to the last new node's output
    (which takes the output's name when it is a graph output); ``old`` is removed."""
    graph.insert_before(old, list(new_nodes))
    y, out = old.outputs[0], new_nodes[-1].outputs[0]
    out.type, out.shape = y.type, y.shape
    name = y.name
    is_output = y.is_graph_output()
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    if is_output:
        y.name = None
        out.name = name


def truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` with ``A @ B`` the best rank-``rank`` approximation of ``matrix`` (Frobenius
    and spectral norms, Eckart–Young), singular values split evenly: ``A = U√S``, ``B = √S Vᵀ``."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def rank_for_ratio(ratio: float, full_rank: int, macs_of_rank: Callable[[int], float],
                   original: float) -> int:
    """The largest rank ``r ≤ full_rank`` with ``macs_of_rank(r) ≤ ratio·original`` (at least 1)."""
    if not 0 < ratio:
        raise ValueError(f"compression ratio must be positive, got {ratio}")
    per_rank = macs_of_rank(1)
    if per_rank <= 0:
        return full_rank
    r = int(np.floor(ratio * original / per_rank + 1e-9))  # MACs are linear in r
    return int(max(1, min(full_rank, r)))


def split_named(pass_: Any, graph: ir.Graph, wanted: set[str],
                split: Callable[[ir.Node], str | None]) -> bool:
    """Run ``split(node)`` on each node named in ``wanted`` (a reason string when it cannot);
    counts changes and skips on ``pass_``; a name with no node is a skip. Returns "modified"."""
    wanted = set(wanted)
    modified = False
    for node in list(graph):
        if (node.name or "") not in wanted:
            continue
        wanted.discard(node.name)
        reason = split(node)
        if reason is None:
            pass_.changed()
            modified = True
        else:
            pass_.skip(node, reason)
    for name in sorted(wanted):
        pass_.skip(None, f"no node named '{name}'")
    return modified
