"""The few exception types a user of onnxq sees.

Every error carries a one-line message that names the file, node or tensor at fault and says
what to do about it. The CLI prints ``onnxq: error: <message>`` and exits non-zero; it never
shows a traceback for these.
"""

from __future__ import annotations

__all__ = [
    "OnnxqError",
    "ModelLoadError",
    "ModelSaveError",
    "UnsupportedModelError",
    "ConfigError",
]


class OnnxqError(Exception):
    """Base class of every error onnxq raises on purpose."""


class ModelLoadError(OnnxqError):
    """The input is not a readable ONNX model (missing, truncated, not ONNX, missing external data)."""


class ModelSaveError(OnnxqError):
    """The output could not be written (or would overwrite the input)."""


class UnsupportedModelError(OnnxqError):
    """The model is valid ONNX but something in it cannot be handled; the message names the node."""


class ConfigError(OnnxqError):
    """A pass name, option, recipe or config value is wrong."""
