"""The fix registry and the search: overrides merge, targets stop it, promotions are pruned."""

from __future__ import annotations

import dataclasses

from onnxq.analysis.fixes import FIXES, Algorithm, State, register_fix, search, with_override
from onnxq.analysis.quantizers import Quantizer
from onnxq.quant.config import QuantConfig


def _q(qid: str, kind: str = "weight", node: str = "conv", op: str = "Conv") -> Quantizer:
    return Quantizer(qid, kind, qid[2:], node, op, 8, kind == "weight", False, (-1.0, 1.0))


def test_override_keeps_the_op_override_and_targets_the_owner():
    base = QuantConfig(op_overrides={"Conv": {"activations": {"bits": 16}}})
    cfg = with_override(base, _q("w:c1", node="c1"), "weights", {"per_channel": True})
    assert cfg.node_overrides["c1"] == {"activations": {"bits": 16}, "weights": {"per_channel": True}}
    assert cfg.weight_spec("c1", "Conv").per_channel and not cfg.weight_spec("c2", "Conv").per_channel
    inp = with_override(QuantConfig(), _q("a:x", "activation", "", "<input>"), "activations", {"bits": 16})
    assert inp.op_overrides["<input>"] == {"activations": {"bits": 16}}
    assert inp.activation_spec("", "<input>").bits == 16


def test_algorithms_absent_are_skipped_with_a_reason():
    fix = Algorithm("nope", "no_such_function")
    reason = fix.candidates(State(QuantConfig()), None)
    assert isinstance(reason, str) and "no_such_function" in reason


def _fake(values):
    """evaluate(states): score = sum of per-change values, SQNR = 10 × score."""

    def evaluate(states):
        out = []
        for s in states:
            score = sum(values.get(c, 0.0) for c in s.changes)
            out.append(((score, 10 * score), ""))
        return out

    return evaluate


def test_search_keeps_what_helps_and_stops_at_the_target():
    qs = [_q("w:a", node="a"), _q("w:b", node="b"), _q("w:c", node="c")]
    values = {"per-channel weights for a": 0.5, "per-channel weights for b": 0.3,
              "per-channel weights for c": 0.3, "mse range for weights of a": 0.1}
    res = search(qs, State(QuantConfig()), (0.0, 0.0), _fake(values), lambda s: s >= 0.75,
                 fixes=("per-channel", "range"))
    assert res.met and res.state.changes == ("per-channel weights for a", "per-channel weights for b")
    assert "c" not in res.state.config.node_overrides  # stopped once the target was met
    kept = [t.change for t in res.trials if t.kept]
    assert kept == ["per-channel weights for a", "per-channel weights for b"]


def test_precision_is_raised_one_by_one_then_pruned():
    qs = [_q("w:a", node="a"), _q("a:t", "activation", "relu", "Relu"), _q("w:b", node="b")]
    values = {"16-bit weights of a": 0.2, "16-bit activation t": 0.9, "16-bit weights of b": 0.0}
    res = search(qs, State(QuantConfig()), (0.0, 0.0), _fake(values), lambda s: s >= 0.85,
                 fixes=("bits",))
    # a helped first, t reached the target, then a was found unnecessary and dropped
    assert res.met and res.state.promoted_ids() == ["a:t"]
    assert res.state.config.node_overrides == {"relu": {"activations": {"bits": 16}}}
    assert [t.step for t in res.trials] == ["precision", "precision", "prune", "prune"]


def test_a_coarse_metric_plateau_is_crossed_with_sqnr():
    qs = [_q("w:a", node="a"), _q("w:b", node="b")]

    def evaluate(states):  # the metric moves only when both fixes are in; the SQNR moves for each
        out = []
        for s in states:
            n = len(s.changes)
            out.append(((1.0 if n == 2 else 0.0, 5.0 * n), ""))
        return out

    res = search(qs, State(QuantConfig()), (0.0, 0.0), evaluate, lambda s: s >= 1.0,
                 fixes=("per-channel",))
    assert res.met and len(res.state.changes) == 2


def test_new_fixes_plug_into_the_registry():
    class Nothing(Algorithm):
        pass

    fix = register_fix(Nothing("test-nothing", "adaround"))
    try:
        assert FIXES["test-nothing"] is fix
    finally:
        del FIXES["test-nothing"]


def test_state_key_is_stable():
    a = State(QuantConfig(), ("fold-bn",))
    assert a.key() == dataclasses.replace(a, changes=("x",)).key()


def test_a_fix_that_halves_the_noise_survives_one_unlucky_sample():
    qs = [_q("w:a", node="a"), _q("w:b", node="b")]

    def evaluate(states):  # a: one sample worse by chance but 3 dB cleaner; b: the target
        out = []
        for s in states:
            score = 0.80 - 0.004 * ("per-channel weights for a" in s.changes) \
                + 0.2 * ("per-channel weights for b" in s.changes)
            out.append(((score, 10.0 + 3.0 * len(s.changes)), ""))
        return out

    strict = search(qs, State(QuantConfig()), (0.8, 10.0), evaluate, lambda s: s >= 0.99,
                    fixes=("per-channel",), tolerance=0.0)
    assert strict.state.changes == ("per-channel weights for b",)
    tolerant = search(qs, State(QuantConfig()), (0.8, 10.0), evaluate, lambda s: s >= 0.99,
                      fixes=("per-channel",), tolerance=0.005)
    assert tolerant.state.changes == ("per-channel weights for a", "per-channel weights for b")
