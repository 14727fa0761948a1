"""Weight-only round-to-nearest: the simplest quantization, used to measure what a rewrite buys.

``round_weights`` replaces the weight of every Conv / ConvTranspose / Gemm / MatMul (constant
weight) by its symmetric ``bits``-bit fake-quantized value, per tensor or per output channel
(the canonical output axis of :mod:`onnxq.passes._layers`: Conv 0, ConvTranspose 1, Gemm by
transB, MatMul last). Activations stay float, so the accuracy it gives isolates the weight error
that cross-layer equalization addresses.
"""

from __future__ import annotations

__all__ = ["round_weights"]

import numpy as np
import onnx_ir as ir

from onnxq.passes._graph import set_constant
from onnxq.passes._layers import WeightLayer, as_layer
from onnxq.quant.qparams import fake_quantize, qrange, symmetric_scale


def round_weights(
    model: ir.Model,
    bits: int = 8,
    per_channel: bool = False,
    only: set[str] | None = None,
) -> ir.Model:
    """A copy of ``model`` with weights rounded; ``only`` limits it to these node names."""
    out = model.clone()
    rng = qrange(bits, signed=True, strict=True)
    done: set[int] = set()
    for node in ir.traversal.RecursiveGraphIterator(out.graph):
        layer = as_layer(node)
        if isinstance(layer, str) or (only is not None and node.name not in only):
            continue
        if id(layer.weight) in done:  # a weight shared by two layers is rounded once
            continue
        done.add(id(layer.weight))
        _round(layer, rng, bits, per_channel)
    return out


def _round(layer: WeightLayer, rng, bits: int, per_channel: bool) -> None:
    wc = layer.canonical().astype(np.float64)
    flat = np.abs(wc).reshape(wc.shape[0], -1)
    if per_channel:
        scale = symmetric_scale(flat.max(axis=1), bits).reshape((-1,) + (1,) * (wc.ndim - 1))
    else:
        scale = symmetric_scale(flat.max(), bits)
    rounded = fake_quantize(wc, scale, 0.0, rng)
    dtype = layer.weight.const_value.dtype.numpy()
    set_constant(layer.weight, layer.to_native(rounded).astype(dtype))
