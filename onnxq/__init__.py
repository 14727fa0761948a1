"""onnxq: quantization and graph optimization for ONNX models, on onnx-ir and onnxruntime.

Public API (pinned by tests/unit/test_public_api.py)::

    model = onnxq.load("model.onnx")                 # path, bytes, ModelProto, ir.Model, gs.Graph
    better = onnxq.optimize(model, passes=["dfq"])   # a new model; the input is left unchanged
    onnxq.save(better, "model.opt.onnx")             # atomic; never overwrites its own input
    onnxq.inspect(better).worst(5)                   # per-layer weight-range spread
    sim = onnxq.quantize(model, calibration_data, "per-channel", passes="dfq", adaround=True)
    onnxq.analyze(model, calibration_data, evaluate, output_dir="report/")  # diagnosis + fixes
"""

from __future__ import annotations

__all__ = [
    "__version__",
    "load",
    "save",
    "optimize",
    "inspect",
    "quantize",
    "analyze",
    "QuantConfig",
    "QuantSpec",
    "Recipe",
    "PassSpec",
    "OnnxqError",
    "ModelLoadError",
    "ModelSaveError",
    "UnsupportedModelError",
    "ConfigError",
]

__version__ = "0.1.0"

import os
from collections.abc import Iterable, Mapping
from typing import Any

import onnx_ir as ir

from onnxq.analysis.inspect import ModelSummary, inspect_model
from onnxq.errors import (
    ConfigError,
    ModelLoadError,
    ModelSaveError,
    OnnxqError,
    UnsupportedModelError,
)
from onnxq.io import load, save
from onnxq.passes.pipelines import PassSpec, Recipe, parse_passes, run_pipeline
from onnxq.quant.config import QuantConfig, QuantSpec
from onnxq.quant.sim import quantize


def optimize(
    model: Any,
    passes: str | Iterable[str | Mapping[str, Any] | PassSpec] | None = None,
    *,
    recipe: Recipe | str | os.PathLike | None = None,
) -> ir.Model:
    """Run a pass pipeline on a copy of ``model`` and return the rewritten model.

    ``passes``: names or presets (``["fold-bn", "cle", "high-bias-fold"]``, ``"dfq"``), or
    ``recipe``: a :class:`Recipe` or the path of a JSON/TOML recipe file. Default: ``dfq``.
    """
    if passes is not None and recipe is not None:
        raise ConfigError("give either passes or recipe, not both")
    if recipe is None:
        recipe = parse_passes(passes if passes is not None else "dfq")
    elif not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    loaded = load(model)
    work = loaded.clone() if loaded is model else loaded
    run_pipeline(work, recipe)
    return work


def analyze(model: Any, calibration_data: Any, evaluate: Any = None, **kwargs: Any) -> Any:
    """Quantization analysis and automatic fixes: :func:`onnxq.analysis.analyzer.analyze`
    (FP32 sanity, weights vs activations, per-layer sensitivity, ranges, a mixed-precision plan
    that meets the allowed drop, HTML report). Imported on first use."""
    from onnxq.analysis.analyzer import analyze as _analyze

    return _analyze(model, calibration_data, evaluate, **kwargs)


def inspect(model: Any) -> ModelSummary:
    """Op counts and per-layer weight-range spread of ``model`` (unchanged)."""
    return inspect_model(load(model))
