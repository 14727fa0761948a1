"""Calibration data: every accepted form streamed as validated ``{input_name: ndarray}`` batches.

:func:`as_batches` accepts

- an iterable (list, generator, ``torch`` loader wrapper …) of ``{input_name: array}`` dicts;
- an object with ``get_next()`` — an onnxruntime ``CalibrationDataReader`` works as is: it is
  called until it returns ``None``;
- for single-input models: a list / tuple / iterable of arrays, **each one batch**, or a single
  ndarray, **one batch** (it is fed as is: give it the batch dimension the model expects);
- a single ``{input_name: array}`` dict: one batch;
- a path: a folder of ``.npy`` / ``.npz`` files read one at a time in file-name order (or one
  such file). An ``.npz`` holds one array per input, keyed by input name; for a single-input model
  an ``.npz`` with one array (any key) or an ``.npy`` is the batch;
- an :class:`ImageFolder` (images + :class:`Preprocess`) for single-input image models.

Every batch is checked against the model inputs and a bad one raises :class:`ConfigError` naming
the input and the batch (or file): unknown or missing input names, wrong rank or fixed dimension,
non-finite values, empty arrays, and dtypes of another kind. Casting rule: data of the same kind
is cast silently — any float to the input's float type (float64 → float32 loses nothing that
matters for calibration statistics, and numpy makes float64 by default), integers to the input's
integer type when every value fits; a float array for an integer input, an integer array for a
float input (e.g. raw ``uint8`` pixels: normalize them first), or bool for a non-bool input is an
error. An iterable that yields no batch at all is an error too.

Images need Pillow (``pip install pillow``, part of the ``test`` extra), imported only when an
:class:`ImageFolder` is read.
"""

from __future__ import annotations

__all__ = ["ImageFolder", "InputSpec", "Preprocess", "as_batches", "input_specs"]

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx_ir as ir

from onnxq.errors import ConfigError


class InputSpec(NamedTuple):
    """One model input: numpy dtype, shape with ``None`` for dynamic dims (``None``: rank unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None
    optional: bool = False  # an input with an initializer as default value


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs of ``model`` as :class:`InputSpec` (inputs backed by initializers are optional)."""
    specs = []
    for value in model.graph.inputs:
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else None
        shape = None
        if value.shape is not None:
            # a negative dimension (PaddlePaddle exports write -1) is dynamic, as a symbolic one
            shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)
        optional = value.name in model.graph.initializers
        specs.append(InputSpec(value.name, dtype, shape, optional))
    return specs


def _normalize_specs(model_inputs: Any) -> list[InputSpec]:
    if isinstance(model_inputs, ir.Model):
        return input_specs(model_inputs)
    specs = []
    for item in model_inputs:
        if isinstance(item, InputSpec):
            specs.append(item)
            continue
        name, dtype, shape, *rest = item
        shape = None if shape is None else tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
        dtype = None if dtype is None else np.dtype(dtype)
        specs.append(InputSpec(name, dtype, shape, bool(rest[0]) if rest else False))
    return specs


# -- validation ------------------------------------------------------------------------------------
def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _cast(where: str, spec: InputSpec, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise ConfigError(
            f"{where}: input '{spec.name}' is a {type(value).__name__}, not an array ({exc})"
        ) from exc
    want = spec.dtype
    if want is None or arr.dtype == want:
        return arr
    have = arr.dtype
    if want.kind == "f" and have.kind == "f":
        return arr.astype(want)
    if want.kind in "iu" and have.kind in "iu":
        info = np.iinfo(want)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(want)
        raise ConfigError(
            f"{where}: input '{spec.name}' has {have} values outside the range of {want} "
            f"[{info.min}, {info.max}]"
        )
    hint = ""
    if want.kind == "f" and have.kind in "iub":
        hint = " (convert and normalize the data to float first)"
    raise ConfigError(f"{where}: input '{spec.name}' is {have} but the model expects {want}{hint}")


def _check_array(where: str, spec: InputSpec, value: Any) -> np.ndarray:
    arr = _cast(where, spec, value)
    if arr.dtype.kind == "O":
        raise ConfigError(f"{where}: input '{spec.name}' is an object array, not numbers")
    if spec.shape is not None:
        if arr.ndim != len(spec.shape):
            raise ConfigError(
                f"{where}: input '{spec.name}' has shape {tuple(arr.shape)} (rank {arr.ndim}) "
                f"but the model expects rank {len(spec.shape)} {_fmt_shape(spec.shape)}"
            )
        pairs = enumerate(zip(arr.shape, spec.shape))
        bad = [i for i, (d, e) in pairs if e is not None and d != e]
        if bad:
            hint = ""
            inner = spec.shape[1:]
            if arr.ndim == 4 and None not in inner and sorted(arr.shape[1:]) == sorted(inner):
                hint = " (NCHW vs NHWC layout?)"
            raise ConfigError(
                f"{where}: input '{spec.name}' has shape {tuple(arr.shape)} but the model expects "
                f"{_fmt_shape(spec.shape)} (dimension {bad[0]}){hint}"
            )
    if arr.size == 0:
        raise ConfigError(f"{where}: input '{spec.name}' is empty (shape {tuple(arr.shape)})")
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        nan = int(np.isnan(arr).sum())
        inf = int(np.isinf(arr).sum())
        raise ConfigError(f"{where}: input '{spec.name}' has {nan} NaN and {inf} infinite values")
    return arr


def _check_batch(where: str, specs: list[InputSpec], batch: Any) -> dict[str, np.ndarray]:
    by_name = {s.name: s for s in specs}
    if not isinstance(batch, Mapping):
        raise ConfigError(
            f"{where}: expected a dict {{input_name: array}}, got {type(batch).__name__}"
        )
    unknown = [k for k in batch if k not in by_name]
    if unknown:
        raise ConfigError(
            f"{where}: unknown input '{unknown[0]}'; the model inputs are "
            f"{', '.join(repr(s.name) for s in specs if not s.optional) or 'none'}"
        )
    missing = [s.name for s in specs if not s.optional and s.name not in batch]
    if missing:
        raise ConfigError(f"{where}: input '{missing[0]}' is missing")
    return {name: _check_array(where, by_name[name], value) for name, value in batch.items()}


# -- normalization ---------------------------------------------------------------------------------
def _single_input(specs: list[InputSpec], what: str) -> str:
    required = [s.name for s in specs if not s.optional]
    if len(required) != 1:
        names = ", ".join(repr(n) for n in required) or "none"
        raise ConfigError(
            f"{what} only work for single-input models; this model has {len(required)} inputs "
            f"({names}): give dicts {{input_name: array}}"
        )
    return required[0]


def _reader_items(reader: Any) -> Iterator[Any]:
    while True:
        item = reader.get_next()
        if item is None:
            return
        yield item


def _raw_batches(data: Any, specs: list[InputSpec]) -> Iterator[tuple[str, Any]]:
    """(where, batch) pairs; batch is a dict or a bare array for single-input models."""
    if isinstance(data, (str, os.PathLike)):
        yield from _npy_batches(Path(data), specs)
        return
    if isinstance(data, np.ndarray):
        name = _single_input(specs, "bare arrays")
        yield "calibration batch 0", {name: data}
        return
    if isinstance(data, Mapping):
        yield "calibration batch 0", data
        return
    if hasattr(data, "get_next"):
        items: Iterable[Any] = _reader_items(data)
    elif isinstance(data, Iterable):
        items = data
    else:
        raise ConfigError(
            f"cannot read calibration data from a {type(data).__name__}: give an iterable of "
            "{input_name: array} dicts, a CalibrationDataReader, arrays, or a folder of .npy/.npz"
        )
    for index, item in enumerate(items):
        where = f"calibration batch {index}"
        if isinstance(item, Mapping):
            yield where, item
        elif isinstance(item, np.ndarray) or hasattr(item, "__array__"):
            yield where, {_single_input(specs, "bare arrays"): item}
        else:
            raise ConfigError(
                f"{where}: expected a dict {{input_name: array}} or an array, "
                f"got {type(item).__name__}"
            )


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _npy_batches(path: Path, specs: list[InputSpec]) -> Iterator[tuple[str, Any]]:
    if not path.exists():
        raise ConfigError(f"{path}: calibration data path does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".npy", ".npz"))
        if not files:
            images = any(p.suffix.lower() in _IMAGE_SUFFIXES for p in path.iterdir())
            hint = (
                "; it holds images: use ImageFolder(path, Preprocess(...)) "
                "(CLI: a preprocessing spec)"
                if images
                else ""
            )
            raise ConfigError(f"{path}: no .npy or .npz files in the calibration folder{hint}")
    elif path.suffix.lower() in (".npy", ".npz"):
        files = [path]
    else:
        raise ConfigError(f"{path}: calibration data must be a folder or an .npy/.npz file")
    for file in files:
        where = f"calibration file '{file.name}'"
        try:
            loaded = np.load(file, allow_pickle=False)
        except Exception as exc:
            raise ConfigError(f"{where}: cannot read it ({type(exc).__name__}: {exc})") from exc
        if isinstance(loaded, np.ndarray):
            yield where, {_single_input(specs, f"{where}: .npy files"): loaded}
            continue
        with loaded:
            keys = list(loaded.files)
            names = {s.name for s in specs}
            if len(keys) == 1 and keys[0] not in names:
                batch = {_single_input(specs, f"{where}: unnamed .npz arrays"): loaded[keys[0]]}
            else:
                batch = {k: loaded[k] for k in keys}
        yield where, batch


def as_batches(data: Any, model_inputs: Any) -> Iterator[dict[str, np.ndarray]]:
    """Validated ``{input_name: ndarray}`` batches from ``data`` (forms: module docstring).

    ``model_inputs``: an ``onnx_ir.Model`` or a list of ``(name, dtype, shape)`` with ``None`` for
    dynamic dimensions. A generator: errors are raised while iterating; an empty source raises
    :class:`ConfigError` at the end.
    """
    specs = _normalize_specs(model_inputs)
    count = 0
    for where, batch in _raw_batches(data, specs):
        yield _check_batch(where, specs, batch)
        count += 1
    if count == 0:
        names = ", ".join(repr(s.name) for s in specs if not s.optional)
        raise ConfigError(f"the calibration data yielded no batches (model inputs: {names})")


# -- images ----------------------------------------------------------------------------------------
_PRESETS = {
    # torchvision ImageNet models: pixels/255, then (x - mean) / std, per RGB channel
    "imagenet": "resize=256,crop=224,scale=1/255,mean=0.485/0.456/0.406,std=0.229/0.224/0.225",
    # Inception / EfficientNet-Lite style: [-1, 1]
    "inception": "resize=256,crop=224,mean=127.5,std=127.5",
}


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input.

    Steps: decode (``color``: RGB, BGR or L), ``resize`` to exactly ``(h, w)`` or
    ``resize_shorter`` side keeping the aspect ratio (bilinear), ``center_crop`` ``(h, w)``, then
    on the 0…255 pixel values ``x·scale + offset`` followed by ``(x − mean) / std`` per channel,
    cast to ``dtype``, laid out as ``layout`` (NCHW / NHWC), ``batch_size`` images per batch.
    """

    resize: tuple[int, int] | None = None
    resize_shorter: int | None = None
    center_crop: tuple[int, int] | None = None
    scale: float = 1.0
    offset: float = 0.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    color: str = "RGB"
    dtype: str = "float32"
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize_shorter is not None:
            raise ConfigError("preprocess: give resize=HxW or resize=N (shorter side), not both")
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"preprocess: layout must be NCHW or NHWC, got '{self.layout}'")
        if self.color not in ("RGB", "BGR", "L"):
            raise ConfigError(f"preprocess: color must be RGB, BGR or L, got '{self.color}'")
        if self.dtype not in ("float32", "float16", "uint8"):
            raise ConfigError(
                f"preprocess: dtype must be float32, float16 or uint8, got '{self.dtype}'"
            )
        if self.batch_size < 1:
            raise ConfigError(f"preprocess: batch must be >= 1, got {self.batch_size}")
        channels = 1 if self.color == "L" else 3
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) not in (1, channels):
                raise ConfigError(
                    f"preprocess: {key} needs 1 or {channels} values for color {self.color}, "
                    f"got {len(values)}"
                )
        if self.dtype == "uint8" and (any(self.mean) or any(s != 1 for s in self.std)):
            raise ConfigError("preprocess: dtype uint8 takes no mean/std (pixels stay 0..255)")
        if any(s == 0 for s in self.std) or self.scale == 0:
            raise ConfigError("preprocess: std and scale must be non-zero")
        for key in ("resize", "center_crop"):
            size = getattr(self, key)
            if size is not None and (len(size) != 2 or min(size) < 1):
                raise ConfigError(f"preprocess: {key} must be two positive sizes, got {size}")
        if self.resize_shorter is not None and self.resize_shorter < 1:
            raise ConfigError(f"preprocess: resize must be positive, got {self.resize_shorter}")

    @classmethod
    def from_string(cls, spec: str) -> Preprocess:
        """Parse ``"resize=256,crop=224,mean=127,std=128,layout=NCHW,color=RGB,batch=8"``.

        Keys: ``resize`` (``N``: shorter side, ``HxW``: exact), ``crop`` (``N`` or ``HxW``),
        ``scale`` / ``offset`` (numbers, fractions allowed: ``scale=1/255``), ``mean`` / ``std``
        (one value or one per channel separated by ``/``: ``mean=123.7/116.3/103.5``),
        ``layout``, ``color``, ``dtype``, ``batch``. A preset name (``imagenet``, ``inception``)
        may come first and be overridden: ``"imagenet,layout=NHWC"``.
        """
        fields: dict[str, Any] = {}
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if parts and "=" not in parts[0] and parts[0].lower() not in _KEYS:
            preset = parts.pop(0).lower()
            if preset not in _PRESETS:
                raise ConfigError(
                    f"preprocess: unknown preset '{preset}'; presets: {', '.join(_PRESETS)}"
                )
            parts = _PRESETS[preset].split(",") + parts
        for part in parts:
            key, sep, raw = part.partition("=")
            key, raw = key.strip().lower(), raw.strip()
            if not sep or not raw:
                raise ConfigError(f"preprocess: '{part}' is not key=value")
            try:
                _parse_field(fields, key, raw)
            except ValueError as exc:
                raise ConfigError(f"preprocess: bad value in '{part}' ({exc})") from None
        return cls(**fields)

    def apply(self, image: Any) -> np.ndarray:
        """One PIL image → ``(C, H, W)`` or ``(H, W, C)`` array (no batch dimension)."""
        from PIL import Image

        bilinear = getattr(Image, "Resampling", Image).BILINEAR
        image = image.convert("L" if self.color == "L" else "RGB")
        if self.resize is not None:
            h, w = self.resize
            image = image.resize((w, h), bilinear)
        elif self.resize_shorter is not None:
            w, h = image.size
            s = self.resize_shorter / min(w, h)
            image = image.resize((max(1, round(w * s)), max(1, round(h * s))), bilinear)
        if self.center_crop is not None:
            ch, cw = self.center_crop
            w, h = image.size
            if ch > h or cw > w:
                raise ValueError(f"crop {ch}x{cw} is larger than the resized image {h}x{w}")
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))
        x = np.asarray(image, dtype=np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        if self.color == "BGR":
            x = x[:, :, ::-1]
        if self.dtype == "uint8":
            x = np.clip(np.rint(x * self.scale + self.offset), 0, 255)
        else:
            x = (x * self.scale + self.offset - np.asarray(self.mean, np.float32)) / np.asarray(
                self.std, np.float32
            )
        x = x.astype(self.dtype)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x)


_KEYS = (
    "resize",
    "crop",
    "center_crop",
    "scale",
    "offset",
    "mean",
    "std",
    "layout",
    "color",
    "dtype",
    "batch",
    "batch_size",
)


def _number(raw: str) -> float:
    return float(Fraction(raw)) if "/" in raw else float(raw)


def _size(raw: str) -> tuple[int, int]:
    parts = raw.lower().split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise ValueError(f"'{raw}' is not N or HxW")


def _parse_field(fields: dict[str, Any], key: str, raw: str) -> None:
    if key == "resize":
        if "x" in raw.lower():
            fields["resize"], fields["resize_shorter"] = _size(raw), None
        else:
            fields["resize_shorter"], fields["resize"] = int(raw), None
    elif key in ("crop", "center_crop"):
        fields["center_crop"] = _size(raw)
    elif key in ("scale", "offset"):
        fields[key] = _number(raw)
    elif key in ("mean", "std"):
        fields[key] = tuple(float(v) for v in raw.split("/"))
    elif key in ("layout", "color"):
        fields[key] = raw.upper()
    elif key == "dtype":
        fields[key] = raw.lower()
    elif key in ("batch", "batch_size"):
        fields["batch_size"] = int(raw)
    else:
        raise ConfigError(
            f"preprocess: unknown key '{key}'; keys: resize, crop, scale, offset, mean, std, "
            "layout, color, dtype, batch"
        )


class ImageFolder:
    """Images under ``path`` (recursively, in sorted path order) as preprocessed batches.

    Iterating yields ``(batch_size, …)`` arrays, the last batch possibly smaller unless
    ``drop_last``; ``limit`` caps the number of images. Pass it as calibration data of a
    single-input model. Needs Pillow.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        preprocess: Preprocess | str = Preprocess(),
        *,
        limit: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.path = Path(path)
        self.preprocess = (
            Preprocess.from_string(preprocess) if isinstance(preprocess, str) else preprocess
        )
        if not self.path.is_dir():
            raise ConfigError(f"{self.path}: image folder does not exist")
        files = sorted(
            p for p in self.path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
        )
        if limit is not None:
            files = files[:limit]
        if not files:
            raise ConfigError(
                f"{self.path}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in the folder"
            )
        self.files = files
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Number of batches."""
        n, b = len(self.files), self.preprocess.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            from PIL import Image
        except ImportError:
            raise ConfigError(
                "reading calibration images needs Pillow: pip install pillow"
            ) from None
        b = self.preprocess.batch_size
        for start in range(0, len(self.files), b):
            chunk = self.files[start : start + b]
            if len(chunk) < b and self.drop_last:
                return
            arrays = []
            for file in chunk:
                try:
                    with Image.open(file) as image:
                        arrays.append(self.preprocess.apply(image))
                except Exception as exc:
                    raise ConfigError(
                        f"image '{file}': {type(exc).__name__}: {str(exc).splitlines()[0]}"
                    ) from exc
            yield np.stack(arrays)
