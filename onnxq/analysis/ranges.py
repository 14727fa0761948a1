"""Step 4 of an analysis: the ranges quantizers have to cover.

* **Weights**, per layer: the min and max of every output channel (canonical layout, see
  :mod:`onnxq.passes._layers`), the spread ``max_c r_c / median_c r_c`` with ``r_c = max |W[c]|``
  (as ``onnxq inspect`` computes it) and the grid the QDQ model uses; the same after CLE when the
  analysis ran it. Per-tensor quantization gives every channel the step of the widest one, so a
  large spread means the narrow channels keep few levels.
* **Activations**, per quantizer: the calibration histogram (2048 bins, merged to ``bins`` for
  the report), the observed min/max, the encoding's grid ``[(qmin − z)·s, (qmax − z)·s]`` and
  the fraction of calibration values more than half a step outside it (clipped).
"""

from __future__ import annotations

__all__ = ["activation_ranges", "weight_ranges"]

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.analysis.quantizers import Quantizer
from onnxq.passes._layers import as_layer


def _layers_by_node(model: ir.Model) -> dict[str, Any]:
    out = {}
    for node in model.graph:
        layer = as_layer(node)
        if not isinstance(layer, str) and node.name:
            out[node.name] = layer
    return out


def _channel_stats(layer: Any) -> dict[str, Any]:
    wc = layer.canonical().astype(np.float64)
    flat = wc.reshape(wc.shape[0], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    r = np.maximum(np.abs(lo), np.abs(hi))
    med = float(np.median(r)) if r.size else 0.0
    top = float(r.max()) if r.size else 0.0
    spread = top / med if med > 0 else (float("inf") if top > 0 else 1.0)
    return {"min": lo.tolist(), "max": hi.tolist(), "spread": spread, "max_abs": top}


def weight_ranges(
    quantizers: Sequence[Quantizer],
    float_model: ir.Model,
    after_cle: ir.Model | None = None,
) -> dict[str, dict[str, Any]]:
    """``{quantizer id: {"node", "op_type", "depthwise", "channels", "min", "max", "spread",
    "grid", "cle": {...} | None}}`` for every weight quantizer."""
    before = _layers_by_node(float_model)
    after = _layers_by_node(after_cle) if after_cle is not None else {}
    out: dict[str, dict[str, Any]] = {}
    for q in quantizers:
        if q.kind != "weight" or q.node not in before:
            continue
        layer = before[q.node]
        stats = _channel_stats(layer)
        out[q.id] = {
            "node": q.node, "op_type": q.op_type, "depthwise": bool(layer.is_depthwise),
            "groups": int(layer.groups), "channels": len(stats["min"]), **stats,
            "grid": list(q.grid_range), "per_channel": q.per_channel,
            "cle": _channel_stats(after[q.node]) if q.node in after else None,
        }
    return out


def _merge(counts: np.ndarray, bins: int) -> np.ndarray:
    factor = max(1, len(counts) // bins)
    usable = (len(counts) // factor) * factor
    return counts[:usable].reshape(-1, factor).sum(axis=1)


def activation_ranges(
    quantizers: Sequence[Quantizer], observers: Mapping[str, Any], bins: int = 128
) -> dict[str, dict[str, Any]]:
    """``{quantizer id: {"tensor", "min", "max", "grid", "clipped", "hist", "lo", "width"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for q in quantizers:
        obs = observers.get(q.tensor)
        if q.kind != "activation" or obs is None or obs.count == 0:
            continue
        edges = obs.edges
        centers = (edges[:-1] + edges[1:]) / 2
        g_lo, g_hi = q.grid_range
        half = (g_hi - g_lo) / (2 ** q.bits - 1) / 2  # within half a step of the grid: rounding
        beyond = (centers < g_lo - half) | (centers > g_hi + half)
        outside = obs.hist[beyond].sum() if obs.width > 0 else 0
        merged = _merge(obs.hist, bins)
        factor = len(obs.hist) // len(merged)
        out[q.id] = {
            "tensor": q.tensor, "node": q.node, "op_type": q.op_type,
            "min": float(obs.min), "max": float(obs.max), "grid": [g_lo, g_hi],
            "bits": q.bits, "clipped": float(outside) / max(obs.count, 1),
            "hist": merged.astype(int).tolist(), "lo": float(obs.lo),
            "width": float(obs.width * factor),
        }
    return out
