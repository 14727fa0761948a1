"""``compress``: reach a MAC target with per-layer ratios chosen by a sweep, stage by stage.

A scheme is a sequence of techniques, e.g. ``ssvd+cp`` (the seed's recipe: spatial SVD, fine-tune,
then channel pruning, fine-tune). With the uncompressed MACs ``M₀``, the target ``C·M₀`` and
``n`` stages left, each stage aims at ``M·(C·M₀/M)^(1/n)`` from its input's MACs ``M`` (equal
shares of the remaining reduction), runs its ratio sweep (:mod:`onnxq.compress.select`), applies
the chosen ratios, and fine-tunes by distillation from the uncompressed model when
``finetune_epochs > 0`` and ``onnxq.train`` is available. A stage that cannot reach its share
(e.g. spatial SVD on a network of 1×1 and depthwise convolutions) compresses only as far as a
score drop of ``stage_drop`` (relative to its input's score; with the proxy: down to an output
SQNR of ``stage_min_sqnr`` dB) and leaves the rest to the next stage; the last stage goes as far
as the target needs. ``first_stage_shares`` runs the seed's "first stage at a few ratios,
fine-tune, keep the best": one candidate per share of the whole reduction given to the first
stage (log scale: share ``s`` aims at ``C^s·M₀``), each finished by the other stages; the
candidate with the best final score is kept and all are listed in the summary.

Data: ``data`` is the calibration set (any form :func:`onnxq.runtime.data.as_batches` takes);
``eval_data`` the held-out samples of the proxy score, by default the last fifth of ``data``
(then not used for calibration). The score is ``evaluate(session)`` when given, else the proxy
against the uncompressed model's outputs. The input model is never modified; weights held in
``Constant`` nodes are lifted to initializers first (exact).
"""

from __future__ import annotations

__all__ = ["CompressConfig", "CompressResult", "compress", "parse_scheme"]

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.compress.select import DEFAULT_RATIOS, TECHNIQUES
from onnxq.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_VERSION = 1


def parse_scheme(scheme: str | Sequence[str]) -> tuple[str, ...]:
    """``"ssvd+cp"`` → ``("ssvd", "cp")``; long names (``spatial-svd``) are accepted."""
    parts = scheme.replace(",", "+").split("+") if isinstance(scheme, str) else list(scheme)
    long_to_short = {v: k for k, v in TECHNIQUES.items()}
    out = []
    for part in (p.strip().lower() for p in parts):
        if not part:
            continue
        part = long_to_short.get(part, part)
        if part not in TECHNIQUES:
            raise ConfigError(f"unknown compression technique '{part}' in scheme (known: {', '.join(TECHNIQUES)})")
        out.append(part)
    if not out:
        raise ConfigError("the compression scheme is empty (e.g. 'ssvd+cp')")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """How to compress (serializes to a versioned dict)."""

    #: the compressed model's MACs as a fraction of the original's
    target_macs: float = 0.5
    scheme: tuple[str, ...] = ("ssvd", "cp")
    #: candidate per-layer ratios of the sweep (MACs kept for SVD, input channels kept for pruning)
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    #: layer names (or glob patterns) never compressed
    exclude: tuple[str, ...] = ()
    #: channel selection: greedy or lasso
    method: str = "greedy"
    #: calibration samples used to fit channel pruning
    calib_samples: int | None = 64
    #: sampled output positions per pruned layer (at least 3× its patch size)
    rows: int = 4096
    #: kept channel counts are rounded to a multiple of this: onnxruntime's CPU convolutions work
    #: in blocks of 8 channels (EfficientNet-Lite0, 7 layers pruned to 53 %: odd counts ran 15 %
    #: slower than the unpruned model, multiples of 8 ran 8 % faster)
    channel_multiple: int = 8
    #: sweep worker processes (0: up to 2)
    workers: int = 0
    cache: bool = True
    cache_dir: str | None = None
    #: the key of the user's evaluator when it returns a dict
    metric: str | None = None
    higher_is_better: bool = True
    #: a stage that cannot reach its share stops at this relative drop of the user's score ...
    stage_drop: float = 0.01
    #: ... or, with the proxy, at this output SQNR (dB) against the uncompressed model
    stage_min_sqnr: float = 30.0
    finetune_epochs: int = 0
    finetune_lr: float = 1e-4
    #: image augmentation while fine-tuning (:class:`onnxq.train.TrainConfig`'s ``augment``)
    finetune_augment: str = "auto"
    #: the seed's recipe "first stage at a few ratios, fine-tune, keep the best": try each share
    #: of the whole reduction (log scale) for the first stage, finish every candidate with the
    #: other stages, keep the best final score; () = equal shares, one run
    first_stage_shares: tuple[float, ...] = ()
    #: also distill the intermediate tensors both models share (Conv/Gemm/MatMul/Add outputs of
    #: the same name and shape), not only the outputs
    finetune_features: bool = False
    #: run the sweep as Ray tasks: "auto", "local" or a cluster address
    ray: str | None = None
    latency_repeats: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.target_macs <= 1:
            raise ConfigError(f"target MACs must be in (0, 1], got {self.target_macs}")
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        ratios = tuple(float(r) for r in self.ratios)
        if not ratios or any(not 0 < r < 1 for r in ratios):
            raise ConfigError(f"candidate ratios must lie in (0, 1), got {ratios}")
        object.__setattr__(self, "ratios", tuple(sorted(set(ratios))))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        shares = tuple(float(x) for x in self.first_stage_shares)
        if any(not 0 < x <= 1 for x in shares):
            raise ConfigError(f"first-stage shares must lie in (0, 1], got {shares}")
        object.__setattr__(self, "first_stage_shares", shares)
        if self.method not in ("greedy", "lasso"):
            raise ConfigError(f"channel selection method must be greedy or lasso, got '{self.method}'")
        if self.finetune_augment not in ("auto", "match", "none", "shift", "flip"):
            raise ConfigError(f"fine-tuning augmentation '{self.finetune_augment}' is not one of "
                              "auto, match, none, shift, flip")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["version"] = CONFIG_VERSION
        out["scheme"] = "+".join(self.scheme)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressConfig:
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"compression config version {version} is not supported (expected {CONFIG_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown compression config keys: {', '.join(unknown)}")
        return cls(**data)


@dataclasses.dataclass
class CompressResult:
    model: ir.Model
    summary: dict

    def save(self, path: str | os.PathLike, summary_path: str | os.PathLike | None = None,
             overwrite: bool = False) -> dict[str, str]:
        """Write the model, the JSON summary (default: beside it, ``<stem>.json``) and the HTML
        page with the score curves (``<summary stem>.html``)."""
        import onnxq
        from onnxq.compress.report import summary_html

        path = Path(path)
        summary_path = Path(summary_path) if summary_path else path.with_suffix(".json")
        html_path = summary_path.with_suffix(".html")
        onnxq.save(self.model, path, overwrite=overwrite)
        for target, text in ((summary_path, json.dumps(self.summary, indent=1, default=_json_default)),
                             (html_path, summary_html(self.summary))):
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(text)
            tmp.replace(target)
        return {"model": str(path), "summary": str(summary_path), "report": str(html_path)}

    def table(self) -> str:
        """A short text summary: MACs, params, latency, score before/after and per stage."""
        s = self.summary
        b, a = s["before"], s["after"]
        lines = [
            f"MACs    {b['macs'] / 1e6:10.1f} M -> {a['macs'] / 1e6:10.1f} M  ({a['macs'] / b['macs']:.3f}, target {s['config']['target_macs']:.3f})",
            f"params  {b['params'] / 1e6:10.3f} M -> {a['params'] / 1e6:10.3f} M  ({a['params'] / b['params']:.3f})",
            f"latency {b['latency']['median_ms']:10.2f} ms -> {a['latency']['median_ms']:8.2f} ms (onnxruntime, batch 1)",
            f"score   {b['score']:10.4f}   -> {a['score']:10.4f}   ({s['score_name']})",
        ]
        agree = a["metrics"].get("agreement", a["metrics"].get("proxy_agreement"))
        if agree is not None:
            lines.append(f"argmax agreement with the original on the held-out samples: {agree:.4f}")
        for st in s["stages"]:
            n = len(st["layers"])
            lines.append(f"stage {st['technique']}: {n} layers compressed, MACs {st['macs_before'] / 1e6:.1f} M -> "
                         f"{st['macs_after'] / 1e6:.1f} M (aimed at {st['target_macs'] / 1e6:.1f} M), score {st['score_after']:.4g}"
                         + (f", fine-tune: {st['finetune']['status']}" if st.get("finetune") else ""))
        return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# ---- data ---------------------------------------------------------------------------------------
def _count(batch: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(batch.values())).shape[0]) if batch else 1


def _split(batches: list[dict[str, np.ndarray]], first: int) -> tuple[list[dict], list[dict]]:
    """The first ``first`` samples and the rest (batches cut along axis 0)."""
    head, tail, seen = [], [], 0
    for feeds in batches:
        n = _count(feeds)
        if seen + n <= first:
            head.append(feeds)
        elif seen >= first:
            tail.append(feeds)
        else:
            k = first - seen
            head.append({name: arr[:k] for name, arr in feeds.items()})
            tail.append({name: arr[k:] for name, arr in feeds.items()})
        seen += n
    return head, tail


def _limit(batches: list[dict[str, np.ndarray]], count: int | None) -> list[dict[str, np.ndarray]]:
    return batches if count is None else _split(batches, count)[0]


def _finetune(student: ir.Model, teacher: ir.Model, batches: list[dict[str, np.ndarray]],
              config: CompressConfig, progress: bool = False) -> tuple[ir.Model, dict]:
    """Distillation from ``teacher`` with ``onnxq.train``'s loop (:func:`onnxq.train.distill`;
    torch); skipped with a reason when it is not available."""
    if config.finetune_epochs <= 0:
        return student, {"status": "off"}
    from onnxq.compress.finetune import finetune_available

    problem = finetune_available()
    if problem:
        log.warning("fine-tuning skipped: %s", problem)
        return student, {"status": "skipped", "reason": problem}
    from onnxq.train import TrainConfig, distill

    start = time.perf_counter()
    train = TrainConfig(epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed,
                        augment=config.finetune_augment, progress=progress)
    tuned, info = distill(student, teacher, batches, train, features=config.finetune_features)
    info["seconds"] = time.perf_counter() - start
    return tuned, info


def _picklable(fn: Any) -> bool:
    import pickle

    from onnxq.analysis.sweep import defined_in_main

    if defined_in_main(fn):
        return False
    try:
        pickle.dumps(fn)
    except Exception:  # noqa: BLE001 - any failure means "not picklable"
        return False
    return True


# ---- the driver ---------------------------------------------------------------------------------
def _bar(progress: Callable[[str, int], Any] | None, what: str, total: int):
    if progress is None:
        return None, lambda: None
    bar = progress(what, total)
    return bar.update, bar.close


def compress(
    model: Any,
    data: Any,
    *,
    config: CompressConfig | Mapping[str, Any] | None = None,
    evaluate: Callable[[Any], Any] | str | None = None,
    eval_data: Any = None,
    progress: Callable[[str, int], Any] | None = None,
) -> CompressResult:
    """Compress ``model`` to ``config.target_macs`` of its MACs (module docstring)."""
    import onnxq
    from onnxq.algorithms._capture import materialize
    from onnxq.analysis.evaluate import (
        evaluator_id,
        proxy_metrics,
        resolve_evaluator,
        save_proxy_data,
        score_of,
    )
    from onnxq.analysis.sweep import digest
    from onnxq.compress.macs import count_macs, measure_latency
    from onnxq.compress.select import (
        SweepSpec,
        candidate_layers,
        choose_ratios,
        make_pass,
        proxy_score,
        run_ratio_sweep,
        save_batches,
    )
    from onnxq.passes.cleanup import Cleanup
    from onnxq.passes.lift_constants import LiftConstants
    from onnxq.runtime.session import create_session

    if config is None:
        config = CompressConfig()
    elif isinstance(config, Mapping):
        config = CompressConfig.from_dict(config)
    loaded = onnxq.load(model)
    original = loaded.clone() if loaded is model else loaded
    # weights and bounds held in Constant nodes become initializers (exact), so that the passes
    # see them as constants (PaddleOCR, PyTorch-exported Clip bounds)
    LiftConstants()(original)
    Cleanup()(original)
    user_eval = resolve_evaluator(evaluate)

    batches = materialize(data, original)
    if eval_data is not None:
        held = materialize(eval_data, original)
        calib = batches
    else:
        total = sum(_count(b) for b in batches)
        if total < 2:
            raise ConfigError("compress needs at least 2 samples (calibration + held-out) or eval_data")
        calib, held = _split(batches, total - max(1, total // 5))
    train = calib  # fine-tuning uses every calibration sample
    calib = _limit(calib, config.calib_samples)

    workers = config.workers or min(2, os.cpu_count() or 1)
    if workers > 1 and evaluate is not None and not isinstance(evaluate, str) and not _picklable(evaluate):
        log.info("the evaluation function cannot go to worker processes (a closure or defined in "
                 "__main__): the sweep runs in this process")
        workers = 1
    threads = 1 if workers > 1 else None
    reference_session = create_session(original, optimize=True)
    reference = [reference_session.run(None, f) for f in held]

    def score_model(m: ir.Model) -> tuple[float, dict]:
        session = create_session(m, optimize=True)
        metrics = proxy_metrics([session.run(None, f) for f in held], reference)
        if user_eval is not None:
            score, user = score_of(user_eval(session), config.metric)
            return score, {**user, **{f"proxy_{k}": v for k, v in metrics.items()}}
        return proxy_score(metrics), metrics

    cost0 = count_macs(original)
    target_abs = config.target_macs * cost0.macs
    latency0 = measure_latency(original, repeats=config.latency_repeats)
    score0, metrics0 = score_model(original)
    score_name = evaluator_id(evaluate) if evaluate is not None else "proxy: output SQNR (dB) vs the original"
    log.info("compress: %.1f M MACs, target %.1f M (%.2f), scheme %s", cost0.macs / 1e6,
             target_abs / 1e6, config.target_macs, "+".join(config.scheme))

    cache_root = Path(config.cache_dir) if config.cache_dir else Path.home() / ".cache" / "onnxq" / "compress"

    sweeps: dict[str, tuple[Any, Any]] = {}  # sweep results by their digest, within this call

    def run_stage(current: ir.Model, index: int, technique: str, stage_target: float, tmp: str,
                  calib_path: str, proxy_path: str, tag: str) -> tuple[ir.Model, dict]:
        cost = count_macs(current)
        layers, skipped = candidate_layers(current, technique, config.exclude)
        log.info("stage %s: %d candidate layers (%d skipped), aiming at %.1f M MACs",
                 technique, len(layers), len(skipped), stage_target / 1e6)
        stage_path = os.path.join(tmp, f"{tag}stage{index}.onnx")
        ir.save(current, stage_path)
        spec = SweepSpec(stage_path, technique, calib_path if technique == "cp" else None, proxy_path,
                         evaluate,
                         config.metric, config.method, config.rows, config.seed, threads,
                         config.channel_multiple)
        namespace = digest(Path(stage_path), Path(proxy_path), Path(calib_path) if technique == "cp" else "",
                           evaluator_id(evaluate), config.metric, technique, config.method, config.rows,
                           config.seed, config.channel_multiple, "compress-sweep-v2")
        if namespace in sweeps:  # the same stage input again (the first stage of every candidate)
            baseline, curves = sweeps[namespace]
        else:
            update, close = _bar(progress, f"sweep {technique}", len(layers) + 1)
            try:
                baseline, curves = run_ratio_sweep(
                    spec, layers, config.ratios, workers=workers,
                    cache_dir=str(cache_root) if config.cache else None, namespace=namespace,
                    progress=update, ray=config.ray)
            finally:
                close()
            sweeps[namespace] = (baseline, curves)
        last = index == len(config.scheme) - 1
        min_score = None
        if not last and evaluate is not None:
            base = float(baseline["score"])
            drop = config.stage_drop * abs(base)
            min_score = base - drop if config.higher_is_better else base + drop
        elif not last:
            min_score = config.stage_min_sqnr
        stage_input = current.clone()
        aim = stage_target
        for attempt in range(3 if last else 1):
            selection = choose_ratios(curves, cost.macs, aim, higher_is_better=config.higher_is_better,
                                      min_score=min_score, baseline=float(baseline["score"]))
            if not selection.reached:
                log.log(logging.WARNING if last else logging.INFO,
                        "stage %s: its share of the target is out of reach (predicted %.1f M MACs > %.1f M)%s",
                        technique, selection.predicted_macs / 1e6, stage_target / 1e6,
                        "" if last else (f"; stopping at a {config.stage_drop:.0%} score drop" if evaluate is not None
                                         else f"; stopping at an output SQNR of {config.stage_min_sqnr:g} dB"))
            current = stage_input.clone()
            applied: dict[str, Any] = {}
            if selection.ratios:
                compress_pass = make_pass(technique, selection.ratios, data=calib, reference=stage_input,
                                          method=config.method, rows=config.rows, seed=config.seed,
                                          multiple=config.channel_multiple)
                compress_pass(current)
                Cleanup()(current)
                applied = dict(getattr(compress_pass, "chosen", {}) or
                               {k: len(v) for k, v in getattr(compress_pass, "kept", {}).items()})
                for where, why in compress_pass.report.skipped:
                    log.warning("stage %s: %s not compressed: %s", technique, where, why)
            actual = count_macs(current).macs
            # savings measured one layer at a time do not add up exactly (adjacent prunings
            # overlap): aim lower by the miss and choose again
            if actual <= stage_target * 1.005 or not selection.reached:
                break
            aim -= actual - selection.predicted_macs
            log.info("stage %s: %.2f M MACs above the prediction, choosing again", technique,
                     (actual - selection.predicted_macs) / 1e6)
        if selection.ratios:
            current, tuned = _finetune(current, original, train, config, progress is not None)
        else:
            tuned = {"status": "off" if config.finetune_epochs <= 0 else "skipped",
                     "reason": "the stage compressed nothing"}
        after = count_macs(current)
        score_after, _ = score_model(current)
        by_name = cost.by_name()
        return current, {
            "technique": TECHNIQUES[technique],
            "macs_before": cost.macs,
            "target_macs": int(stage_target),
            "predicted_macs": selection.predicted_macs,
            "macs_after": after.macs,
            "params_after": after.params,
            "threshold": selection.threshold,
            "reached": selection.reached,
            "score_before": float(baseline["score"]),
            "score_after": score_after,
            "layers": {
                name: {"ratio": ratio, ("rank" if technique != "cp" else "kept_channels"): applied.get(name),
                       "macs_before": by_name[name].macs if name in by_name else None}
                for name, ratio in selection.ratios.items()
            },
            "curves": {name: [{k: p[k] for k in ("ratio", "score", "macs", "skipped") if k in p} for p in curve]
                       for name, curve in curves.items()},
            "skipped": [{"layer": n, "reason": r} for n, r in skipped],
            "finetune": tuned,
        }

    def run_scheme(share: float | None, tmp: str, calib_path: str, proxy_path: str,
                   tag: str) -> tuple[ir.Model, list[dict]]:
        """All stages; the first one aims at ``share`` of the whole reduction (log scale) when
        given, every other stage at an equal share of what is left."""
        current = original.clone()
        stages: list[dict] = []
        for index, technique in enumerate(config.scheme):
            macs = count_macs(current).macs
            remaining = len(config.scheme) - index
            if macs <= target_abs:
                log.info("stage %s: target already reached", technique)
                break
            if index == 0 and share is not None:
                stage_target = max(target_abs, cost0.macs * config.target_macs ** share)
            else:
                stage_target = macs * (target_abs / macs) ** (1.0 / remaining)
            current, stage = run_stage(current, index, technique, stage_target, tmp, calib_path,
                                       proxy_path, tag)
            stages.append(stage)
        return current, stages

    shares: tuple[float | None, ...] = (None,)
    if config.first_stage_shares and len(config.scheme) > 1:
        shares = tuple(config.first_stage_shares)
    candidates: list[dict] = []
    best: tuple[float, ir.Model, list[dict], float | None] | None = None
    with tempfile.TemporaryDirectory(prefix="onnxq-compress-") as tmp:
        proxy_path = os.path.join(tmp, "proxy.npz")
        calib_path = os.path.join(tmp, "calib.npz")
        save_proxy_data(proxy_path, held, reference)
        save_batches(calib_path, calib)
        for k, share in enumerate(shares):
            if share is not None:
                log.info("compress: candidate %d/%d: the first stage takes %.0f %% of the reduction",
                         k + 1, len(shares), 100 * share)
            model_k, stages_k = run_scheme(share, tmp, calib_path, proxy_path, f"c{k}")
            score_k, _ = score_model(model_k)
            candidates.append({"first_stage_share": share, "score": score_k,
                               "macs": count_macs(model_k).macs})
            better = best is None or (score_k > best[0] if config.higher_is_better else score_k < best[0])
            if better:
                best = (score_k, model_k, stages_k, share)
    assert best is not None
    _, current, stages, chosen_share = best
    if len(candidates) > 1:
        log.info("compress: kept the candidate whose first stage took %.0f %% of the reduction "
                 "(score %.4g)", 100 * float(chosen_share or 0.0), best[0])
    cost1 = count_macs(current)
    latency1 = measure_latency(current, repeats=config.latency_repeats)
    score1, metrics1 = score_model(current)
    summary = {
        "version": 1,
        "config": config.to_dict(),
        "score_name": score_name,
        "before": {"macs": cost0.macs, "params": cost0.params, "latency": latency0, "score": score0,
                   "metrics": metrics0},
        "after": {"macs": cost1.macs, "params": cost1.params, "latency": latency1, "score": score1,
                  "metrics": metrics1},
        "stages": stages,
        "candidates": candidates,
        "first_stage_share": chosen_share,
    }
    log.info("compress: MACs %.1f M -> %.1f M, score %.4f -> %.4f", cost0.macs / 1e6, cost1.macs / 1e6,
             score0, score1)
    return CompressResult(current, summary)
