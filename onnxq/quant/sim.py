"""``onnxq.quantize``: float model + calibration data → a QDQ model that onnxruntime runs.

Steps (decide, then do): optional float passes (e.g. ``dfq``) → :func:`annotate` decides every
quantizer → one onnxruntime session over a copy of the float model with the needed intermediates
exposed streams the calibration data into running statistics → ranges per tied group
(min-max / percentile / MSE / entropy) → :func:`insert_qdq` writes standard Q/DQ pairs. The
result's ``model`` is the simulation and the deployable model at once.
"""

from __future__ import annotations

__all__ = ["QuantSim", "quantize", "quantize_with_encodings", "rebuild"]

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import UnsupportedModelError
from onnxq.quant.annotate import QuantPlan, annotate
from onnxq.quant.config import QuantConfig, preset
from onnxq.quant.insert_qdq import Encoding, insert_qdq, required_opset

log = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantSim:
    """A quantized model: ``model`` (QDQ), the ``float_model`` it came from, and its encodings.

    After a data-driven algorithm (AdaRound, SeqMSE, bias correction) ``float_model`` carries the
    optimized weights / biases (what the encodings describe) and ``reference`` the float model
    before any of them: the FP32 targets every later algorithm reconstructs.
    """

    model: ir.Model
    float_model: ir.Model
    encodings: list[Encoding]
    config: QuantConfig
    plan: QuantPlan
    reference: ir.Model | None = None

    @property
    def fp32_model(self) -> ir.Model:
        """The float model before any data-driven algorithm changed its weights."""
        return self.reference if self.reference is not None else self.float_model

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from onnxq.runtime import run

        return run(self.model, feeds, optimize=True)

    def encodings_dict(self, version: str = "1.0.0") -> dict[str, Any]:
        """The encodings in AIMET's format ``1.0.0`` or ``2.0.0`` (keys are ONNX tensor names)."""
        from onnxq.quant.encodings import to_aimet_v1, to_v2

        if version.startswith("2"):
            return to_v2(self.encodings)
        return to_aimet_v1(self.encodings, {"quantizer_args": {"config": self.config.to_dict()}})

    def export(self, out_dir: str | os.PathLike, name: str = "model") -> dict[str, Path]:
        """Write ``<name>.qdq.onnx``, ``<name>.float.onnx``, ``<name>.encodings.json`` (1.0.0)
        and ``<name>.encodings.v2.json`` (2.0.0)."""
        from onnxq.io import save
        from onnxq.quant.encodings import write_encodings

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return {
            "qdq": save(self.model, out / f"{name}.qdq.onnx", overwrite=True),
            "float": save(self.float_model, out / f"{name}.float.onnx", overwrite=True),
            "encodings": write_encodings(out / f"{name}.encodings.json", self.encodings_dict()),
            "encodings_v2": write_encodings(
                out / f"{name}.encodings.v2.json", self.encodings_dict("2.0.0")
            ),
        }


def _upgrade_opset(model: ir.Model, need: int) -> ir.Model:
    have = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if have >= need:
        return model
    import onnx.version_converter

    try:
        proto = onnx.version_converter.convert_version(ir.to_proto(model), need)
    except Exception as exc:  # noqa: BLE001 - report any converter failure in one line
        raise UnsupportedModelError(
            f"the model's opset {have} must be raised to {need} for this quantization "
            f"(per-channel or non-8-bit Q/DQ) and the ONNX version converter failed: {exc}"
        ) from exc
    log.info("raised the model's opset from %d to %d", have, need)
    return ir.serde.deserialize_model(proto)


def quantize_with_encodings(
    model: Any,
    encodings: str | os.PathLike | Mapping[str, Encoding],
    config: QuantConfig | str | Mapping[str, Any] = "default",
    passes: str | Iterable[str] | None = None,
) -> QuantSim:
    """Rebuild a QDQ model from an encodings file (1.0.0 or 2.0.0) without calibration.

    Round trip: ``quantize_with_encodings(sim.float_model, exported_file, sim.config)`` gives a
    model with the same integer weights and the same scales as ``sim.model``.
    """
    import onnxq
    from onnxq.errors import ConfigError
    from onnxq.passes.cleanup import Cleanup
    from onnxq.quant.encodings import read_encodings

    config = _as_config(config)
    given = dict(encodings) if isinstance(encodings, Mapping) else read_encodings(encodings)
    float_model = onnxq.optimize(model, passes=passes if passes is not None else [])
    plan = annotate(float_model, config)
    float_model = _upgrade_opset(float_model, required_opset(plan))
    qdq = float_model.clone()
    plan = annotate(qdq, config)
    missing = [v.name for g in plan.groups for v in g.quantized if v.name not in given]
    missing += [s.value.name for s in plan.weights if s.value.name not in given]
    if missing:
        raise ConfigError(
            f"the encodings have no entry for {len(missing)} quantized tensor(s), e.g. "
            f"'{missing[0]}': they belong to another model or another config"
        )
    encodings_out = _keep_frozen(insert_qdq(qdq, plan, {}, None, given), given)
    Cleanup()(qdq)
    return QuantSim(qdq, float_model, encodings_out, config, plan)


def _node_facts(model: ir.Model) -> dict[str, dict[str, Any]]:
    """Facts passes left in ``Node.meta`` (e.g. folded BatchNorm statistics), by node name."""
    return {n.name: dict(n.meta) for n in model.graph if n.name and len(n.meta)}


def _restore_node_facts(model: ir.Model, facts: dict[str, dict[str, Any]]) -> None:
    for node in model.graph:
        for key, value in facts.get(node.name or "", {}).items():
            node.meta.setdefault(key, value)


def _as_config(config: QuantConfig | str | Mapping[str, Any]) -> QuantConfig:
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, QuantConfig):
        return config
    return QuantConfig.from_dict(config)


def quantize(
    model: Any,
    calibration_data: Any,
    config: QuantConfig | str | Mapping[str, Any] = "default",
    passes: str | Iterable[Any] | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    seq_mse: Any = None,
    adaround: Any = None,
    bias_correction: Any = None,
) -> QuantSim:
    """Quantize ``model`` with ranges calibrated on ``calibration_data``.

    ``config``: a :class:`QuantConfig`, a preset name (``default``, ``per-channel``, ``w8a16``)
    or a config dict. ``passes``: float passes to run first (e.g. ``"dfq"``); the data-driven
    steps ``seq-mse``, ``adaround`` and ``bias-correction`` may be listed too (they run after
    calibration, in the order given). ``seq_mse`` / ``adaround`` / ``bias_correction``: ``True``
    for the defaults, or a :class:`~onnxq.algorithms.SeqMseConfig` /
    :class:`~onnxq.algorithms.AdaRoundConfig` / :class:`~onnxq.algorithms.BiasCorrectionConfig`
    or a dict of its fields; they run in that order, after any listed in ``passes``. With the
    ``dfq`` preset and no data-driven step, bias correction runs last, as in the DFQ recipe,
    with the layer input means measured on the calibration data (``mode="measured"``);
    ``bias_correction=False`` turns it off.
    """
    import onnxq
    from onnxq.passes.pipelines import parse_passes, split_data_steps

    config = _as_config(config)
    float_recipe, steps = split_data_steps(parse_passes(passes if passes is not None else []))
    for name, setting in (("seq-mse", seq_mse), ("adaround", adaround), ("bias-correction", bias_correction)):
        if setting is not None and setting is not False:
            steps += ((name, setting),)
    if bias_correction is None and "dfq" in _pass_names(passes) and not any(
        (s[0] if isinstance(s, tuple) else s.name) in ("bias-correction", "adaround", "seq-mse") for s in steps
    ):
        # the DFQ recipe ends with bias correction (Nagel et al. 2019), Σ(W_q − W)·E[x] with E[x]
        # measured on the calibration data (one float pass; the BN statistics fold-bn kept when
        # there is none). W8A8 per-tensor: EfficientNet-Lite0 top-1 0.881 -> 0.910 (BN
        # statistics: 0.914), PP-OCR rec CER 2.75 % -> 0.46 % (BN statistics: 3.95 %; 600 lines)
        mode = "analytic" if calibration_data is None else "measured"
        log.info("dfq: %s bias correction after calibration; bias_correction=False turns it off", mode)
        steps += (("bias-correction", {"mode": mode}),)
    float_model = onnxq.optimize(model, recipe=float_recipe)
    facts = _node_facts(float_model)
    plan = annotate(float_model, config)
    float_model = _upgrade_opset(float_model, required_opset(plan))
    _restore_node_facts(float_model, facts)  # shape inference / opset conversion rebuild nodes
    plan = annotate(float_model, config)  # values may be new objects after an opset upgrade
    _restore_node_facts(float_model, facts)

    sim = _calibrate_and_build(float_model, config, plan, calibration_data, progress)
    for step in steps:
        sim = _data_step(sim, step, calibration_data)
    return sim


def _pass_names(passes: Any) -> list[str]:
    """The names in a ``passes`` argument as given (presets not expanded)."""
    if passes is None:
        return []
    items = passes.split(",") if isinstance(passes, str) else passes
    names = []
    for item in items if isinstance(items, (list, tuple)) else []:
        if isinstance(item, str):
            names.append(item.split(":")[0].strip())
        elif isinstance(item, Mapping):
            names.append(str(item.get("name", "")))
        elif hasattr(item, "name"):
            names.append(str(item.name))
    return names


def _data_step(sim: QuantSim, step: Any, data: Any) -> QuantSim:
    """Run one data-driven algorithm (a recipe PassSpec or a (name, setting) pair) on ``sim``."""
    import dataclasses as dc

    from onnxq import algorithms
    from onnxq.errors import ConfigError

    if isinstance(step, tuple):
        name, setting = step
    else:
        name, setting = step.name, dict(step.options)
    kinds = {
        "seq-mse": (algorithms.SeqMseConfig, algorithms.seq_mse),
        "adaround": (algorithms.AdaRoundConfig, algorithms.adaround),
        "bias-correction": (algorithms.BiasCorrectionConfig, algorithms.bias_correction),
    }
    cls, run = kinds[name]
    if setting is True:
        cfg = cls()
    elif isinstance(setting, cls):
        cfg = setting
    elif isinstance(setting, Mapping):
        known = {f.name for f in dc.fields(cls)}
        unknown = sorted(set(setting) - known)
        if unknown:
            raise ConfigError(f"{name}: unknown option(s) {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in setting.items()}
        cfg = cls(**values)
    else:
        raise ConfigError(f"{name}: expected True, a {cls.__name__} or a dict, got {setting!r}")
    log.info("running %s", name)
    return run(sim, data, cfg)


def group_ranges(plan: Any, observers: Mapping[str, Any]) -> dict[int, tuple[float, float]]:
    """``id(group) → (lo, hi)`` for each tied group of ``plan``: its fixed range, else the union of
    its observed members' ranges by the group's range method ((0, 1) when none was observed)."""
    from onnxq.quant.observers import RANGE_METHODS

    ranges: dict[int, tuple[float, float]] = {}
    for group in plan.groups:
        if group.fixed_range is not None:
            ranges[id(group)] = group.fixed_range
            continue
        los, his = [], []
        for v in group.members:
            obs = observers.get(v.name)
            if obs is None:
                continue
            lo, hi = RANGE_METHODS[group.spec.range_method](
                obs, bits=group.spec.bits, symmetric=group.spec.symmetric
            )
            los.append(lo)
            his.append(hi)
        ranges[id(group)] = (min(los), max(his)) if los else (0.0, 1.0)
    return ranges


def rebuild(
    sim: QuantSim,
    float_model: ir.Model,
    weight_encodings: Mapping[str, Encoding],
    calibration_data: Any,
    progress: Callable[[int], None] | None = None,
) -> QuantSim:
    """A new simulation of ``float_model`` (same graph as ``sim.float_model``, edited weights)
    whose weights use ``weight_encodings`` as given (frozen) and whose activations are
    recalibrated on ``calibration_data`` — or, without data, keep ``sim``'s encodings."""
    plan = annotate(float_model, sim.config)
    if calibration_data is None:
        given = {e.name: e for e in sim.encodings if e.kind == "activation"}
        given.update(weight_encodings)
        qdq = float_model.clone()
        encodings = insert_qdq(qdq, annotate(qdq, sim.config), {}, None, given)
        from onnxq.passes.cleanup import Cleanup

        Cleanup()(qdq)
        return QuantSim(qdq, float_model, _keep_frozen(encodings, given), sim.config, plan,
                        sim.fp32_model)
    out = _calibrate_and_build(
        float_model, sim.config, plan, calibration_data, progress, dict(weight_encodings)
    )
    out.reference = sim.fp32_model
    return out


def _keep_frozen(encodings: list[Encoding], given: Mapping[str, Encoding]) -> list[Encoding]:
    """Weights whose grid an algorithm chose stay frozen (and say so in the encodings file)."""
    return [
        dataclasses.replace(e, frozen=True)
        if e.kind == "param" and e.name in given and given[e.name].frozen else e
        for e in encodings
    ]


def _calibrate_and_build(
    float_model: ir.Model,
    config: QuantConfig,
    plan: QuantPlan,
    calibration_data: Any,
    progress: Callable[[int], None] | None,
    given: dict[str, Encoding] | None = None,
) -> QuantSim:
    from onnxq.quant.observers import HISTOGRAM_FREE, weight_range
    from onnxq.runtime.capture import collect_statistics

    names = sorted({v.name for g in plan.groups for v in g.members if v.name})
    needs_histogram = any(
        g.spec.range_method not in HISTOGRAM_FREE for g in plan.groups if g.fixed_range is None
    )
    observers = collect_statistics(
        float_model, names, calibration_data, histogram=needs_histogram, progress=progress
    )
    ranges = group_ranges(plan, observers)

    qdq = float_model.clone()
    plan_q = annotate(qdq, config)
    if [[v.name for v in g.quantized] for g in plan.groups] != [
        [v.name for v in g.quantized] for g in plan_q.groups
    ]:
        raise RuntimeError("annotation is not deterministic across a model copy")
    ranges_q = {id(gq): ranges[id(g)] for g, gq in zip(plan.groups, plan_q.groups)}
    weight_ranges = {}
    for site in plan_q.weights:
        if site.spec.range_method == "mse" and site.value.name not in (given or {}):
            weight_ranges[id(site.value)] = weight_range(
                site.value.const_value.numpy(), axis=site.axis, method="mse",
                bits=site.spec.bits, symmetric=site.spec.symmetric,
            )
    encodings = insert_qdq(qdq, plan_q, ranges_q, weight_ranges, given)
    encodings = _keep_frozen(encodings, given or {})
    from onnxq.passes.cleanup import Cleanup

    Cleanup()(qdq)  # the float weights the integer ones replaced are now unused
    return QuantSim(qdq, float_model, encodings, config, plan)
