"""SpatialSVD: split a ``kh×kw`` Conv into a ``kh×1`` Conv with ``r`` outputs and a ``1×kw`` Conv.

For a 2-D Conv (group = 1) with weight ``W (O, C, kh, kw)``, reshape it to the matrix
``M[(c, i), (o, j)] = W[o, c, i, j]`` of shape ``(C·kh, O·kw)`` and take its truncated SVD
``M ≈ Σ_{t<r} σ_t·u_t·v_tᵀ`` (Eckart–Young: the best rank-``r`` approximation). With
``V[t, c, i] = √σ_t·u_t[(c, i)]`` and ``H[o, t, j] = √σ_t·v_t[(o, j)]``::

    W[o, c, i, j] ≈ Σ_t H[o, t, j]·V[t, c, i]

so ``Conv(x, W) ≈ Conv_{1×kw}(Conv_{kh×1}(x, V), H) + b`` (Jaderberg et al. 2014, AIMET's
spatial SVD). The geometry splits by axis: the first Conv keeps the height part of the pads,
strides and dilations (``pads = (top, 0, bottom, 0)``, ``strides = (s_h, 1)``,
``dilations = (d_h, 1)``), the second the width part (``pads = (0, left, 0, right)``,
``strides = (1, s_w)``, ``dilations = (1, d_w)``). This is exact for the full-rank split: the
first Conv has no bias, so zero-padding its output along the width is the same as padding ``x``
(Σ V·0 = 0). The bias goes on the second Conv.

MACs go from ``O·C·kh·kw·H_o·W_o`` to ``r·C·kh·H_o·W_i + O·r·kw·H_o·W_o`` (the first Conv runs
at the input width ``W_i``); a ratio ``ρ`` of the layer's MACs keeps the largest ``r`` within
``ρ`` of the original (needs the inferred shapes). Full rank is ``min(C·kh, O·kw)``.

Skipped with a reason: grouped/depthwise Convs, kernels that are already ``1×k``/``k×1``,
Convs that are not 2-D, ``auto_pad=SAME_*``, shared or non-constant weights.
"""

from __future__ import annotations

__all__ = ["SpatialSVD", "spatial_svd_macs"]

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxq.compress._common import (
    ConvGeometry,
    conv_geometry,
    float_problem,
    new_initializer,
    rank_for_ratio,
    replace_with,
    split_named,
    truncated_svd,
)
from onnxq.compress.weight_svd import ORIGIN_KEY
from onnxq.passes._graph import is_op, weight_problem
from onnxq.passes._layers import as_layer
from onnxq.passes.base import OnnxqPass

Shapes = Mapping[str, tuple[int, ...]]


def spatial_svd_macs(w_shape: tuple[int, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                     rank: int | None) -> int:
    """MACs of the Conv (``rank=None``) or of its rank-``rank`` spatial split, for the shapes."""
    o, c, kh, kw = w_shape
    n, _, h_o, w_o = out_shape
    w_i = in_shape[3]
    if rank is None:
        return n * o * c * kh * kw * h_o * w_o
    return n * (rank * c * kh * h_o * w_i + o * rank * kw * h_o * w_o)


class SpatialSVD(OnnxqPass):
    """Split the named Convs: ``ranks`` (exact) or ``ratios`` (fraction of MACs kept; the shapes
    are inferred when not given)."""

    name = "spatial-svd"
    verb = "split"

    def __init__(self, ranks: Mapping[str, int] | None = None,
                 ratios: Mapping[str, float] | None = None, shapes: Shapes | None = None) -> None:
        super().__init__()
        self.ranks = dict(ranks or {})
        self.ratios = dict(ratios or {})
        self.shapes = shapes
        self.chosen: dict[str, int] = {}

    def run_on_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        if graph is not model.graph:
            return False
        self.chosen = {}
        wanted = set(self.ranks) | set(self.ratios)
        shapes = self.shapes
        if shapes is None and set(self.ratios) - set(self.ranks):
            from onnxq.compress.macs import value_shapes

            shapes = value_shapes(model)
        return split_named(self, graph, wanted, lambda node: self._split(graph, node, shapes or {}))

    def _split(self, graph: ir.Graph, node: ir.Node, shapes: Shapes) -> str | None:
        if not is_op(node, "Conv"):
            return f"{node.op_type} is not a Conv"
        layer = as_layer(node)
        if isinstance(layer, str):
            return layer
        problem = weight_problem(layer.weight, [node]) or float_problem(layer.weight)
        if problem:
            return problem
        w = layer.weight.const_value.numpy()
        if w.ndim != 4:
            return f"{w.ndim - 2}-D Conv (spatial SVD splits 2-D kernels)"
        if layer.groups != 1:
            return f"grouped Conv (group={layer.groups}): spatial SVD needs group=1"
        o, c, kh, kw = w.shape
        if kh == 1 or kw == 1:
            return f"{kh}x{kw} kernel has nothing to split"
        geo = conv_geometry(node, w.shape)
        if isinstance(geo, str):
            return geo
        full = min(c * kh, o * kw)
        if node.name in self.ranks:
            rank = int(self.ranks[node.name])
            if rank < 1:
                return f"rank {rank} < 1"
            rank = min(rank, full)
        else:
            x_shape = shapes.get(node.inputs[0].name)
            y_shape = shapes.get(node.outputs[0].name)
            if x_shape is None or y_shape is None:
                return "input/output shapes unknown (needed to turn a MAC ratio into a rank)"
            rank = rank_for_ratio(float(self.ratios[node.name]), full,
                                  lambda r: spatial_svd_macs(w.shape, x_shape, y_shape, r),
                                  spatial_svd_macs(w.shape, x_shape, y_shape, None))
        matrix = w.astype(np.float64).transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
        a, b = truncated_svd(matrix, rank)  # a (C·kh, r), b (r, O·kw)
        v = a.reshape(c, kh, rank).transpose(2, 0, 1)[..., None]  # (r, C, kh, 1)
        h = b.reshape(rank, o, kw).transpose(1, 0, 2)[:, :, None, :]  # (O, r, 1, kw)
        new_nodes = _build(graph, node, geo, v, h, layer.weight)
        for n in new_nodes:
            n.meta[ORIGIN_KEY] = node.name
        replace_with(graph, node, new_nodes)
        self.chosen[node.name or ""] = rank
        return None


def _build(graph: ir.Graph, node: ir.Node, geo: ConvGeometry, v: np.ndarray, h: np.ndarray,
           weight: ir.Value) -> list[ir.Node]:
    dtype = weight.const_value.dtype
    base = node.name or weight.name
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    top, left, bottom, right = geo.pads
    wv = new_initializer(graph, v, dtype, f"{weight.name}_ssvd_v")
    wh = new_initializer(graph, h, dtype, f"{weight.name}_ssvd_h")
    first = ir.node("Conv", [node.inputs[0], wv], attributes={
        "kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1], "pads": [top, 0, bottom, 0],
    }, name=f"{base}_ssvd_v")
    first.outputs[0].type = node.outputs[0].type
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    second = ir.node("Conv", [first.outputs[0], wh] + ([bias] if bias is not None else []), attributes={
        "kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw], "pads": [0, left, 0, right],
    }, name=f"{base}_ssvd_h")
    return [first, second]
