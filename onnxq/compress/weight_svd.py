"""WeightSVD: split a weight layer into two by a truncated SVD of its weight matrix.

A Conv ``W (O, C, k…)`` (groups = 1, any kernel) read as the matrix ``M = W.reshape(O, C·∏k)``
(output channels × input patch), or a Gemm/MatMul weight in canonical form ``M (N, K)``, has the
SVD ``M = U·S·Vᵀ``. Keeping the ``r`` largest singular values gives the best rank-``r``
approximation in Frobenius and spectral norm (Eckart–Young)::

    M ≈ M_r = (U_r·√S_r)·(√S_r·V_rᵀ) = A·B,   ‖M − M_r‖_F² = Σ_{i>r} σ_i²

and since the layer is linear in its weight, ``y = M·p + b ≈ A·(B·p) + b``:

* Conv → Conv ``k×k`` with ``r`` outputs, weight ``B.reshape(r, C, k…)``, the original strides,
  pads, dilations and no bias → Conv ``1×1`` with weight ``A.reshape(O, r, 1…)`` and the bias;
* Gemm ``Y = α·A'·Wᵀ + β·C`` → Gemm(``α``, transA kept, weight ``B``) → Gemm(weight ``A``,
  ``β·C``); MatMul ``X·Wᵀ`` → MatMul(``X, Bᵀ``) → MatMul(``·, Aᵀ``); a MatMul's trailing bias
  ``Add`` keeps reading the second MatMul.

MACs per output position go from ``O·C·∏k`` to ``r·(C·∏k + O)``, so a ratio ``ρ`` of the layer's
MACs keeps ``r = ⌊ρ·O·C∏k / (C∏k + O)⌋``. With ``r = min(O, C·∏k)`` (full rank) the split is
exact. Skipped with a reason: grouped Convs, weights that are not constants or are shared,
non-float weights, Gemm with a non-constant or non-2-D weight.
"""

from __future__ import annotations

__all__ = ["WeightSVD", "weight_svd_macs"]

import math
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxq.compress._common import (
    float_problem,
    new_initializer,
    rank_for_ratio,
    replace_with,
    split_named,
    truncated_svd,
)
from onnxq.passes._graph import attr, is_op, weight_problem
from onnxq.passes._layers import WeightLayer, as_layer
from onnxq.passes.base import OnnxqPass

#: ``Node.meta`` key on the new nodes: the name of the layer they replace
ORIGIN_KEY = "onnxq.compressed_from"


def _dims(layer: WeightLayer) -> tuple[int, int]:
    """(outputs, patch size) of the layer's weight matrix."""
    shape = layer.canonical_shape
    return int(shape[0]), int(math.prod(shape[1:]))


def weight_svd_macs(layer: WeightLayer, rank: int | None) -> int:
    """MACs per output position of the layer (``rank=None``) or of its rank-``rank`` split."""
    o, p = _dims(layer)
    return o * p if rank is None else rank * (p + o)


class WeightSVD(OnnxqPass):
    """Split the named layers: ``ranks`` (exact ranks) or ``ratios`` (fraction of MACs kept)."""

    name = "weight-svd"
    verb = "split"

    def __init__(self, ranks: Mapping[str, int] | None = None,
                 ratios: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.ranks = dict(ranks or {})
        self.ratios = dict(ratios or {})
        #: rank used per layer in the last run
        self.chosen: dict[str, int] = {}

    def run_on_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        if graph is not model.graph:
            return False
        self.chosen = {}
        wanted = set(self.ranks) | set(self.ratios)
        return split_named(self, graph, wanted, lambda node: self._split(graph, node))

    def _split(self, graph: ir.Graph, node: ir.Node) -> str | None:
        if not is_op(node, ("Conv", "Gemm", "MatMul")):
            return f"{node.op_type} is not a Conv, Gemm or MatMul"
        layer = as_layer(node)
        if isinstance(layer, str):
            return layer
        problem = weight_problem(layer.weight, [node]) or float_problem(layer.weight)
        if problem:
            return problem
        if layer.groups != 1:
            return f"grouped Conv (group={layer.groups}): weight SVD splits group=1 layers only"
        o, p = _dims(layer)
        full = min(o, p)
        if node.name in self.ranks:
            rank = int(self.ranks[node.name])
            if rank < 1:
                return f"rank {rank} < 1"
            rank = min(rank, full)
        else:
            rank = rank_for_ratio(float(self.ratios[node.name]), full,
                                  lambda r: weight_svd_macs(layer, r), weight_svd_macs(layer, None))
        a, b = truncated_svd(layer.canonical().reshape(o, p), rank)
        new_nodes = _BUILDERS[node.op_type](graph, node, layer, a, b)
        for n in new_nodes:
            n.meta[ORIGIN_KEY] = node.name
        replace_with(graph, node, new_nodes)
        self.chosen[node.name or ""] = rank
        return None


def _conv(graph: ir.Graph, node: ir.Node, layer: WeightLayer, a: np.ndarray, b: np.ndarray) -> list[ir.Node]:
    w = layer.weight.const_value
    shape = tuple(w.shape)
    rank, d = a.shape[1], len(shape) - 2
    base = node.name or layer.weight.name
    w1 = new_initializer(graph, b.reshape((rank,) + shape[1:]), w.dtype, f"{layer.weight.name}_svd_a")
    w2 = new_initializer(graph, a.reshape((shape[0], rank) + (1,) * d), w.dtype, f"{layer.weight.name}_svd_b")
    attrs = {k: v.value for k, v in node.attributes.items()}
    attrs["kernel_shape"] = list(shape[2:])
    first = ir.node("Conv", [node.inputs[0], w1], attributes=attrs, name=f"{base}_svd_a")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    second = ir.node("Conv", [first.outputs[0], w2] + ([bias] if bias is not None else []),
                     attributes={"kernel_shape": [1] * d}, name=f"{base}_svd_b")
    first.outputs[0].type = node.outputs[0].type
    return [first, second]


def _gemm(graph: ir.Graph, node: ir.Node, layer: WeightLayer, a: np.ndarray, b: np.ndarray) -> list[ir.Node]:
    w = layer.weight.const_value
    base = node.name or layer.weight.name
    w1 = new_initializer(graph, b, w.dtype, f"{layer.weight.name}_svd_a")  # (r, K): transB=1
    w2 = new_initializer(graph, a, w.dtype, f"{layer.weight.name}_svd_b")  # (N, r): transB=1
    first_attrs = {"transB": 1, "transA": int(attr(node, "transA", 0)), "alpha": float(attr(node, "alpha", 1.0))}
    first = ir.node("Gemm", [node.inputs[0], w1], attributes=first_attrs, name=f"{base}_svd_a")
    c = node.inputs[2] if len(node.inputs) > 2 else None
    second_attrs = {"transB": 1, "beta": float(attr(node, "beta", 1.0))}
    second = ir.node("Gemm", [first.outputs[0], w2] + ([c] if c is not None else []),
                     attributes=second_attrs, name=f"{base}_svd_b")
    first.outputs[0].type = node.outputs[0].type
    return [first, second]


def _matmul(graph: ir.Graph, node: ir.Node, layer: WeightLayer, a: np.ndarray, b: np.ndarray) -> list[ir.Node]:
    w = layer.weight.const_value
    base = node.name or layer.weight.name
    w1 = new_initializer(graph, b.T, w.dtype, f"{layer.weight.name}_svd_a")  # (K, r)
    w2 = new_initializer(graph, a.T, w.dtype, f"{layer.weight.name}_svd_b")  # (r, N)
    first = ir.node("MatMul", [node.inputs[0], w1], name=f"{base}_svd_a")
    second = ir.node("MatMul", [first.outputs[0], w2], name=f"{base}_svd_b")
    first.outputs[0].type = node.outputs[0].type
    return [first, second]


_BUILDERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}
