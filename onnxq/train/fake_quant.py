"""Fake quantization in torch that equals onnxruntime's QuantizeLinear/DequantizeLinear bit for bit,
with the gradients used for quantization-aware training.

Forward (ONNX, float32 arithmetic as onnxruntime's kernels do it)::

    q  = clamp(round_half_even(x / s) + z, qmin, qmax)        QuantizeLinear
    x̂  = (q − z) · s                                           DequantizeLinear

Backward:

* **straight-through estimator** for the rounding: ``∂round(u)/∂u := 1``, so inside the grid
  ``∂x̂/∂x = 1`` and outside it ``0`` (the clamp's own gradient);
* **LSQ's clip-aware scale gradient** follows from the same rule by the chain rule
  (Esser et al., 2020)::

      ∂x̂/∂s = round(x/s) − x/s        if qmin ≤ round(x/s) + z ≤ qmax
              qmin − z  or  qmax − z   below / above the grid

* the **zero point** (asymmetric grids) is a real number rounded with the STE, so
  ``∂x̂/∂z = 0`` inside the grid and ``−s`` where the input is clipped (LSQ+).

The scale is parametrized as ``s = s₀ · exp(θ)`` with ``θ`` learned from 0: ``exp(0) = 1``
exactly, so an untrained quantizer reproduces the calibrated float32 scale bit for bit, and an
optimizer step changes the scale by a relative amount (scales span many decades in one model).
"""

from __future__ import annotations

__all__ = ["channel_shape", "dequantize", "fake_quantize", "grid_of", "quantize", "round_ste"]

from typing import Any

import torch

#: (bits, signed) of the ONNX integer types a QuantizeLinear may produce
_GRIDS: dict[str, tuple[int, int]] = {
    "INT4": (-8, 7), "UINT4": (0, 15), "INT8": (-128, 127), "UINT8": (0, 255),
    "INT16": (-32768, 32767), "UINT16": (0, 65535), "INT32": (-(2**31), 2**31 - 1),
}


def grid_of(dtype_name: str) -> tuple[int, int]:
    """(qmin, qmax) of an ONNX integer data type name (``"INT8"``, ``"UINT4"``, …)."""
    try:
        return _GRIDS[dtype_name]
    except KeyError:
        raise ValueError(f"no integer grid for data type {dtype_name}") from None


class _RoundSTE(torch.autograd.Function):
    """Round half to even in the forward pass, identity in the backward pass."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, u: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(u)  # torch.round rounds half to even, as ONNX QuantizeLinear

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def round_ste(u: torch.Tensor) -> torch.Tensor:
    """``round_half_even(u)`` whose gradient is passed straight through."""
    return _RoundSTE.apply(u)


def channel_shape(scale: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """``scale`` reshaped to broadcast along ``axis`` of an ``ndim``-D tensor (as is if per tensor)."""
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return scale.reshape(shape)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Integer codes of ``x`` as a float tensor (exact for every grid up to 16 bits)."""
    s = channel_shape(scale, x.ndim, axis)
    z = channel_shape(zero_point, x.ndim, axis)
    return torch.clamp(round_ste(x / s) + z, qmin, qmax)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None
) -> torch.Tensor:
    """``(q − z) · s`` in float32, as DequantizeLinear."""
    s = channel_shape(scale, q.ndim, axis)
    z = channel_shape(zero_point, q.ndim, axis)
    return (q - z) * s


class _FakeQuant(torch.autograd.Function):
    """Fused Q→DQ: the same float32 operations as :func:`quantize` + :func:`dequantize` in the
    forward pass (bit for bit), the STE / LSQ gradients computed directly in the backward pass
    (one recomputation instead of six saved intermediate tensors)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor,  # type: ignore[override]
                qmin: int, qmax: int) -> torch.Tensor:
        ctx.save_for_backward(x, s, z)
        ctx.grid = (qmin, qmax)
        q = torch.round(x / s).add_(z).clamp_(qmin, qmax)
        return q.sub_(z).mul_(s)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, s, z = ctx.saved_tensors
        qmin, qmax = ctx.grid
        u = x / s
        r = torch.round(u)
        q = r + z
        inside = (q >= qmin) & (q <= qmax)
        grad_x = g * inside if ctx.needs_input_grad[0] else None
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, r - u, q.clamp(qmin, qmax) - z)
            grad_s = _reduce_to(g * ds, s.shape)
        if ctx.needs_input_grad[2]:
            grad_z = _reduce_to(torch.where(inside, torch.zeros_like(g), -g * s), z.shape)
        return grad_x, grad_s, grad_z, None, None


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dimensions that were broadcast from ``shape``."""
    if t.shape == shape:
        return t
    lead = t.ndim - len(shape)
    dims = list(range(lead)) + [i + lead for i, n in enumerate(shape) if n == 1 and t.shape[i + lead] != 1]
    return t.sum(dim=dims, keepdim=True).reshape(shape) if dims else t.reshape(shape)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x)) with the STE / LSQ gradients described above.

    ``zero_point`` may be a real-valued tensor (a learned offset): it is rounded (STE) and kept on
    the grid first, so the forward pass always uses an integer zero point, as the exported model.
    """
    z = torch.clamp(round_ste(zero_point), qmin, qmax)
    s = channel_shape(scale, x.ndim, axis)
    return _FakeQuant.apply(x, s, channel_shape(z, x.ndim, axis), qmin, qmax)
