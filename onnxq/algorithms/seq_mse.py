"""Sequential MSE: per layer, choose the weight range that minimizes the layer's output error.

For a layer with weight rows ``W_o`` (one per output channel, or the whole tensor when quantized
per tensor), candidate ranges are fractions of the calibrated one,
``[α·min W_o, α·max W_o]`` for ``α = i / N`` (i = 1 … N). Each candidate quantizes the weight
with nearest rounding; the chosen one minimizes, over sampled output positions,

    Σ_rows (f(Q_α(W_o)·x_q + b_o) − f(W_o·x + b_o))²

where ``x_q`` is the input in the model whose earlier layers are already done and ``f`` the
activation after the layer with its real parameters. The error of output channel ``o`` depends
only on row ``o``, so all channels are searched at once: N forward passes per layer. The chosen
scales (and zero points) are frozen; AdaRound can then optimize the rounding on that grid.
"""

from __future__ import annotations

__all__ = ["SeqMseConfig", "seq_mse", "search_layer"]

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from onnxq.algorithms._driver import LayerJob, Solution, optimize_layers
from onnxq.algorithms.adaround import _forward


@dataclasses.dataclass(frozen=True)
class SeqMseConfig:
    """Sequential-MSE settings."""

    candidates: int = 20
    #: output positions sampled per layer
    rows_per_layer: int = 2048
    act_quant: bool = True
    max_samples: int | None = None
    memory_budget_mb: float = 1024.0
    seed: int = 0
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    #: padding mask for the MatMul rows, as :attr:`AdaRoundConfig.row_mask`
    row_mask: str | None = "auto"


def _grid_params(lo: np.ndarray, hi: np.ndarray, job: LayerJob) -> tuple[np.ndarray, np.ndarray]:
    g = job.grid
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    if job.encoding.symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / g.qmax, 1e-12)
        return scale, np.zeros_like(scale, dtype=np.int64)
    scale = np.maximum((hi - lo) / (g.qmax - g.qmin), 1e-12)
    zero = np.clip(np.rint(g.qmin - lo / scale), g.qmin, g.qmax).astype(np.int64)
    return scale, zero


def search_layer(job: LayerJob, cfg: SeqMseConfig) -> Solution:
    """Pick each output channel's (or the tensor's) range among ``cfg.candidates`` fractions."""
    w = job.weight.astype(np.float64)
    per_tensor = len(job.encoding.scale) == 1
    if per_tensor:
        lo_w = np.full(w.shape[:2] + (1,), w.min())
        hi_w = np.full(w.shape[:2] + (1,), w.max())
    else:
        lo_w = w.min(axis=2, keepdims=True)
        hi_w = w.max(axis=2, keepdims=True)
    g = job.grid
    x = job.inputs
    t = np.asarray(job.target)
    act = job.layer.activation
    best_err = None
    best_scale = job.scale.copy()
    best_zero = job.zero.copy()
    for i in range(1, cfg.candidates + 1):
        frac = i / cfg.candidates
        scale, zero = _grid_params(lo_w * frac, hi_w * frac, job)
        codes = np.clip(np.rint(w / scale) + zero, g.qmin, g.qmax)
        wq = ((codes - zero) * scale).astype(np.float32)
        err = act(_forward(x, wq) + job.bias) - t
        per_channel = np.einsum("ro,ro->o", err, err, dtype=np.float64).reshape(w.shape[:2] + (1,))
        if per_tensor:
            per_channel = np.full_like(per_channel, per_channel.sum())
        if best_err is None:
            best_err = per_channel
            best_scale, best_zero = scale, zero
            continue
        better = per_channel < best_err
        best_err = np.where(better, per_channel, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    codes = np.clip(np.rint(w / best_scale) + best_zero, g.qmin, g.qmax).astype(np.int64)
    shrink = float(np.mean(best_scale / np.maximum(job.scale, 1e-30)))
    return Solution(codes, scale=best_scale, zero=best_zero.astype(np.int64),
                    info={"mean_scale_ratio": round(shrink, 3)})


def seq_mse(
    sim: Any,
    data: Any,
    config: SeqMseConfig | None = None,
    progress: Callable[[str, int, int], Any] | None = None,
    **overrides: Any,
) -> Any:
    """Sequential MSE on every quantized weight layer of ``sim``; returns a new QuantSim."""
    cfg = dataclasses.replace(config or SeqMseConfig(), **overrides)
    return optimize_layers(
        sim, data, lambda job: search_layer(job, cfg), what="seq-mse",
        rows_per_layer=cfg.rows_per_layer, act_quant=cfg.act_quant, max_samples=cfg.max_samples,
        memory_budget_mb=cfg.memory_budget_mb, seed=cfg.seed, layers=cfg.layers,
        exclude=cfg.exclude, progress=progress, row_mask=cfg.row_mask,
    )
