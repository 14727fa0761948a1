"""Load and save models over onnx-ir.

``load`` accepts a path (external data beside it), serialized bytes, an ``onnx.ModelProto``, an
``onnx_ir.Model`` or an onnx-graphsurgeon ``Graph`` and always returns an ``onnx_ir.Model``.
Weights stored as external data are memory-mapped by onnx-ir, never read until a pass edits them.

``save`` writes atomically: everything goes to a temporary folder beside the destination, then is
renamed into place, so a failure never leaves a half-written file. It refuses to overwrite the
file a model was loaded from unless ``overwrite=True``. Models whose weights exceed the 2 GB
protobuf limit, or that were loaded with external data, are written with external data
(``<name>.data`` beside the model) unless told otherwise.
"""

from __future__ import annotations

__all__ = ["load", "save", "source_path", "weight_bytes", "internalized"]

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any, Union

import onnx
import onnx_ir as ir

from onnxq.errors import ModelLoadError, ModelSaveError

logger = logging.getLogger(__name__)

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto, ir.Model, Any]

_SOURCE_KEY = "onnxq.source_path"
#: Protobuf refuses messages of 2 GiB; leave room for the graph itself.
PROTOBUF_LIMIT_BYTES = 2**31 - 64 * 2**20


def source_path(model: ir.Model) -> Path | None:
    """The file ``model`` was loaded from, if it came from a file."""
    src = model.meta.get(_SOURCE_KEY)
    return Path(src) if src else None


def load(model: ModelLike) -> ir.Model:
    """Load ``model`` into an ``onnx_ir.Model``.

    An ``ir.Model`` is returned as is (passes then edit it in place; use
    :func:`onnxq.optimize`, which works on a copy, to keep the original).
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return _from_proto(model, "<ModelProto>")
    if isinstance(model, (bytes, bytearray, memoryview)):
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as exc:  # protobuf raises DecodeError and others
            raise ModelLoadError(f"<bytes>: not a valid ONNX model ({_reason(exc)})") from exc
        return _from_proto(proto, "<bytes>")
    if isinstance(model, (str, os.PathLike)):
        return _load_path(Path(model))
    if type(model).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs  # optional; only reached when the caller has it

        return _from_proto(gs.export_onnx(model), "<onnx_graphsurgeon.Graph>")
    raise ModelLoadError(
        f"cannot load a model from {type(model).__name__}: pass a path, bytes, onnx.ModelProto, "
        "onnx_ir.Model or onnx_graphsurgeon.Graph"
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: not a valid ONNX model, the file is truncated or of another format "
            f"({_reason(exc)})"
        ) from exc
    model = _from_proto(proto, str(path))
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    _check_external_data(model, path)
    model.meta[_SOURCE_KEY] = str(path.resolve())
    return model


def _from_proto(proto: onnx.ModelProto, where: str) -> ir.Model:
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelLoadError(f"{where}: not a valid ONNX model (no graph or no IR version)")
    if not any(op.domain in ("", "ai.onnx") for op in proto.opset_import):
        raise ModelLoadError(f"{where}: the model imports no default-domain opset")
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{where}: cannot read the model ({_reason(exc)})") from exc


def _external_tensors(model: ir.Model):
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                yield value, tensor


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value, tensor in _external_tensors(model):
        data = Path(tensor.path)
        if not data.is_file():
            raise ModelLoadError(
                f"{path}: initializer '{value.name}' refers to external data file "
                f"'{tensor.location}', which does not exist next to the model"
            )
        end = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
        if data.stat().st_size < end:
            raise ModelLoadError(
                f"{path}: external data file '{tensor.location}' is shorter than initializer "
                f"'{value.name}' needs ({data.stat().st_size} < {end} bytes): it is truncated"
            )


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by all initializers (without reading external data)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``path`` atomically; returns the path written.

    ``external_data``: ``None`` decides (external when the weights exceed the protobuf limit or
    the model was loaded with external data), ``True`` forces ``<name>.data`` beside the model,
    ``False`` embeds every weight (fails above 2 GB).
    """
    dest = Path(path)
    if dest.is_dir():
        raise ModelSaveError(f"{dest}: is a directory, give a file name ending in .onnx")
    src = source_path(model)
    data_name = dest.name + ".data"
    has_external = any(True for _ in _external_tensors(model))
    if external_data is None:
        external_data = has_external or weight_bytes(model) > PROTOBUF_LIMIT_BYTES
    if not overwrite:
        _refuse_overwriting_input(model, src, dest, dest.parent / data_name)
    if not external_data and weight_bytes(model) > PROTOBUF_LIMIT_BYTES:
        raise ModelSaveError(
            f"{dest}: weights exceed the 2 GB protobuf limit; save with external data"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnxq-save-", dir=dest.parent))
    restore: list[tuple[ir.Value, Any]] = []
    try:
        if not external_data:
            restore = _internalize(model)
        ir.save(model, tmp / dest.name, external_data=data_name if external_data else None)
        if external_data:
            os.replace(tmp / data_name, dest.parent / data_name)
        os.replace(tmp / dest.name, dest)
    except ModelSaveError:
        raise
    except Exception as exc:
        raise ModelSaveError(f"{dest}: could not write the model ({_reason(exc)})") from exc
    finally:
        for value, tensor in restore:
            value.const_value = tensor
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved %s%s", dest, " (+ external data)" if external_data else "")
    return dest


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_overwriting_input(model: ir.Model, src: Path | None, dest: Path, data: Path) -> None:
    if src is not None and _same_file(src, dest):
        raise ModelSaveError(
            f"{dest}: refusing to overwrite the input model; choose another output path "
            "or pass overwrite=True (--overwrite)"
        )
    for _, tensor in _external_tensors(model):
        if _same_file(Path(tensor.path), data):
            raise ModelSaveError(
                f"{data}: refusing to overwrite the input's external data file; choose another "
                "output path or pass overwrite=True (--overwrite)"
            )


@contextlib.contextmanager
def internalized(model: ir.Model, skip: Collection[ir.Value] = ()):
    """Within the block, external tensors are held in memory (restored afterwards), except
    those of the values in ``skip``."""
    swapped = _internalize(model, skip)
    try:
        yield model
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _internalize(model: ir.Model, skip: Collection[ir.Value] = ()) -> list[tuple[ir.Value, Any]]:
    """Swap external tensors for in-memory copies; returns what to restore afterwards."""
    swapped = []
    kept = {id(v) for v in skip}
    for value, tensor in list(_external_tensors(model)):
        if id(value) in kept:
            continue
        swapped.append((value, tensor))
        value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
    return swapped
