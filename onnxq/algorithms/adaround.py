"""AdaRound: learn, per weight, whether to round down or up (Nagel et al. 2020, "Up or Down?").

For a layer with weight ``W``, grid scale ``s`` and zero point ``z`` (from weight calibration,
kept fixed), the soft-quantized weight is

    W̃(V) = s · (clip(⌊W/s⌋ + h(V) + z, q_min, q_max) − z),
    h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1   (rectified sigmoid)

and ``V`` minimizes, with Adam, over sampled output positions of calibration data,

    L(V) = mean_rows ‖f(W̃·x_q + b) − f(W·x + b)‖² + λ · Σ (1 − |2h(V) − 1|^β)

where ``x_q`` is the layer's input in the model whose earlier layers are already rounded (and
whose activations are quantized, by default), ``x`` the float model's input, ``f`` the
activation that follows the layer with its real parameters, ``λ = 0.01``. The regularizer is off
for the first 20 % of iterations (warm start), then ``β`` anneals from 20 to 2 (cosine), pushing
``h`` to 0 or 1. At the end the rounding is hard: ``h = 1`` where ``V ≥ 0``. ``V`` starts where
``h(V)`` equals the fractional part of ``W/s`` (so the soft weight starts at ``W``).

Everything is numpy: the loss and its gradient are written out (the derivative of the rectified
sigmoid is ``(ζ − γ)·σ(V)(1 − σ(V))`` inside (0, 1) and 0 where clipped).
"""

from __future__ import annotations

__all__ = ["AdaRoundConfig", "adaround", "round_layer", "rectified_sigmoid", "beta_at"]

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from onnxq.algorithms._driver import LayerJob, Solution, optimize_layers
from onnxq.algorithms._layers import Activation
from onnxq.passes._graph import attr

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


@dataclasses.dataclass(frozen=True)
class AdaRoundConfig:
    """AdaRound settings; the defaults are meant to be left alone."""

    iterations: int = 1000
    #: output positions per Adam step
    batch_rows: int = 256
    #: output positions sampled per layer (spread over the calibration batches)
    rows_per_layer: int = 8192
    reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2
    lr: float = 5e-3
    #: inputs from the model with activations quantized (False: weights-only model)
    act_quant: bool = True
    #: after rounding, refit the layer's bias on the same rows (Gauss-Newton on
    #: ‖f(W̃·x_q + b + δ) − target‖², after the activation, unlike bias correction which matches
    #: pre-activation means): at no extra pass over the data. Measured W4A8 (benchmarks/ptq.py,
    #: activation grids kept): PP-OCR rec CER 0.60 % → 0.27 % (600 lines); EfficientNet-Lite0
    #: top-1 0.865 → 0.861, within the noise of 244 images (before the grids were kept: KL(FP32‖Q)
    #: 0.149 → 0.119)
    fit_bias: bool = True
    #: after rounding (and the bias refit), refit each output channel's weight scale together
    #: with its bias on the same rows (Gauss-Newton on the same loss; the integer codes stay):
    #: the "optionally refined" grid of AdaRound. Per-channel weight grids only; a channel whose
    #: gain would leave [0.5, 2] keeps its scale. Off by default: it fits the calibration rows
    #: better and the held-out data no better (measured W4A8: EfficientNet-Lite0 KL(FP32‖Q) on 64
    #: calibration images 0.020 → 0.009, held-out top-1 0.865 → 0.861, measured before AdaRound
    #: kept its activation grids; PP-OCR rec CER 0.27 % → 0.95 % on 600 held-out lines, with them)
    fit_scale: bool = False
    #: what each layer reconstructs: ``"float"``, the FP32 model's output (the layer also makes
    #: up for the quantization error of its input, as AIMET does), or ``"input"``, its float
    #: weights applied to its own quantized input (the weights' rounding error alone). Measured
    #: W4A8 (``benchmarks/ptq.py``): EfficientNet-Lite0 held-out KL 0.121 → 0.189 and PP-OCR
    #: rec CER 0.27 % → 5.1 % with ``"input"``, but MiniLM R@1 0.284 → 0.309 (nearest 0.306):
    #: a transformer whose 8-bit activations lose more than its 4-bit weights does better with it
    target: str = "float"
    #: use at most this many calibration samples (None: all)
    max_samples: int | None = None
    memory_budget_mb: float = 1024.0
    seed: int = 0
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    #: the input whose zeros mark padding (``[N, L]``): MatMul rows ``[N, L, C]`` are sampled
    #: only where it is non-zero. ``"auto"``: the one integer rank-2 input named ``*mask*``
    #: (``attention_mask``), if any, when ``act_quant`` (a weights-only fit recalibrates the
    #: activations on every position afterwards: unfitted padding would set their grids);
    #: ``None``: every position
    row_mask: str | None = "auto"

    def __post_init__(self) -> None:
        if self.target not in ("float", "input"):
            from onnxq.errors import ConfigError

            raise ConfigError(f"AdaRound target '{self.target}' is not one of float, input")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaRoundConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            from onnxq.errors import ConfigError

            raise ConfigError(f"unknown AdaRound setting(s): {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        for key in ("layers", "exclude"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    return np.clip(_sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_v(rest: np.ndarray) -> np.ndarray:
    """``V`` with ``h(V) = rest`` (rest in [0, 1))."""
    r = np.clip(rest, 1e-4, 1 - 1e-4)
    return -np.log((ZETA - GAMMA) / (r - GAMMA) - 1.0)


def beta_at(iteration: int, cfg: AdaRoundConfig) -> float | None:
    """β at ``iteration`` (None during the warm start: no regularization yet)."""
    start = cfg.warm_start * cfg.iterations
    if iteration < start:
        return None
    rel = (iteration - start) / max(cfg.iterations - start, 1)
    return cfg.beta_end + 0.5 * (cfg.beta_start - cfg.beta_end) * (1 + math.cos(rel * math.pi))


def _forward(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(rows, G, K) · (G, O, K) → (rows, G·O)."""
    g, o, _ = w.shape
    if g == 1:
        return x[:, 0, :] @ w[0].T
    if o == 1:
        return np.einsum("rgk,gk->rg", x, w[:, 0, :])
    return np.einsum("rgk,gok->rgo", x, w).reshape(x.shape[0], g * o)


def _backward(x: np.ndarray, dy: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """∂L/∂W for ``dy`` (rows, G·O): (G, O, K)."""
    g, o, k = shape
    if g == 1:
        return (dy.T @ x[:, 0, :])[None]
    if o == 1:
        return np.einsum("rg,rgk->gk", dy, x)[:, None, :]
    return np.einsum("rgo,rgk->gok", dy.reshape(-1, g, o), x)


def reconstruction_loss(job: LayerJob, w: np.ndarray, rows: np.ndarray | None = None) -> float:
    """mean over rows of ‖f(w·x + b) − target‖² (all rows when ``rows`` is None)."""
    x = job.inputs if rows is None else job.inputs[rows]
    t = np.asarray(job.target if rows is None else job.target[rows])
    act: Activation = job.layer.activation
    err = act(_forward(x, w.astype(np.float32)) + job.bias) - t
    return float(np.mean(np.sum(err.astype(np.float64) ** 2, axis=1)))


class _Problem:
    """The AdaRound objective of one layer on a minibatch, and its gradient in ``V``."""

    def __init__(self, const: np.ndarray, slope: np.ndarray, bias: np.ndarray, act: Activation,
                 shape: tuple[int, int, int], reg: float) -> None:
        self.const, self.slope, self.bias, self.act = const, slope, bias, act
        self.shape, self.reg = shape, reg

    def loss_and_grad(self, v: np.ndarray, x: np.ndarray, t: np.ndarray,
                      beta: float | None, with_loss: bool = False) -> tuple[float, np.ndarray]:
        """(loss or NaN when not ``with_loss``, ∂loss/∂V)."""
        k_sig = np.float32(ZETA - GAMMA)
        sig = _sigmoid(v)
        h = np.clip(sig * k_sig + np.float32(GAMMA), 0.0, 1.0)
        wq = h * self.slope
        wq += self.const
        y = _forward(x, wq)
        y += self.bias
        err = self.act(y) - t
        rows = x.shape[0]
        loss = float(np.einsum("ro,ro->", err, err, dtype=np.float64)) / rows if with_loss else math.nan
        err *= self.act.grad(y)
        err *= np.float32(2.0 / rows)
        dh = _backward(x, err, self.shape)
        dh *= self.slope
        if beta is not None:
            u = 2 * h - 1
            if with_loss:
                loss += self.reg * float(np.sum(1 - np.abs(u.astype(np.float64)) ** beta))
            dh -= np.float32(self.reg * 2 * beta) * np.sign(u) * np.abs(u) ** np.float32(beta - 1)
        # dh/dv = (ζ − γ)·σ(1 − σ) where 0 < (ζ − γ)σ + γ < 1, i.e. |σ − ½| < ½ / (ζ − γ)
        dv = dh * (sig * (1 - sig) * k_sig * (np.abs(sig - 0.5) < np.float32(0.5 / (ZETA - GAMMA))))
        return loss, dv


def round_layer(job: LayerJob, cfg: AdaRoundConfig) -> Solution:
    """Optimize one layer's rounding; returns its integer codes (shape of ``job.weight``)."""
    if cfg.target == "input":  # the float weights on this layer's own (quantized) input rows
        y = _forward(job.inputs, job.weight.astype(np.float32)) + job.bias
        job = dataclasses.replace(job, target=job.layer.activation(y).astype(np.float32))
    w, s, z, grid = job.weight, job.scale, job.zero, job.grid
    lo, hi = float(grid.qmin), float(grid.qmax)
    w_s = w.astype(np.float64) / s
    floor = np.floor(w_s)
    base = floor + z  # the code when rounding down
    # a weight can move only when both of its candidate codes lie on the grid; the others are
    # fixed at the clipped code (clip(base + h) does not depend on h there)
    movable = (base >= lo) & (base + 1 <= hi)
    const = ((np.clip(base, lo, hi) - z) * s).astype(np.float32)  # W̃ = const + S·h
    slope = (s * movable).astype(np.float32)
    v = _init_v(w_s - floor).astype(np.float32)
    act = job.layer.activation
    m = np.zeros_like(v)
    sq = np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    rows = job.inputs.shape[0]
    batch = min(cfg.batch_rows, rows)
    rng = job.rng
    nearest = np.clip(np.rint(w_s) + z, lo, hi)
    loss_nearest = reconstruction_loss(job, ((nearest - z) * s).astype(np.float32))
    # rows shuffled once, then read in contiguous minibatches (a gather per step costs more
    # than the step's arithmetic on wide depthwise layers)
    order = rng.permutation(rows)
    xs = job.inputs[order]
    ts = np.asarray(job.target)[order]
    start = 0
    problem = _Problem(const, slope, job.bias, act, w.shape, cfg.reg)
    for it in range(cfg.iterations):
        if start + batch > rows:
            start = 0
        x = xs[start:start + batch]
        t = ts[start:start + batch]
        start += batch
        _, dv = problem.loss_and_grad(v, x, t, beta_at(it, cfg))
        m *= b1
        m += (1 - b1) * dv
        sq *= b2
        dv *= dv
        sq += (1 - b2) * dv
        step = cfg.lr * math.sqrt(1 - b2 ** (it + 1)) / (1 - b1 ** (it + 1))
        v -= np.float32(step) * m / (np.sqrt(sq) + np.float32(eps))
    codes = np.clip(base + (v >= 0), lo, hi).astype(np.int64)
    w_hard = ((codes - z) * s).astype(np.float32)
    loss = reconstruction_loss(job, w_hard)
    info = {"loss_nearest": round(loss_nearest, 6), "loss": round(loss, 6)}
    bias = None
    if cfg.fit_bias and _bias_writable(job):
        bias = fit_bias(job, w_hard)
        fitted = reconstruction_loss(dataclasses.replace(job, bias=bias), w_hard)
        if fitted < loss:
            info["loss_bias"] = round(fitted, 6)
            loss = fitted
        else:
            bias = None
    scale = None
    if cfg.fit_scale and len(job.encoding.scale) > 1:
        fitted_job = job if bias is None else dataclasses.replace(job, bias=bias)
        gain, new_bias = fit_gain(fitted_job, w_hard, with_bias=_bias_writable(job))
        refit = dataclasses.replace(job, bias=new_bias)
        refit_loss = reconstruction_loss(refit, w_hard * gain.reshape(w_hard.shape[:2] + (1,)))
        if refit_loss < loss:
            info["loss_scale"] = round(refit_loss, 6)
            loss = refit_loss
            scale = s * gain.reshape(s.shape)
            bias = new_bias if _bias_writable(job) else None
    if loss > loss_nearest:  # never worse than nearest rounding on the layer's own loss
        info["kept"] = "nearest"
        return Solution(nearest.astype(np.int64), info=info)
    return Solution(codes, scale=scale, bias=bias, info=info)


def _bias_writable(job: LayerJob) -> bool:
    wl = getattr(job.layer, "weight_layer", None)  # None: a bare row problem, no graph layer
    if wl is None or job.layer.op_type not in ("Conv", "ConvTranspose", "Gemm") or wl.bias_value is None:
        return False
    return wl.bias_problem() is None and float(attr(job.layer.node, "beta", 1.0)) == 1.0


def fit_bias(job: LayerJob, w: np.ndarray, steps: int = 8) -> np.ndarray:
    """The bias ``b + δ`` minimizing ``mean_rows ‖f(w·x + b + δ) − target‖²`` per output channel
    (Gauss-Newton: ``δ ← δ − Σ r·f' / Σ f'²``; exact in one step without an activation)."""
    y = _forward(job.inputs, w.astype(np.float32)) + job.bias
    t = np.asarray(job.target)
    act: Activation = job.layer.activation
    delta = np.zeros(y.shape[1], np.float64)
    for _ in range(steps):
        z = y + delta.astype(np.float32)
        r = (act(z) - t).astype(np.float64)
        g = act.grad(z).astype(np.float64)
        den = np.sum(g * g, axis=0)
        step = np.where(den > 0, np.sum(r * g, axis=0) / np.maximum(den, 1e-12), 0.0)
        delta -= step
        if np.max(np.abs(step)) < 1e-7:
            break
    return (job.bias.astype(np.float64) + delta).astype(np.float32)


def fit_gain(
    job: LayerJob, w: np.ndarray, with_bias: bool = True, steps: int = 8,
    bounds: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Per output row, the gain ``g`` (and, ``with_bias``, the bias ``b + δ``) minimizing
    ``mean_rows ‖f(g·(w·x) + b + δ) − target‖²`` (Gauss-Newton on the 2×2 normal equations of each
    row; exact in one step without an activation). Returns ``(g, bias)``, shapes ``(G·O,)``; a row
    whose solution is singular or leaves ``bounds`` keeps ``g = 1`` and its bias."""
    u = _forward(job.inputs, w.astype(np.float32)).astype(np.float64)
    t = np.asarray(job.target, np.float64)
    b = job.bias.astype(np.float64)
    act: Activation = job.layer.activation
    gain = np.ones(u.shape[1])
    delta = np.zeros(u.shape[1])
    for _ in range(steps):
        z = (gain * u + b + delta).astype(np.float32)
        r = (act(z) - t).astype(np.float64)
        d = act.grad(z).astype(np.float64)
        jg, jd = d * u, d
        agg, agd, add = np.sum(jg * jg, 0), np.sum(jg * jd, 0), np.sum(jd * jd, 0)
        rg, rd = np.sum(r * jg, 0), np.sum(r * jd, 0)
        if with_bias:
            det = agg * add - agd * agd
            ok = det > 1e-12 * np.maximum(agg * add, 1e-30)
            safe = np.where(ok, det, 1.0)
            step_g = np.where(ok, (add * rg - agd * rd) / safe, 0.0)
            step_d = np.where(ok, (agg * rd - agd * rg) / safe, 0.0)
        else:
            step_g = np.where(agg > 0, rg / np.maximum(agg, 1e-30), 0.0)
            step_d = np.zeros_like(step_g)
        gain -= step_g
        delta -= step_d
        if max(np.max(np.abs(step_g)), np.max(np.abs(step_d))) < 1e-7:
            break
    keep = ~np.isfinite(gain) | (gain < bounds[0]) | (gain > bounds[1]) | ~np.isfinite(delta)
    gain[keep], delta[keep] = 1.0, 0.0
    return gain, (b + delta).astype(np.float32)


def adaround(
    sim: Any,
    data: Any,
    config: AdaRoundConfig | None = None,
    progress: Callable[[str, int, int], Any] | None = None,
    **overrides: Any,
) -> Any:
    """AdaRound every quantized weight layer of ``sim``; returns a new :class:`QuantSim`.

    ``data``: calibration data (anything :func:`onnxq.runtime.data.as_batches` accepts, iterated
    once per layer). Settings: an :class:`AdaRoundConfig` and/or keyword overrides.
    """
    cfg = dataclasses.replace(config or AdaRoundConfig(), **overrides)
    return optimize_layers(
        sim, data, lambda job: round_layer(job, cfg), what="adaround",
        rows_per_layer=cfg.rows_per_layer, act_quant=cfg.act_quant, max_samples=cfg.max_samples,
        memory_budget_mb=cfg.memory_budget_mb, seed=cfg.seed, layers=cfg.layers,
        exclude=cfg.exclude, progress=progress, row_mask=cfg.row_mask,
    )


def _as_tuple(names: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if names is None else tuple(names)
