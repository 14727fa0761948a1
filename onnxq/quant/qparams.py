"""Scale / zero-point maths for uniform integer quantization (numpy only).

For ``b`` bits, signed integers span ``[−2^(b−1), 2^(b−1) − 1]`` (strict symmetric drops the
lowest code so the grid is symmetric around 0: ``[−(2^(b−1) − 1), 2^(b−1) − 1]``) and unsigned
``[0, 2^b − 1]``. Quantize: ``q = clip(round(x / s) + z, qmin, qmax)``; dequantize:
``x̂ = (q − z)·s``. Symmetric: ``z = 0``, ``s = max|x| / qmax``. Rounding is round-half-to-even,
as ONNX ``QuantizeLinear`` does.
"""

from __future__ import annotations

__all__ = ["QRange", "qrange", "symmetric_scale", "fake_quantize", "affine_params", "quantize"]

import dataclasses

import numpy as np

#: smallest scale used for an all-zero tensor or channel (keeps 1/scale finite)
MIN_SCALE = 1e-12


@dataclasses.dataclass(frozen=True)
class QRange:
    qmin: int
    qmax: int


def qrange(bits: int, signed: bool = True, strict: bool = False) -> QRange:
    if not 2 <= bits <= 32:
        raise ValueError(f"bit-width {bits} outside 2..32")
    if signed:
        hi = 2 ** (bits - 1) - 1
        return QRange(-hi if strict else -hi - 1, hi)
    return QRange(0, 2**bits - 1)


def symmetric_scale(absmax: np.ndarray | float, bits: int) -> np.ndarray:
    """Scale mapping ``absmax`` to the largest positive code of a signed ``bits`` grid."""
    hi = 2 ** (bits - 1) - 1
    return np.maximum(np.asarray(absmax, dtype=np.float64) / hi, MIN_SCALE)


def fake_quantize(
    x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | float, rng: QRange
) -> np.ndarray:
    """Quantize then dequantize ``x`` (float64 arithmetic, result in x's dtype)."""
    xd = np.asarray(x, dtype=np.float64)
    q = np.clip(np.rint(xd / scale) + zero_point, rng.qmin, rng.qmax)
    return ((q - zero_point) * scale).astype(x.dtype)


def affine_params(
    lo: np.ndarray | float, hi: np.ndarray | float, bits: int, symmetric: bool, strict: bool = False
) -> tuple[np.ndarray, np.ndarray, QRange]:
    """(scale, zero_point, range) of a grid covering [lo, hi] (always including 0).

    Symmetric: signed grid, ``z = 0``, ``s = max(|lo|, |hi|) / qmax``. Asymmetric: unsigned grid,
    ``s = (hi − lo) / (qmax − qmin)``, ``z = round(qmin − lo / s)`` clipped to the grid, so 0 is
    exactly representable.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        rng = qrange(bits, signed=True, strict=strict)
        scale = np.maximum(np.maximum(-lo, hi) / rng.qmax, MIN_SCALE)
        return scale, np.zeros_like(scale, dtype=np.int64), rng
    rng = qrange(bits, signed=False)
    scale = np.maximum((hi - lo) / (rng.qmax - rng.qmin), MIN_SCALE)
    zero = np.clip(np.rint(rng.qmin - lo / scale), rng.qmin, rng.qmax).astype(np.int64)
    return scale, zero, rng


def quantize(x: np.ndarray, scale, zero_point, rng: QRange) -> np.ndarray:
    """Integer codes of ``x`` (int64), rounding half to even."""
    return np.clip(np.rint(np.asarray(x, np.float64) / scale) + zero_point, rng.qmin, rng.qmax).astype(
        np.int64
    )
