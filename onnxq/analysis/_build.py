"""Quantize one float model under many configs while calibrating it once.

:class:`Builder` does what :func:`onnxq.quantize` does — float passes, :func:`annotate`, opset
upgrade where the config needs it, ranges per tied group, :func:`insert_qdq`, cleanup — but
keeps the activation statistics (running min/max and histograms, one observer per tensor) of
each float model it has seen, so a config that changes granularity, range method or bit-width
is built without another pass over the calibration data; only tensors it has not observed yet
are calibrated. The result is the model ``onnxq.quantize(model, data, config, passes)`` gives
for the same data (min/max are exact; histograms hold the same data however they were grown):
tests/unit/analysis pins that equality of encodings.
"""

from __future__ import annotations

__all__ = ["Builder"]

import logging
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from onnxq.quant.annotate import annotate
from onnxq.quant.config import QuantConfig
from onnxq.quant.insert_qdq import insert_qdq, required_opset
from onnxq.quant.sim import QuantSim, group_ranges

log = logging.getLogger(__name__)


class Builder:
    """QDQ models of one float model under different configs and pass lists."""

    def __init__(self, model: ir.Model, batches: Sequence[dict], progress: Callable[[str, int], Any] | None = None) -> None:
        self.model = model
        self.batches = list(batches)
        self.progress = progress
        self._floats: dict[tuple[str, ...], ir.Model] = {}
        self._observers: dict[tuple[str, ...], dict[str, Any]] = {}
        self.calibrations = 0

    def float_model(self, passes: Sequence[str]) -> ir.Model:
        """The model after ``passes`` (cached; do not edit it)."""
        import onnxq

        key = tuple(passes)
        if key not in self._floats:
            self._floats[key] = onnxq.optimize(self.model, passes=list(key))
        return self._floats[key]

    def observers(self, passes: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
        """Observers (with histograms) of ``names`` on the float model of ``passes``."""
        from onnxq.runtime.capture import collect_statistics

        key = tuple(passes)
        have = self._observers.setdefault(key, {})
        missing = [n for n in dict.fromkeys(names) if n not in have]
        if missing:
            bar = self.progress("calibrating", len(self.batches)) if self.progress else None
            have.update(collect_statistics(
                self.float_model(key), missing, self.batches, histogram=True,
                progress=bar.update if bar is not None else None,
            ))
            if bar is not None:
                bar.close()
            self.calibrations += 1
        return {n: have[n] for n in names}

    def build(self, config: QuantConfig, passes: Sequence[str]) -> QuantSim:
        """The simulation ``onnxq.quantize(model, batches, config, passes)`` would return."""
        from onnxq.passes.cleanup import Cleanup
        from onnxq.quant.observers import weight_range
        from onnxq.quant.sim import _upgrade_opset

        float_model = self.float_model(passes)
        plan = annotate(float_model, config)
        need = required_opset(plan)
        key = (*passes, f"<opset {need}>")
        if key not in self._floats:  # the opset upgrade may rename tensors: its own statistics
            self._floats[key] = _upgrade_opset(float_model, need)
        upgraded = self._floats[key]
        if upgraded is not float_model:
            plan = annotate(upgraded, config)
        else:
            key = tuple(passes)
        names = sorted({v.name for g in plan.groups for v in g.members if v.name})
        observers = self.observers(key, names)
        ranges = group_ranges(plan, observers)
        qdq = upgraded.clone()
        plan_q = annotate(qdq, config)
        ranges_q = {id(gq): ranges[id(g)] for g, gq in zip(plan.groups, plan_q.groups)}
        weight_ranges = {}
        for site in plan_q.weights:
            if site.spec.range_method == "mse":
                weight_ranges[id(site.value)] = weight_range(
                    site.value.const_value.numpy(), axis=site.axis, method="mse",
                    bits=site.spec.bits, symmetric=site.spec.symmetric,
                )
        encodings = insert_qdq(qdq, plan_q, ranges_q, weight_ranges)
        Cleanup()(qdq)
        return QuantSim(qdq, upgraded, encodings, config, plan)
