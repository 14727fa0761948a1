"""Encodings files, keyed by ONNX tensor name: AIMET format 1.0.0 and 2.0.0, out and in.

1.0.0: ``{"version": "1.0.0", "activation_encodings": [...], "param_encodings": [...]}`` with
entries ``name, enc_type (PER_TENSOR|PER_CHANNEL), dtype, bw, is_sym, scale[], offset[]`` where
AIMET's offset is the negated zero point (the grid's minimum is ``offset · scale``; for an
unsigned asymmetric grid ``offset = −zero_point``). 2.0.0: ``{"version": "2.0.0", "encodings":
[...]}`` with ``name, output_dtype (uint8|int8|…), y_scale, y_zero_point, axis, block_size`` —
the QuantizeLinear attributes themselves. Weights whose grid and rounding an algorithm chose
(AdaRound, SeqMSE) carry ``"is_frozen": true`` so a later calibration keeps them. Reading either gives :class:`Encoding` objects that
rebuild the same Q/DQ model exactly (see :func:`onnxq.quant.sim.quantize_with_encodings`).
"""

from __future__ import annotations

__all__ = ["to_aimet_v1", "to_v2", "read_encodings", "write_encodings"]

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from onnxq.errors import ConfigError
from onnxq.quant.insert_qdq import Encoding


def _dtype(e: Encoding) -> str:
    return f"{'int' if e.signed else 'uint'}{e.bits}"


def to_aimet_v1(encodings: Iterable[Encoding], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    def entry(e: Encoding) -> dict[str, Any]:
        grid = e.grid()
        return {
            "name": e.name,
            "enc_type": "PER_CHANNEL" if e.axis is not None and len(e.scale) > 1 else "PER_TENSOR",
            "dtype": "INT", "bw": e.bits, "is_sym": e.symmetric,
            "scale": list(e.scale), "offset": list(e.offset),
            "min": [(grid.qmin - z) * s for s, z in zip(e.scale, e.zero_point)],
            "max": [(grid.qmax - z) * s for s, z in zip(e.scale, e.zero_point)],
            **({"axis": e.axis} if e.axis is not None else {}),
            **({"is_frozen": True} if e.frozen else {}),
        }

    encodings = list(encodings)
    data = {
        "version": "1.0.0",
        "activation_encodings": [entry(e) for e in encodings if e.kind == "activation"],
        "param_encodings": [entry(e) for e in encodings if e.kind == "param"],
    }
    data.update(extra or {})
    return data


def to_v2(encodings: Iterable[Encoding]) -> dict[str, Any]:
    out = []
    for e in encodings:
        entry: dict[str, Any] = {
            "name": e.name, "kind": e.kind, "output_dtype": _dtype(e),
            "y_scale": list(e.scale) if len(e.scale) > 1 or e.axis is not None else e.scale[0],
            "y_zero_point": list(e.zero_point) if len(e.scale) > 1 or e.axis is not None
            else e.zero_point[0],
        }
        if e.axis is not None:
            entry["axis"] = e.axis
        if e.frozen:
            entry["is_frozen"] = True
        out.append(entry)
    return {"version": "2.0.0", "encodings": out}


def write_encodings(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def _from_v1(entry: dict[str, Any], kind: str) -> Encoding:
    scale = tuple(float(s) for s in entry["scale"])
    zero = tuple(-int(o) for o in entry["offset"])
    bits, sym = int(entry["bw"]), bool(entry["is_sym"])
    axis = entry.get("axis")
    if axis is None and entry.get("enc_type") == "PER_CHANNEL":
        axis = 0
    return Encoding(entry["name"], kind, bits, sym, sym or any(z < 0 for z in zero), scale, zero,
                    axis, bool(entry.get("is_frozen", False)))


def _from_v2(entry: dict[str, Any]) -> Encoding:
    dtype = str(entry["output_dtype"])
    signed = not dtype.startswith("u")
    bits = int(dtype.lstrip("uint"))
    scale = entry["y_scale"]
    zero = entry["y_zero_point"]
    scale = tuple(float(s) for s in (scale if isinstance(scale, list) else [scale]))
    zero = tuple(int(z) for z in (zero if isinstance(zero, list) else [zero]))
    kind = entry.get("kind", "param" if entry.get("axis") is not None else "activation")
    return Encoding(entry["name"], kind, bits, signed and not any(zero), signed, scale, zero,
                    entry.get("axis"), bool(entry.get("is_frozen", False)))


def read_encodings(path: str | os.PathLike) -> dict[str, Encoding]:
    """Encodings by tensor name from a 1.0.0 or 2.0.0 file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        version = str(data.get("version", ""))
        if version.startswith("1."):
            items = [_from_v1(e, "activation") for e in data.get("activation_encodings", [])]
            items += [_from_v1(e, "param") for e in data.get("param_encodings", [])]
        elif version.startswith("2."):
            items = [_from_v2(e) for e in data["encodings"]]
        else:
            raise ConfigError(f"{path}: unknown encodings version '{version}' (1.0.0 or 2.0.0)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable encodings file ({type(exc).__name__}: {exc})") from exc
    return {e.name: e for e in items}
