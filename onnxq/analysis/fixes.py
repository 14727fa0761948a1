"""Candidate fixes for bad quantizers, and the search that keeps the ones that help.

A fix turns a :class:`State` (a QuantConfig, the float passes, the weight algorithms) into new
states, one per alternative. Fixes live in a registry (:data:`FIXES`, :func:`register_fix`) so
that new ones (e.g. from :mod:`onnxq.algorithms`) plug in without touching the search. Each fix
has a ``tier``:

0. local and free at run time: per-channel weights for one layer (``per-channel``); another range
   method for one quantizer (``range``: percentile / MSE for activations, MSE for weights);
1. global and exact in float: cross-layer equalization (``cle``, the float passes gain ``cle``);
2. global weight algorithms from :mod:`onnxq.algorithms` (``adaround``, ``bias-correction``),
   skipped with a logged reason where that package or function is absent;
3. higher precision for one quantizer (``bits``: 16-bit activations, 16-bit weights for 8-bit ones
   and 8-bit for 4-bit ones; ``float`` as the last resort when that cannot be built).

:func:`search` walks the quantizers from the most sensitive: for each it evaluates the tier 0-1
candidates (in parallel) and keeps the best if it beats the current score by more than
``min_gain``; then tier 2, once; then tier 3 one quantizer at a time, until the target is met;
finally it tries to drop each high-precision quantizer again (least sensitive first) and keeps
every drop after which the target is still met: the fewest high-precision quantizers it finds.
It stops as soon as the target is met. Every evaluation is logged as a trial.

A state's config is a :class:`~onnxq.quant.config.QuantConfig` with ``node_overrides`` (by the
node an override names: the layer for weights, the producer for activations; graph inputs go
to ``op_overrides["<input>"]``), so ``onnxq quantize --config plan.json`` reproduces it.
"""

from __future__ import annotations

__all__ = ["FIXES", "Fix", "SearchResult", "State", "Trial", "register_fix", "search"]

import copy
import dataclasses
import importlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from onnxq.analysis.quantizers import Quantizer
from onnxq.quant.config import QuantConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class State:
    """A point of the search: what ``onnxq.quantize`` is called with, plus weight algorithms."""

    config: QuantConfig
    passes: tuple[str, ...] = ()
    #: (algorithm name, options) applied in order to the built simulation
    algorithms: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    #: human-readable list of what changed from the starting point
    changes: tuple[str, ...] = ()
    #: quantizers raised to higher precision (tier 3): (id, "node" | "op", override key,
    #: the override before as JSON or None, the change text)
    promoted: tuple[tuple[str, str, str, str | None, str], ...] = ()

    def promoted_ids(self) -> list[str]:
        return [p[0] for p in self.promoted]

    def key(self) -> dict:
        return {"config": self.config.to_dict(), "passes": list(self.passes),
                "algorithms": [[n, dict(o)] for n, o in self.algorithms]}


def _override_key(q: Quantizer) -> tuple[str, str]:
    """("node", name) or ("op", "<input>") where the override of ``q`` goes."""
    if q.kind == "activation" and not q.node:
        return "op", q.op_type
    return "node", q.node


def with_override(config: QuantConfig, q: Quantizer, kind: str, changes: Mapping[str, Any] | None,
                  flag: str | None = None) -> QuantConfig:
    """``config`` with ``changes`` to the ``kind`` ("weights"/"activations") spec of ``q``'s node.

    The node's current override (by name, else by op type) is the starting point, so op-type
    overrides of the base config are kept. ``flag``: set e.g. ``skip_activations`` instead.
    """
    where, name = _override_key(q)
    op = q.op_type
    current = copy.deepcopy(dict(config.override(name if where == "node" else "", op)))
    if changes:
        spec = dict(current.get(kind, {}))
        spec.update(changes)
        current[kind] = spec
    if flag:
        current[flag] = True
    if where == "node":
        nodes = dict(config.node_overrides)
        nodes[name] = current
        return config.replace(node_overrides=nodes)
    ops = dict(config.op_overrides)
    ops[name] = current
    return config.replace(op_overrides=ops)


def spec_of(config: QuantConfig, q: Quantizer):
    """The QuantSpec ``config`` gives ``q`` (None if skipped)."""
    if q.kind == "weight":
        return config.weight_spec(q.node, q.op_type)
    return config.activation_spec(q.node, q.op_type)


def _promote(state: State, q: Quantizer, config: QuantConfig, change: str) -> State:
    where, key = _override_key(q)
    table = state.config.node_overrides if where == "node" else state.config.op_overrides
    previous = json.dumps(dict(table[key])) if key in table else None
    return dataclasses.replace(
        state, config=config, changes=state.changes + (change,),
        promoted=state.promoted + ((q.id, where, key, previous, change),),
    )


def _label(q: Quantizer) -> str:
    if q.kind == "constant":
        return f"constant {q.tensor} of {q.node}"
    return f"weights of {q.node}" if q.kind == "weight" else f"activation {q.tensor}"


class Fix:
    """A kind of fix. ``candidates`` returns new states, or a string: why it does not apply."""

    name = ""
    tier = 0
    high_precision = False
    #: global fixes act on the whole model: tried once, not per quantizer
    is_global = False

    def candidates(self, state: State, q: Quantizer | None) -> list[State] | str:
        raise NotImplementedError


FIXES: dict[str, Fix] = {}


def register_fix(fix: Fix) -> Fix:
    """Add ``fix`` to the registry (by its ``name``; a later one replaces an earlier one)."""
    FIXES[fix.name] = fix
    return fix


class PerChannel(Fix):
    name, tier = "per-channel", 0

    def candidates(self, state, q):
        if q is None or q.kind != "weight":
            return "only weights have channels"
        spec = spec_of(state.config, q)
        if spec is None or spec.per_channel:
            return "already per channel" if spec else "weights not quantized"
        return [dataclasses.replace(
            state, config=with_override(state.config, q, "weights", {"per_channel": True}),
            changes=state.changes + (f"per-channel weights for {q.node}",),
        )]


_NO_CONSTANT_FIX = "a constant operand's grid is not set by the config"


class RangeMethod(Fix):
    name, tier = "range", 0
    activation_methods: tuple[str, ...] = ("batch-median", "percentile", "mse")

    def candidates(self, state, q):
        if q is None:
            return "needs a quantizer"
        if q.kind == "constant":
            return _NO_CONSTANT_FIX
        spec = spec_of(state.config, q)
        if spec is None:
            return "not quantized"
        methods = ("mse",) if q.kind == "weight" else self.activation_methods
        kind = "weights" if q.kind == "weight" else "activations"
        out = [
            dataclasses.replace(
                state, config=with_override(state.config, q, kind, {"range_method": m}),
                changes=state.changes + (f"{m} range for {_label(q)}",),
            )
            for m in methods if m != spec.range_method
        ]
        return out or "no other range method"


class CrossLayerEqualization(Fix):
    name, tier, is_global = "cle", 1, True

    def candidates(self, state, q):
        if "cle" in state.passes or "dfq" in state.passes:
            return "CLE already in the passes"
        passes = tuple(state.passes)
        if "fold-bn" not in passes:
            passes = ("fold-bn",) + passes
        return [dataclasses.replace(state, passes=passes + ("cle",),
                                    changes=state.changes + ("cross-layer equalization (cle)",))]


class Algorithm(Fix):
    """A weight algorithm ``onnxq.algorithms.<function>(sim, data, **options) -> QuantSim``."""

    tier, is_global = 2, True

    def __init__(self, name: str, function: str, options: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.function = function
        self.options = tuple(sorted((options or {}).items()))

    def available(self) -> str | None:
        try:
            module = importlib.import_module("onnxq.algorithms")
        except ImportError as exc:
            return f"onnxq.algorithms is not available ({exc})"
        if not callable(getattr(module, self.function, None)):
            return f"onnxq.algorithms has no {self.function}()"
        return None

    def candidates(self, state, q):
        reason = self.available()
        if reason:
            return reason
        if any(n == self.name for n, _ in state.algorithms):
            return f"{self.name} already applied"
        return [dataclasses.replace(
            state, algorithms=state.algorithms + ((self.name, self.options),),
            changes=state.changes + (f"{self.name} on every quantized weight",),
        )]

    def apply(self, sim: Any, data: Any) -> Any:
        module = importlib.import_module("onnxq.algorithms")
        return getattr(module, self.function)(sim, data, **dict(self.options))


class HigherPrecision(Fix):
    name, tier, high_precision = "bits", 3, True

    def candidates(self, state, q):
        if q is None:
            return "needs a quantizer"
        if q.kind == "constant":
            return _NO_CONSTANT_FIX
        spec = spec_of(state.config, q)
        if spec is None:
            return "not quantized"
        if q.kind == "weight":
            bits = {4: 8, 8: 16}.get(spec.bits)
            kind = "weights"
        else:
            bits = 16 if spec.bits < 16 else None
            kind = "activations"
        if bits is None:
            return f"already {spec.bits}-bit"
        config = with_override(state.config, q, kind, {"bits": bits})
        return [_promote(state, q, config, f"{bits}-bit {_label(q)}")]


class KeepFloat(Fix):
    """The last resort of tier 3, used only when a higher bit-width could not be built."""

    name, tier, high_precision = "float", 3, True

    def candidates(self, state, q):
        if q is None:
            return "needs a quantizer"
        if q.kind == "constant":
            return _NO_CONSTANT_FIX
        flag = "skip_weights" if q.kind == "weight" else "skip_activations"
        config = with_override(state.config, q, "", None, flag=flag)
        return [_promote(state, q, config, f"float {_label(q)} (not quantized)")]


#: AdaRound as a candidate runs on a budget (it is tried, not tuned): fewer iterations and rows
#: than its defaults; a kept AdaRound can be rerun with its defaults on the final plan
ADAROUND_TRIAL = {"iterations": 300, "rows_per_layer": 2048, "max_samples": 64}

for _fix in (PerChannel(), RangeMethod(), CrossLayerEqualization(),
             Algorithm("adaround", "adaround", ADAROUND_TRIAL),
             Algorithm("bias-correction", "bias_correction"),
             HigherPrecision(), KeepFloat()):
    register_fix(_fix)


# --------------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trial:
    """One evaluated candidate: the metric and the proxy's output SQNR (dB)."""

    step: str
    fix: str
    quantizer: str
    change: str
    score: float | None
    kept: bool
    error: str = ""
    sqnr_db: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SearchResult:
    state: State
    score: float
    met: bool
    trials: list[Trial]
    skipped: list[dict]
    sqnr_db: float | None = None


#: (metric, output SQNR in dB or None); None when the candidate failed
Score = tuple[float, "float | None"]


def search(
    quantizers: Sequence[Quantizer],
    start: State,
    start_score: Score,
    evaluate: Callable[[list[State]], list[tuple[Score | None, str]]],
    met: Callable[[float], bool],
    higher_is_better: bool = True,
    min_gain: float = 0.0,
    sqnr_gain_db: float = 1.0,
    tolerance: float = 0.0,
    fixes: Sequence[str] = tuple(FIXES),
    worst: int = 12,
    max_promotions: int = 16,
) -> SearchResult:
    """Greedy search for the state that meets the target (module docstring).

    ``quantizers``: most sensitive first. ``evaluate(states)`` returns ``(score, error)`` per
    state, evaluated together (possibly in parallel), a score being ``(metric, sqnr_db)``. A
    candidate *helps* when its metric beats the current one by more than ``min_gain``, or stays
    within ``tolerance`` of it while the output SQNR rises by at least ``sqnr_gain_db``: a coarse
    metric (top-1 on a few hundred samples moves in steps of one sample, up and down by chance)
    often does not move for a fix that halves the output noise, nor for one of two fixes that
    only work together; the SQNR does. Among the candidates for one quantizer the one with the
    highest SQNR within ``tolerance`` of the best metric wins. ``met(metric)``: the target is
    reached.
    """
    sign = 1.0 if higher_is_better else -1.0
    tol = max(tolerance, min_gain)

    def helps(a: Score, b: Score) -> bool:
        delta = sign * (a[0] - b[0])
        if delta > min_gain:
            return True
        if delta < -tol or (tol == 0 and delta < 0):
            return False
        return a[1] is not None and b[1] is not None and a[1] - b[1] >= sqnr_gain_db

    def pick(scored: list[tuple[Trial, Score, State]]) -> tuple[Trial, Score, State]:
        """The best candidate: the highest SQNR among those within ``tol`` of the best metric."""
        top = max(sign * sc[0] for _, sc, _ in scored)
        near = [c for c in scored if top - sign * c[1][0] <= tol]
        return max(near, key=lambda c: (c[1][1] if c[1][1] is not None else -1e9, sign * c[1][0]))

    state, score = start, start_score
    trials: list[Trial] = []
    skipped: list[dict] = []
    chosen = [FIXES[n] for n in fixes if n in FIXES]
    for n in [n for n in fixes if n not in FIXES]:
        skipped.append({"fix": n, "quantizer": "", "reason": "unknown fix"})
        log.warning("fix '%s' is not registered (known: %s)", n, ", ".join(FIXES))
    tried_global: set[str] = set()

    def note_skip(fix: Fix, q: Quantizer | None, reason: str) -> None:
        skipped.append({"fix": fix.name, "quantizer": q.id if q else "", "reason": reason})
        log.debug("fix %s for %s: %s", fix.name, q.id if q else "model", reason)

    def candidates_for(wanted: Callable[[Fix], bool], q: Quantizer | None) -> list[tuple[Fix, State]]:
        out: list[tuple[Fix, State]] = []
        for fix in chosen:
            if not wanted(fix):
                continue
            if fix.is_global:
                if fix.name in tried_global:
                    continue
                tried_global.add(fix.name)
            got = fix.candidates(state, None if fix.is_global else q)
            if isinstance(got, str):
                if fix.is_global:
                    log.info("fix %s skipped: %s", fix.name, got)
                note_skip(fix, q, got)
                continue
            out.extend((fix, s) for s in got)
        return out

    def record(step: str, fix: Fix, q: Quantizer | None, cand: State,
               result: tuple[Score | None, str]) -> Trial:
        value, error = result
        trial = Trial(step, fix.name, q.id if q else "", cand.changes[-1] if cand.changes else "",
                      None if value is None else value[0], False, error,
                      None if value is None else value[1])
        trials.append(trial)
        return trial

    def try_all(step: str, q: Quantizer | None, cands: list[tuple[Fix, State]]) -> bool:
        nonlocal state, score
        if not cands:
            return False
        results = evaluate([c for _, c in cands])
        scored = []
        for (fix, cand), result in zip(cands, results):
            trial = record(step, fix, q, cand, result)
            if result[0] is not None:
                scored.append((trial, result[0], cand))
        best = pick(scored) if scored else None
        if best is not None and helps(best[1], score):
            best[0].kept = True
            state, score = best[2], best[1]
            log.info("kept: %s -> %.4f", best[0].change, score[0])
            return True
        return False

    # tiers 0-1: per quantizer, most sensitive first
    for q in quantizers[:worst]:
        if met(score[0]):
            break
        try_all("local", q, candidates_for(lambda f: f.tier <= 1, q))
    # tier 2: global algorithms, one at a time
    for fix in [f for f in chosen if f.tier == 2]:
        if met(score[0]):
            break
        try_all("algorithm", None, candidates_for(lambda f, fix=fix: f is fix, None))
    # tier 3: higher precision, one quantizer at a time
    promotions = 0
    use_float = any(f.name == "float" for f in chosen)
    use_bits = any(f.name == "bits" for f in chosen)
    for q in quantizers:
        if met(score[0]) or promotions >= max_promotions or not (use_bits or use_float):
            break
        cands = candidates_for(lambda f: f.name == "bits", q) if use_bits else []
        results = evaluate([c for _, c in cands]) if cands else []
        if (not cands or results[0][0] is None) and use_float:
            if cands:
                record("precision", cands[0][0], q, cands[0][1], results[0])
            got = FIXES["float"].candidates(state, q)
            if isinstance(got, str):
                continue
            cands, results = [(FIXES["float"], got[0])], evaluate([got[0]])
        if not cands:
            continue
        trial = record("precision", cands[0][0], q, cands[0][1], results[0])
        promotions += 1
        if results[0][0] is not None and helps(results[0][0], score):
            trial.kept = True
            state, score = cands[0][1], results[0][0]
    # prune: fewest high-precision quantizers that still meet the target
    if met(score[0]) and state.promoted:
        for qid in reversed(state.promoted_ids()):
            smaller = _without_promotion(state, qid)
            if smaller is None:
                continue
            result = evaluate([smaller])[0]
            trial = Trial("prune", "bits", qid, f"back to the default precision: {qid}",
                          None if result[0] is None else result[0][0], False, result[1],
                          None if result[0] is None else result[0][1])
            trials.append(trial)
            if result[0] is not None and met(result[0][0]):
                trial.kept = True
                state, score = smaller, result[0]
    return SearchResult(state, score[0], met(score[0]), trials, skipped, score[1])


def _without_promotion(state: State, qid: str) -> State | None:
    """``state`` with the promotion of ``qid`` undone: its node's override as it was before."""
    index = next((i for i, p in enumerate(state.promoted) if p[0] == qid), None)
    if index is None:
        return None
    _, where, key, previous, change = state.promoted[index]
    table = dict(state.config.node_overrides if where == "node" else state.config.op_overrides)
    if previous is None:
        table.pop(key, None)
    else:
        table[key] = json.loads(previous)
    config = state.config.replace(**{"node_overrides" if where == "node" else "op_overrides": table})
    return dataclasses.replace(
        state, config=config, changes=tuple(c for c in state.changes if c != change),
        promoted=state.promoted[:index] + state.promoted[index + 1:],
    )
