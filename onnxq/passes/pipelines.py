"""Pipelines: named passes, presets and recipe files.

A recipe is data: an ordered list of pass names with options, e.g. (JSON)::

    {"version": 1, "passes": ["fold-bn", {"name": "cle", "max_iterations": 50}, "high-bias-fold"]}

or the same in TOML (``version = 1`` and ``passes = [...]``, with inline tables for options). On
the command line a pass with options is written ``cle:max_iterations=50,tolerance=1e-3``. A
preset name (``dfq``) expands to its passes. Every pipeline starts by lifting constants into
initializers (so weights held in ``Constant`` nodes are seen) and ends with cleanup.
"""

from __future__ import annotations

__all__ = [
    "PassSpec", "Recipe", "PASSES", "PRESETS", "DATA_STEPS", "build", "run_pipeline", "parse_passes",
    "split_data_steps",
]

import dataclasses
import gc
import importlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxq.errors import ConfigError
from onnxq.passes.base import OnnxqPass, PassReport

#: pass name → "module:Class" (imported on use, so ``import onnxq`` stays light)
PASSES: dict[str, str] = {
    "lift-constants": "onnxq.passes.lift_constants:LiftConstants",
    "fold-bn": "onnxq.passes.fold_batchnorm:FoldBatchNorm",
    "cle": "onnxq.passes.cross_layer_equalization:CrossLayerEqualization",
    "high-bias-fold": "onnxq.passes.high_bias_fold:HighBiasFold",
    "split-identity": "onnxq.passes.split_identity:SplitIdentity",
    "replace-relu6": "onnxq.passes.replace_relu6:ReplaceRelu6WithRelu",
    "cleanup": "onnxq.passes.cleanup:Cleanup",
}

#: named presets; ``dfq`` crosses bounded activations exactly (no ReLU6 → ReLU) and takes folded
#: identity branches out of square convolutions (split-identity: PP-OCRv4 rec per-tensor CER
#: 0.72 → 0.03)
PRESETS: dict[str, tuple[str, ...]] = {
    "dfq": ("fold-bn", "cle", "high-bias-fold", "split-identity"),
    "fold-bn": ("fold-bn",),
    "cle": ("fold-bn", "cle"),
    "none": (),
}

RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any] | str:
        return {"name": self.name, **self.options} if self.options else self.name

    @classmethod
    def from_obj(cls, obj: str | Mapping[str, Any]) -> PassSpec:
        if isinstance(obj, str):
            return cls(obj)
        if isinstance(obj, Mapping) and "name" in obj:
            options = {k: v for k, v in obj.items() if k != "name"}
            return cls(str(obj["name"]), options)
        raise ConfigError(f"a pass must be a name or a table with 'name', got {obj!r}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    passes: tuple[PassSpec, ...]
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "passes": [p.to_dict() for p in self.passes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        version = int(data.get("version", RECIPE_VERSION))
        if version > RECIPE_VERSION:
            raise ConfigError(f"recipe version {version} is newer than this onnxq understands")
        passes = data.get("passes")
        if not isinstance(passes, Sequence) or isinstance(passes, str):
            raise ConfigError("a recipe needs a 'passes' list")
        return cls(tuple(_expand(PassSpec.from_obj(p) for p in passes)), version)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the recipe ({exc.strerror})") from exc
        try:
            if path.suffix.lower() == ".toml":
                import tomllib  # Python >= 3.11

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ImportError as exc:
            raise ConfigError(f"{path}: TOML recipes need Python 3.11+; use JSON") from exc
        except ValueError as exc:
            raise ConfigError(f"{path}: not a valid recipe file ({exc})") from exc
        return cls.from_dict(data)


#: data-driven steps a recipe may list; they run after quantization (``onnxq.quantize``), in
#: recipe order, on the quantized model (onnxq.algorithms)
DATA_STEPS = ("seq-mse", "adaround", "bias-correction")


def split_data_steps(recipe: Recipe) -> tuple[Recipe, tuple[PassSpec, ...]]:
    """(the float passes, the data-driven steps) of ``recipe``."""
    steps = tuple(p for p in recipe.passes if p.name in DATA_STEPS)
    return Recipe(tuple(p for p in recipe.passes if p.name not in DATA_STEPS), recipe.version), steps


def _expand(specs: Iterable[PassSpec]) -> list[PassSpec]:
    out: list[PassSpec] = []
    for spec in specs:
        if spec.name in DATA_STEPS:
            out.append(spec)
        elif spec.name in PRESETS and spec.name not in PASSES:
            if spec.options:
                raise ConfigError(f"preset '{spec.name}' takes no options")
            out.extend(PassSpec(n) for n in PRESETS[spec.name])
        elif spec.name in PASSES:
            out.append(spec)
        else:
            known = ", ".join(sorted(set(PASSES) | set(PRESETS) | set(DATA_STEPS)))
            raise ConfigError(f"unknown pass or preset '{spec.name}' (known: {known})")
    return out


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_passes(items: str | Iterable[str | Mapping[str, Any] | PassSpec]) -> Recipe:
    """Pass names / presets / specs (or a comma-separated CLI string) → a :class:`Recipe`.

    CLI form: ``fold-bn,cle:max_iterations=50;tolerance=1e-3,high-bias-fold`` (options after
    ``:``, separated by ``;``).
    """
    if isinstance(items, str):
        specs = []
        for item in filter(None, (s.strip() for s in items.split(","))):
            name, _, opts = item.partition(":")
            options = {}
            for kv in filter(None, opts.split(";")):
                key, eq, val = kv.partition("=")
                if not eq:
                    raise ConfigError(f"pass option '{kv}' must be key=value")
                options[key.strip().replace("-", "_")] = _value(val.strip())
            specs.append(PassSpec(name.strip(), options))
    else:
        specs = [s if isinstance(s, PassSpec) else PassSpec.from_obj(s) for s in items]
    return Recipe(tuple(_expand(specs)))


def _instantiate(spec: PassSpec) -> OnnxqPass:
    module, _, cls_name = PASSES[spec.name].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    try:
        return cls(**dict(spec.options))
    except TypeError as exc:
        raise ConfigError(f"pass '{spec.name}': bad options {dict(spec.options)} ({exc})") from exc


def build(recipe: Recipe) -> list[OnnxqPass]:
    """The passes of ``recipe``, with lift-constants first and cleanup last."""
    specs = list(recipe.passes)
    steps = [p.name for p in specs if p.name in DATA_STEPS]
    if steps:
        raise ConfigError(
            f"'{steps[0]}' needs calibration data and a quantized model: use it in "
            "onnxq.quantize(..., passes=[...]) or `onnxq quantize --passes`, not in optimize"
        )
    if not specs or specs[0].name != "lift-constants":
        specs.insert(0, PassSpec("lift-constants"))
    if specs[-1].name != "cleanup":
        specs.append(PassSpec("cleanup"))
    return [_instantiate(s) for s in specs]


def run_pipeline(model: ir.Model, recipe: Recipe) -> list[tuple[str, PassReport, bool]]:
    """Run ``recipe`` on ``model`` in place; returns (pass name, report, modified) per pass.

    Python's cyclic garbage collector is paused while the passes run: walking onnx-ir's object
    graph took 20-25% of the pipeline's time on 10k-20k-node models (benchmarks/scaling.py).
    """
    results = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for p in build(recipe):
            result = p(model)
            results.append((p.name, p.report, result.modified))
    finally:
        if was_enabled:
            gc.enable()
    return results
