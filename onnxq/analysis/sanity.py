"""Step 1 of an analysis: does the QDQ model compute the float model when nothing is rounded?

Measured: the largest absolute difference, over every output and sample of ``batches``, between
the float model and the *lossless* variant of the QDQ model (:func:`~onnxq.analysis.quantizers.lossless`:
each activation Q/DQ pair as the affine map it computes without rounding or clamping, weights
and biases float), both under onnxruntime with graph optimizations off. A correct QDQ model
gives exactly 0 (the same float operations in the same order); anything above ``tol`` of the
output range means a Q/DQ pair does more than round — e.g. a DequantizeLinear whose zero point
or scale differs from its QuantizeLinear's. Checked as well, per quantizer: that Q and DQ agree,
that integer weights dequantize to within half a step of the float weights (inside the grid),
that int32 biases do the same with scale = input scale × weight scale, and, when encodings are
given, that every Q/DQ parameter equals its encoding (a zero point changed on both sides keeps the
pair consistent but moves the grid).
"""

from __future__ import annotations

__all__ = ["SanityResult", "check_sanity"]

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.analysis.quantizers import find_quantizers, lossless
from onnxq.passes._graph import constant

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SanityResult:
    """``max_abs_diff``: max |Δ| over outputs; ``max_rel_diff``: divided by the output's range."""

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    problems: list[dict]
    samples: int

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.tolerance and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def summary(self) -> str:
        head = (f"FP32 sanity: quantizers made lossless reproduce the float model with max |Δ| = "
                f"{self.max_abs_diff:.3g} ({self.max_rel_diff:.3g} of the output range, "
                f"{self.samples} samples)")
        if self.ok:
            return head + ": OK"
        lines = [head + f": FAILED (tolerance {self.tolerance:g})"]
        lines += [f"  {p['quantizer']}: {p['problem']}" for p in self.problems[:10]]
        if len(self.problems) > 10:
            lines.append(f"  … and {len(self.problems) - 10} more")
        return "\n".join(lines)


def _encoding_problems(qdq: ir.Model, float_model: ir.Model, encodings: Iterable[Any]) -> list[dict]:
    by_name = {e.name: e for e in encodings}
    qmap = find_quantizers(qdq, float_model)
    problems = []
    for qid, pair in qmap.acts.items():
        enc = by_name.get(pair.name)
        if enc is None:
            continue
        scale = constant(pair.q.inputs[1])
        zero = constant(pair.q.inputs[2]) if len(pair.q.inputs) > 2 else np.zeros(1)
        if not np.allclose(np.asarray(scale, np.float64).reshape(-1), enc.scale, rtol=1e-6) or \
                not np.array_equal(np.asarray(zero, np.int64).reshape(-1), np.asarray(enc.zero_point)):
            problems.append({"quantizer": qid, "problem": (
                f"Q/DQ parameters (scale {np.asarray(scale).reshape(-1).tolist()}, zero point "
                f"{np.asarray(zero).reshape(-1).tolist()}) differ from the encoding "
                f"(scale {list(enc.scale)}, zero point {list(enc.zero_point)})")})
    for qid, site in qmap.weights.items():
        enc = by_name.get(site.name)
        if enc is None:
            continue
        scale = constant(site.dq.inputs[1])
        zero = constant(site.dq.inputs[2]) if len(site.dq.inputs) > 2 else np.zeros(1)
        if not np.allclose(np.asarray(scale, np.float64).reshape(-1), enc.scale, rtol=1e-6) or \
                not np.array_equal(np.asarray(zero, np.int64).reshape(-1), np.asarray(enc.zero_point)):
            problems.append({"quantizer": qid, "problem": "weight DequantizeLinear parameters "
                             "differ from the weight's encoding"})
    return problems


def check_sanity(
    qdq: ir.Model,
    float_model: ir.Model,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    encodings: Iterable[Any] | None = None,
    tol: float = 1e-5,
) -> SanityResult:
    """Compare the lossless variant of ``qdq`` with ``float_model`` on ``batches`` (see module)."""
    from onnxq.runtime import create_session

    variant, problems = lossless(qdq, float_model)
    if encodings is not None:
        problems += _encoding_problems(qdq, float_model, encodings)
    ref_sess = create_session(float_model, optimize=False)
    var_sess = create_session(variant, optimize=False)
    max_abs = max_rel = 0.0
    samples = 0
    for feeds in batches:
        refs = ref_sess.run(None, dict(feeds))
        outs = var_sess.run(None, dict(feeds))
        samples += int(next(iter(feeds.values())).shape[0]) if feeds else 0
        for y, y_hat in zip(refs, outs):
            if y.dtype.kind != "f":
                if not np.array_equal(y, y_hat):
                    max_abs = max_rel = float("inf")
                continue
            diff = float(np.max(np.abs(y.astype(np.float64) - y_hat))) if y.size else 0.0
            span = float(np.max(y) - np.min(y)) if y.size else 0.0
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / span if span > 0 else diff)
    result = SanityResult(max_abs, max_rel, tol, problems, samples)
    (log.info if result.ok else log.warning)("%s", result.summary())
    return result
