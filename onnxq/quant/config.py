"""Quantization configuration: frozen dataclasses that serialize to and from versioned dicts.

``QuantSpec`` says how one tensor is quantized (bit-width, symmetric or not, per tensor or per
channel, range method); ``QuantConfig`` holds the defaults for weights and activations, where
activation quantizers go (``placement``: only where the runtime has integer kernels, or at every
op boundary), the fusion supergroups inside which no quantizer is placed, and per-node /
per-op-type overrides.
Presets: ``default`` (per-tensor symmetric INT8 weights, asymmetric UINT8 activations),
``per-channel`` (per-channel weights), ``w8a16`` (16-bit activations).
"""

from __future__ import annotations

__all__ = ["QuantSpec", "QuantConfig", "PRESETS", "preset", "DEFAULT_INTEGER_OPS", "PLACEMENTS"]

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxq.errors import ConfigError

#: 2: activation placement became a choice ("runtime", the new default); a version-1 config
#: means a quantizer at every op boundary and loads with placement "all"
CONFIG_VERSION = 2
#: activation range methods (:data:`onnxq.quant.observers.RANGE_METHODS`); weights use min-max for
#: all but ``mse``
RANGE_METHODS = ("minmax", "batch-median", "percentile", "mse", "sqnr", "entropy")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    #: symmetric grid without the lowest code: [-(2^(b-1) - 1), 2^(b-1) - 1]
    strict: bool = False
    range_method: str = "minmax"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"bit-width {self.bits} is not one of 4, 8, 16")
        if self.range_method not in RANGE_METHODS:
            raise ConfigError(
                f"range method '{self.range_method}' is not one of {', '.join(RANGE_METHODS)}"
            )

    @property
    def signed(self) -> bool:
        """Symmetric grids are signed (zero point 0); asymmetric ones unsigned."""
        return self.symmetric

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: QuantSpec | None = None) -> QuantSpec:
        base = base or cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown quantization option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(base, **dict(data))


DEFAULT_SUPERGROUPS: tuple[tuple[str, ...], ...] = (
    ("Conv", "Relu"),
    ("Conv", "Clip"),
    ("ConvTranspose", "Relu"),
    ("ConvTranspose", "Clip"),
    ("Gemm", "Relu"),
    ("Gemm", "Clip"),
    ("MatMul", "Relu"),
    ("MatMul", "Add"),
    ("Add", "Relu"),
    # onnxruntime folds a zero Pad into the Conv after it (PadFusion) only if no Q/DQ sits between
    ("Pad", "Conv"),
)


#: ops that onnxruntime's CPU provider runs as integer kernels once Q/DQ surround them (its QDQ
#: selectors: QLinearConv, QLinearMatMul / MatMulIntegerToFloat, QGemm, QLinearAdd, QLinearMul,
#: QLinearSigmoid, QLinearSoftmax, QLinear(Global)AveragePool, QLinearLeakyRelu, QLinearConcat,
#: QLinearWhere). Data-movement ops (Reshape, Transpose, Slice, MaxPool, …) run on the integers
#: when they sit between equal Q/DQ pairs; everything else (Div, Sub, Pow, Erf, LayerNormalization,
#: HardSigmoid, HardSwish, Tanh, ReduceMean, ConvTranspose, …) runs in float.
DEFAULT_INTEGER_OPS: tuple[str, ...] = (
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Sigmoid", "Softmax", "AveragePool",
    "GlobalAveragePool", "LeakyRelu", "Concat", "Where",
)
PLACEMENTS = ("runtime", "all")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    weights: QuantSpec = QuantSpec(bits=8, symmetric=True)
    activations: QuantSpec = QuantSpec(bits=8, symmetric=False)
    quantize_bias: bool = True
    model_inputs: bool = True
    model_outputs: bool = False
    supergroups: tuple[tuple[str, ...], ...] = DEFAULT_SUPERGROUPS
    #: where activation quantizers go: "runtime" — only on tensors that an integer kernel of the
    #: runtime reads or writes (a Q/DQ pair anywhere else only adds two ops and rounding error);
    #: "all" — at every op boundary, as a fixed-point accelerator computes (AIMET's simulation)
    placement: str = "runtime"
    #: op types the runtime executes as integer kernels (placement "runtime")
    integer_ops: tuple[str, ...] = DEFAULT_INTEGER_OPS
    #: placement "runtime": float ops that the vote counts as integer neighbours of the light ops
    #: next to them. The default makes a residual Add before a LayerNormalization run in
    #: integers (QLinearAdd, as onnxruntime.quantization does): a float Add + LayerNormalization
    #: is fused by onnxruntime into SkipLayerNormalization, whose CPU kernel is ~15x slower than
    #: Add + LayerNormalization (onnxruntime 1.32, [32, 64, 384]), which kept MiniLM's QDQ model
    #: 6 % slower than onnxruntime's at batch 32. The price is a quantized LayerNorm input (MiniLM
    #: R@1 0.384 → 0.331, FP32 0.386); () keeps such Adds in float.
    integer_neighbours: tuple[str, ...] = ("LayerNormalization",)
    #: placement "runtime": a Mul or Div by a positive scalar constant between two quantized
    #: tensors becomes a change of scale of the DequantizeLinear after it (the op disappears)
    fold_scalar_scales: bool = True
    #: constants of at least this magnitude are stand-ins for ±∞ (attention masks: −1e4, −1e9,
    #: float32's lowest): tensors computed from them by element-wise or data-movement ops are
    #: never quantized (their grid would have no room left for the real values); 0 disables
    sentinel: float = 1e4
    #: a Min / Max with a constant bound between two quantized tensors (CLE's ReLU6 → Relu →
    #: Min(·, 6/s)) runs on the integers: its input takes its output's encoding and the bound is
    #: stored on that grid, exact since min(Q(y), Q(c)) = Q(min(y, c)) (annotate.py)
    integer_clips: bool = True
    #: node name → {"weights": {...}, "activations": {...}} or {"skip": True}
    node_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    #: op type → same as node_overrides
    op_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"placement '{self.placement}' is not one of {', '.join(PLACEMENTS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "weights": self.weights.to_dict(),
            "activations": self.activations.to_dict(),
            "quantize_bias": self.quantize_bias,
            "model_inputs": self.model_inputs,
            "model_outputs": self.model_outputs,
            "supergroups": [list(g) for g in self.supergroups],
            "placement": self.placement,
            "integer_ops": list(self.integer_ops),
            "integer_neighbours": list(self.integer_neighbours),
            "fold_scalar_scales": self.fold_scalar_scales,
            "sentinel": self.sentinel,
            "integer_clips": self.integer_clips,
            "node_overrides": {k: dict(v) for k, v in self.node_overrides.items()},
            "op_overrides": {k: dict(v) for k, v in self.op_overrides.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        version = int(data.get("version", CONFIG_VERSION))
        if version > CONFIG_VERSION:
            raise ConfigError(f"config version {version} is newer than this onnxq understands")
        base = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        return cls(
            weights=QuantSpec.from_dict(data.get("weights", {}), base.weights),
            activations=QuantSpec.from_dict(data.get("activations", {}), base.activations),
            quantize_bias=bool(data.get("quantize_bias", base.quantize_bias)),
            model_inputs=bool(data.get("model_inputs", base.model_inputs)),
            model_outputs=bool(data.get("model_outputs", base.model_outputs)),
            supergroups=tuple(tuple(g) for g in data.get("supergroups", base.supergroups)),
            placement=str(data.get("placement", base.placement if version >= 2 else "all")),
            integer_ops=tuple(data.get("integer_ops", base.integer_ops)),
            integer_neighbours=tuple(data.get("integer_neighbours", base.integer_neighbours)),
            fold_scalar_scales=bool(data.get("fold_scalar_scales", base.fold_scalar_scales)),
            sentinel=float(data.get("sentinel", base.sentinel)),
            integer_clips=bool(data.get("integer_clips", base.integer_clips)),
            node_overrides=dict(data.get("node_overrides", {})),
            op_overrides=dict(data.get("op_overrides", {})),
            version=version,
        )

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    def override(self, node_name: str, op_type: str) -> Mapping[str, Any]:
        """The override for a node: by name first, else by op type, else empty."""
        return self.node_overrides.get(node_name) or self.op_overrides.get(op_type) or {}

    def weight_spec(self, node_name: str, op_type: str) -> QuantSpec | None:
        o = self.override(node_name, op_type)
        if o.get("skip") or o.get("skip_weights"):
            return None
        return QuantSpec.from_dict(o.get("weights", {}), self.weights)

    def activation_spec(self, node_name: str, op_type: str) -> QuantSpec | None:
        o = self.override(node_name, op_type)
        if o.get("skip") or o.get("skip_activations"):
            return None
        return QuantSpec.from_dict(o.get("activations", {}), self.activations)

    @classmethod
    def from_aimet(cls, data: Mapping[str, Any], base: QuantConfig | None = None) -> QuantConfig:
        """Import an AIMET runtime config (``defaults``, ``params``, ``op_type``, ``supergroups``,
        ``model_input``, ``model_output``; booleans may be the strings "True"/"False").

        Bit-widths are not part of AIMET's runtime config; they come from ``base``. AIMET
        simulates a fixed-point target whose every op output is quantized unless the config says
        otherwise, so the placement is ``"all"``.
        """
        base = base or cls()
        defaults = data.get("defaults", {})
        ops_d, params_d = defaults.get("ops", {}), defaults.get("params", {})
        strict = _bool(defaults.get("strict_symmetric", False))
        weights = dataclasses.replace(
            base.weights,
            symmetric=_bool(params_d.get("is_symmetric", base.weights.symmetric)),
            per_channel=_bool(defaults.get("per_channel_quantization", base.weights.per_channel)),
            strict=strict,
        )
        activations = dataclasses.replace(
            base.activations,
            symmetric=_bool(ops_d.get("is_symmetric", base.activations.symmetric)),
            strict=strict,
        )
        op_overrides: dict[str, dict[str, Any]] = {}
        if not _bool(params_d.get("is_quantized", True)):
            op_overrides.update({op: {"skip_weights": True} for op in ("Conv", "ConvTranspose", "Gemm", "MatMul")})
        for op, opts in data.get("op_type", {}).items():
            entry: dict[str, Any] = dict(op_overrides.get(op, {}))
            if "is_output_quantized" in opts and not _bool(opts["is_output_quantized"]):
                entry["skip_activations"] = True
            if "is_symmetric" in opts:
                entry["activations"] = {"symmetric": _bool(opts["is_symmetric"])}
            w: dict[str, Any] = {}
            if "per_channel_quantization" in opts:
                w["per_channel"] = _bool(opts["per_channel_quantization"])
            weight_params = opts.get("params", {}).get("weight", {})
            if "is_symmetric" in weight_params:
                w["symmetric"] = _bool(weight_params["is_symmetric"])
            if "is_quantized" in weight_params and not _bool(weight_params["is_quantized"]):
                entry["skip_weights"] = True
            if w:
                entry["weights"] = w
            if entry:
                op_overrides[op] = entry
        bias = data.get("params", {}).get("bias", {})
        supergroups = tuple(
            tuple(g["op_list"]) for g in data.get("supergroups", []) if "op_list" in g
        ) or base.supergroups
        return cls(
            weights=weights,
            activations=activations,
            quantize_bias=_bool(bias.get("is_quantized", base.quantize_bias)),
            model_inputs=_bool(data.get("model_input", {}).get("is_input_quantized", base.model_inputs)),
            model_outputs=_bool(data.get("model_output", {}).get("is_output_quantized", base.model_outputs)),
            supergroups=supergroups,
            placement="all",
            integer_ops=base.integer_ops,
            node_overrides=dict(base.node_overrides),
            op_overrides={**dict(base.op_overrides), **op_overrides},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantConfig:
        """A JSON file in onnxq's format (``version``, ``weights``, …) or AIMET's (``defaults``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable JSON config ({exc})") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: a config must be a JSON object")
        return cls.from_aimet(data) if "defaults" in data else cls.from_dict(data)


def _bool(value: Any) -> bool:
    """AIMET writes booleans as the strings "True"/"False"."""
    if isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"'{value}' is not a boolean")
    return bool(value)


PRESETS: dict[str, QuantConfig] = {
    "default": QuantConfig(),
    "per-channel": QuantConfig(weights=QuantSpec(bits=8, symmetric=True, per_channel=True)),
    "w8a16": QuantConfig(
        weights=QuantSpec(bits=8, symmetric=True, per_channel=True),
        activations=QuantSpec(bits=16, symmetric=False),
    ),
}


def preset(name: str) -> QuantConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown config preset '{name}' (known: {', '.join(PRESETS)})") from None
