"""``onnxq.analysis.analyze``: the quantization debugging flow as one call, and the fix it finds.

Steps (each measured as its docstring says; times are kept in ``result.data["timing_s"]``):

1. **FP32 sanity** (:mod:`~onnxq.analysis.sanity`): the QDQ model with every quantizer made
   lossless reproduces the float model — max |Δ| over the outputs, must be 0.
2. **Weights only vs activations only**: the metric with only the weight quantizers on, and with
   only the activation quantizers on (variants of the one QDQ model, Q/DQ pairs bypassed), next
   to FP32 and the full model: which of the two causes the drop.
3. **Per-quantizer sensitivity** (:mod:`~onnxq.analysis.sensitivity`): every quantizer enabled
   alone and disabled alone (parallel worker processes, results cached on disk), and every
   layer's output SQNR/MSE against the float model on calibration data.
4. **Ranges** (:mod:`~onnxq.analysis.ranges`): per-channel weight ranges (and after CLE),
   activation histograms with the chosen grid.
5. **Fixes that are tried** (:mod:`~onnxq.analysis.fixes`): per-channel, CLE, range methods,
   weight algorithms and higher bit-widths for the worst quantizers, kept when they help, until
   the target (allowed drop from FP32) is met with the fewest high-precision quantizers. The
   plan is a :class:`~onnxq.quant.config.QuantConfig` (``plan.json``) plus float passes: it is
   rebuilt at the end with :func:`onnxq.quantize` and evaluated again, as a user would rebuild it
   with ``onnxq quantize --config plan.json --passes …``.

"Accuracy" is the user's evaluation function when given (``evaluate(session) -> float | dict``),
else the built-in proxy: argmax agreement with FP32 (or output SQNR) on held-out samples. The
per-quantizer sweeps use the proxy's output SQNR by default (``sweep_metric="proxy"``): a single
quantizer moves top-1 on a few hundred images by less than one image, below what that metric
resolves, while SQNR ranks it; ``sweep_metric="eval"`` uses the user's metric there too.
Held-out samples: ``eval_data`` when given, else the last ``holdout_batches`` batches of the
calibration data (about a fifth), which are then not used for calibration.
"""

from __future__ import annotations

__all__ = ["AnalysisConfig", "AnalysisResult", "analyze"]

import dataclasses
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import ConfigError
from onnxq.quant.config import QuantConfig

log = logging.getLogger(__name__)

ANALYSIS_VERSION = 1
#: bumped whenever a cached evaluation would change meaning (how variants are cut, metrics)
CACHE_VERSION = 1
DEFAULT_FIXES = ("per-channel", "cle", "range", "adaround", "bias-correction", "bits", "float")


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """How an analysis measures and what it may change. Serializes with ``to_dict``/``from_dict``."""

    #: allowed drop from FP32 in the metric's units (0.01 = 1 point of top-1, or of CER upwards)
    target_drop: float = 0.01
    #: an absolute target instead (e.g. 0.9 top-1, 0.01 CER, 30 dB SQNR)
    target_value: float | None = None
    #: the key of the user's evaluation result when it returns a dict
    metric: str | None = None
    #: False for error rates (CER, WER, loss)
    higher_is_better: bool = True
    #: without a user evaluation: "agreement" (argmax agreement with FP32), "sqnr", or "auto"
    #: (agreement when the first output has a class axis, else SQNR with a 30 dB target)
    proxy_metric: str = "auto"
    #: held-out samples for the proxy
    proxy_samples: int = 64
    #: calibration batches held out for the proxy when no eval_data is given (None: ~20 %)
    holdout_batches: int | None = None
    #: what ranks quantizers: "proxy" (output SQNR) or "eval" (the user's metric)
    sweep_metric: str = "proxy"
    sweeps: tuple[str, ...] = ("enabled", "disabled")
    #: calibration samples for the per-layer SQNR and the sanity check
    layer_samples: int = 32
    sanity_samples: int = 8
    #: the most sensitive quantizers that get tier 0-1 fixes
    worst: int = 12
    max_promotions: int = 16
    fixes: tuple[str, ...] = DEFAULT_FIXES
    #: a candidate is kept when it beats the current score by more than this, or stays within it
    #: while the output SQNR rises by ``sqnr_gain_db``
    min_gain: float = 0.0
    sqnr_gain_db: float = 1.0
    #: how much worse the metric may get for a fix kept for its SQNR (None: target_drop / 2)
    metric_tolerance: float | None = None
    #: worker processes (0: min(2, CPU count)); 1 runs everything in this process
    workers: int = 0
    threads_per_worker: int = 1
    cache: bool = True
    #: layers / histograms drawn individually in the report (0: a report without plots)
    plots: int = 12
    version: int = ANALYSIS_VERSION

    def __post_init__(self) -> None:
        if self.proxy_metric not in ("auto", "agreement", "sqnr"):
            raise ConfigError(f"proxy_metric must be auto, agreement or sqnr, not '{self.proxy_metric}'")
        if self.sweep_metric not in ("proxy", "eval"):
            raise ConfigError(f"sweep_metric must be proxy or eval, not '{self.sweep_metric}'")
        bad = [s for s in self.sweeps if s not in ("enabled", "disabled")]
        if bad:
            raise ConfigError(f"unknown sweep '{bad[0]}' (enabled, disabled)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalysisConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown analysis option(s): {', '.join(sorted(unknown))}")
        data = dict(data)
        for key in ("sweeps", "fixes"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclasses.dataclass
class AnalysisResult:
    """The analysis as data (``data``: what ``analysis.json`` holds), the plan and its model."""

    data: dict[str, Any]
    plan: QuantConfig
    passes: tuple[str, ...]
    algorithms: tuple[str, ...]
    sim: Any = None
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)

    def write(self, out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
        """Write ``analysis.json``, ``plan.json``, ``report.html`` and ``plots/*.png``."""
        from onnxq.analysis.report import write_report

        self.paths = write_report(self.data, out_dir, plots=plots)
        return self.paths

    def summary(self) -> str:
        from onnxq.analysis.report import terminal_summary

        return terminal_summary(self.data)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _materialize(data: Any, model: ir.Model) -> list[dict[str, np.ndarray]]:
    from onnxq.runtime.data import as_batches, input_specs

    return [dict(b) for b in as_batches(data, input_specs(model))]


def _samples(batch: Mapping[str, np.ndarray]) -> int:
    arr = next(iter(batch.values()), None)
    return int(arr.shape[0]) if arr is not None and arr.ndim else 1


def _take(batches: Sequence[Mapping[str, np.ndarray]], samples: int) -> list[dict[str, np.ndarray]]:
    out, seen = [], 0
    for b in batches:
        if seen >= samples:
            break
        n = _samples(b)
        keep = min(n, samples - seen)
        out.append({k: v[:keep] for k, v in b.items()} if keep < n else dict(b))
        seen += keep
    return out


def _passes_tuple(passes: str | Iterable[str] | None) -> tuple[str, ...]:
    if passes is None:
        return ()
    if isinstance(passes, str):
        return tuple(p.strip() for p in passes.split(",") if p.strip())
    return tuple(str(p) for p in passes)


def _picklable(obj: Any) -> str | None:
    try:
        pickle.dumps(obj)
    except Exception as exc:  # noqa: BLE001 - any pickling failure means: run in-process
        return f"{type(exc).__name__}: {exc}"
    return None


class _Metric:
    """The primary metric: the user's when given, else the proxy's."""

    def __init__(self, options: AnalysisConfig, user: bool, reference: Sequence[np.ndarray]) -> None:
        self.user = user
        if user:
            self.name = options.metric or "metric"
            self.higher_is_better = options.higher_is_better
            self.source = "user"
        else:
            first = reference[0] if reference else None
            proxy = options.proxy_metric
            if proxy == "auto":
                proxy = "agreement" if first is not None and first.ndim >= 2 and first.shape[-1] >= 2 else "sqnr"
            self.name = "agreement" if proxy == "agreement" else "sqnr_db"
            self.higher_is_better = True
            self.source = "proxy"
        self.options = options

    def of(self, result: Mapping[str, Any] | None) -> float | None:
        if not result or "error" in result:
            return None
        if self.user:
            return result.get("eval", {}).get("score")
        return result.get("proxy", {}).get(self.name)

    def target(self, fp32: float) -> float:
        if self.options.target_value is not None:
            return self.options.target_value
        if self.name == "sqnr_db":
            return 30.0
        sign = 1.0 if self.higher_is_better else -1.0
        return fp32 - sign * self.options.target_drop

    def tolerance(self) -> float:
        if self.options.metric_tolerance is not None:
            return self.options.metric_tolerance
        if self.name == "sqnr_db" or self.options.target_value is not None:
            return 0.0
        return self.options.target_drop / 2

    def met(self, score: float, fp32: float) -> bool:
        target = self.target(fp32)
        return score >= target - 1e-9 if self.higher_is_better else score <= target + 1e-9

    def drop(self, score: float | None, fp32: float | None) -> float | None:
        if score is None or fp32 is None or self.name == "sqnr_db":
            return None
        return (fp32 - score) if self.higher_is_better else (score - fp32)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "higher_is_better": self.higher_is_better}


# --------------------------------------------------------------------------------------------------
# the analysis
# --------------------------------------------------------------------------------------------------


def analyze(
    model: Any,
    calibration_data: Any,
    evaluate: Callable[[Any], Any] | str | None = None,
    *,
    config: QuantConfig | str | Mapping[str, Any] = "default",
    passes: str | Iterable[str] | None = None,
    eval_data: Any = None,
    options: AnalysisConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: Callable[[str, int | None], Any] | None = None,
) -> AnalysisResult:
    """Analyze the quantization of ``model`` under ``config`` (+ float ``passes``) and fix it.

    ``evaluate``: ``fn(onnxruntime.InferenceSession) -> float | {name: float}`` or
    ``"module:function"``; module-level functions run in the worker processes, other callables
    in this process. ``eval_data``: held-out samples for the proxy. ``output_dir``: where the
    report, ``plan.json`` and the evaluation cache go (a rerun there is incremental).
    ``progress(stage, total)`` returns an object with ``update(n)`` and ``close()`` (a
    ``tqdm`` fits). Returns an :class:`AnalysisResult`.
    """
    import onnxq
    from onnxq.analysis import evaluate as ev
    from onnxq.analysis import sensitivity
    from onnxq.analysis._build import Builder
    from onnxq.analysis.fixes import FIXES, Algorithm, State, search
    from onnxq.analysis.quantizers import find_quantizers
    from onnxq.analysis.ranges import activation_ranges, weight_ranges
    from onnxq.analysis.sanity import check_sanity
    from onnxq.analysis.sweep import ResultCache, WorkerPool, defined_in_main, digest, run_sweep
    from onnxq.quant.sim import _as_config
    from onnxq.runtime import create_session

    options = options or AnalysisConfig()
    bar_factory = progress or (lambda stage, total: _NoBar())
    timing: dict[str, float] = {}
    t_start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timing[name] = round(now - clock, 3)
        clock = now

    # integer clips (Q → Min(int) → DQ, CLE's ReLU6 bounds) are not one Q/DQ pair, which the
    # per-quantizer views (bypass, lossless, sensitivity) are built on: analysis models keep
    # such clips in float, and the plan records it so `onnxq quantize --config plan.json`
    # builds the model that was measured
    qconfig = _as_config(config).replace(integer_clips=False)
    pass_list = _passes_tuple(passes)
    ev.resolve_evaluator(evaluate)  # an unimportable --eval fails here, not in every worker
    source = onnxq.load(model)
    batches = _materialize(calibration_data, source)
    if eval_data is not None:
        held = _materialize(eval_data, source)
        calib = batches
        holdout = 0
    else:
        holdout = options.holdout_batches
        if holdout is None:
            holdout = max(1, round(0.2 * len(batches))) if len(batches) >= 2 else 0
        if holdout >= len(batches):
            raise ConfigError(f"holding out {holdout} of {len(batches)} calibration batches leaves none")
        calib = batches[: len(batches) - holdout] if holdout else batches
        held = batches[len(batches) - holdout:] if holdout else batches
        if not holdout:
            log.warning("one calibration batch only: the proxy is measured on calibration data")
    proxy_batches = _take(held, options.proxy_samples)

    keep_dir = output_dir is not None
    out_root = Path(output_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="onnxq-analyze-"))
    work = out_root / ".work"
    work.mkdir(parents=True, exist_ok=True)
    cleanup: list[Callable[[], None]] = []
    try:
        builder = Builder(source, calib, progress=bar_factory)
        start = State(qconfig, pass_list)
        sim = builder.build(qconfig, pass_list)
        float_path = work / "float.onnx"
        qdq_path = work / "qdq.onnx"
        onnxq.save(sim.float_model, float_path, overwrite=True)
        onnxq.save(sim.model, qdq_path, overwrite=True)
        qmap = find_quantizers(sim.model, sim.float_model)
        quantizers = qmap.quantizers
        lap("build")

        # reference outputs of FP32 on the held-out samples
        ref_sess = create_session(sim.float_model, optimize=True)
        reference = [ref_sess.run(None, f) for f in proxy_batches]
        del ref_sess
        proxy_path = work / "proxy.npz"
        ev.save_proxy_data(str(proxy_path), proxy_batches, reference)
        metric = _Metric(options, evaluate is not None, reference[0] if reference else [])

        spec = ev.EvalSpec(str(float_path), str(qdq_path), str(proxy_path), evaluate,
                           options.metric, options.threads_per_worker)
        workers = options.workers or min(2, os.cpu_count() or 1)
        factory = ev.RunnerFactory(spec)
        if workers > 1 and callable(evaluate) and defined_in_main(evaluate):
            log.warning("the evaluation function is defined in __main__, which worker processes "
                        "cannot import: running in this process (move it to a module to run in "
                        "parallel)")
            workers = 1
        if workers > 1:
            reason = _picklable(factory)
            if reason:
                log.warning("the evaluation function cannot be sent to worker processes (%s): "
                            "running in this process (give a module-level function to run in "
                            "parallel)", reason)
                workers = 1
        local_spec = dataclasses.replace(spec, threads=None) if workers <= 1 else spec
        local = ev.Runner(local_spec) if workers <= 1 else None
        namespace = digest(float_path, qdq_path, proxy_path, ev.evaluator_id(evaluate),
                           options.metric, CACHE_VERSION)
        cache = ResultCache(out_root / ".cache", namespace) if options.cache else None

        pool = WorkerPool(factory, workers) if workers > 1 else None
        cleanup.append(pool.close if pool is not None else lambda: None)

        def sweep(stage: str, jobs: list[tuple[str, dict]]) -> dict[str, dict]:
            bar = bar_factory(stage, len(jobs))
            try:
                return run_sweep(factory, jobs, workers=workers, cache=cache,
                                 progress=bar.update, local_runner=local, pool=pool)
            finally:
                bar.close()

        # 1. sanity
        sanity = check_sanity(sim.model, sim.float_model, _take(calib, options.sanity_samples),
                              encodings=sim.encodings)
        lap("sanity")

        # 2. headline evaluations
        measure = ["proxy", "eval"]
        w_ids = [q.id for q in quantizers if q.kind != "activation"]  # weights and constants
        a_ids = [q.id for q in quantizers if q.kind == "activation"]
        heads = sweep("evaluating", [
            ("fp32", {"float": True, "measure": measure}),
            ("quantized", {"bypass": [], "measure": measure}),
            ("weights_only", {"bypass": a_ids, "measure": measure}),
            ("activations_only", {"bypass": w_ids, "measure": measure}),
        ])
        fp32 = metric.of(heads["fp32"])
        if fp32 is None:
            raise ConfigError(f"the FP32 model could not be evaluated: {heads['fp32'].get('error')}")
        lap("headline")

        # 3. sensitivity
        sweep_measure = ["eval"] if options.sweep_metric == "eval" and evaluate is not None else ["proxy"]
        jobs = sensitivity.sweep_jobs(qmap, options.sweeps, sweep_measure)
        sweep_results = sweep("sensitivity", jobs)
        lap("sensitivity_sweep")
        bar = bar_factory("layer SQNR", None)
        layers = sensitivity.layer_errors(sim.float_model, sim.model, qmap, calib,
                                          max_samples=options.layer_samples, progress=bar.update)
        bar.close()
        lap("layer_sqnr")
        rows = []
        for q in quantizers:
            rows.append({
                "id": q.id,
                "enabled": _strip(sweep_results.get(f"enabled:{q.id}")),
                "disabled": _strip(sweep_results.get(f"disabled:{q.id}")),
                "layer": layers.get(q.id),
            })
        ranking = sensitivity.rank(rows, use_eval=sweep_measure == ["eval"],
                                   higher_is_better=metric.higher_is_better)
        order = {qid: i for i, qid in enumerate(ranking)}

        # 4. ranges
        after_cle = None
        if "cle" in options.fixes and "cle" not in pass_list and "dfq" not in pass_list:
            try:
                after_cle = builder.float_model(_with_cle(pass_list))
            except Exception as exc:  # noqa: BLE001 - the ranges section then shows no CLE
                log.warning("CLE could not run on this model: %s", exc)
        w_ranges = weight_ranges(quantizers, sim.float_model, after_cle)
        observers = builder.observers(pass_list, [q.tensor for q in quantizers if q.kind == "activation"])
        a_ranges = activation_ranges(quantizers, observers)
        lap("ranges")

        # 5. fixes
        ranked_q = sorted(quantizers, key=lambda q: order[q.id])
        scores_cache: dict[str, tuple[tuple[float, float | None] | None, str]] = {}

        def build_state(state: State):
            sim_s = builder.build(state.config, state.passes)
            for name, _ in state.algorithms:
                fix = FIXES[name]
                assert isinstance(fix, Algorithm)
                sim_s = fix.apply(sim_s, calib)
            return sim_s

        def evaluate_states(states: list[State]) -> list[tuple[tuple[float, float | None] | None, str]]:
            """Build each state (here), evaluate them all (workers); cached by model bytes."""
            jobs: list[tuple[str, dict]] = []
            job_state: dict[str, list[str]] = {}
            keys, errors, files = [], {}, []
            for state in states:
                skey = digest(state.key())
                keys.append(skey)
                if skey in scores_cache:
                    continue
                try:
                    sim_s = build_state(state)
                except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built fails alone
                    lines = str(exc).splitlines()
                    errors[skey] = f"{type(exc).__name__}: {lines[0] if lines else ''}"
                    log.info("candidate %s could not be built: %s", state.changes[-1:], errors[skey])
                    continue
                path = work / f"trial-{skey[:16]}.onnx"
                onnxq.save(sim_s.model, path, overwrite=True)
                files.append(path)
                job_key = f"model:{digest(path)}"
                if job_key not in job_state:  # two candidates may build the same model
                    jobs.append((job_key, {"model": str(path), "measure": measure}))
                job_state.setdefault(job_key, []).append(skey)
            results = sweep("trying fixes", jobs) if jobs else {}
            for job_key, skeys in job_state.items():
                res = results.get(job_key)
                value = metric.of(res)
                sqnr = ((res or {}).get("proxy") or {}).get("sqnr_db")
                for skey in skeys:
                    scores_cache[skey] = ((value, sqnr) if value is not None else None,
                                          (res or {}).get("error", "") if value is None else "")
            for path in files:
                path.unlink(missing_ok=True)
            return [scores_cache.get(k, (None, errors.get(k, "not evaluated"))) for k in keys]

        q_score = metric.of(heads["quantized"])
        if q_score is None:
            raise ConfigError(f"the quantized model could not be evaluated: {heads['quantized'].get('error')}")
        q_sqnr = (heads["quantized"].get("proxy") or {}).get("sqnr_db")
        found = search(
            ranked_q, start, (q_score, q_sqnr), evaluate_states, lambda s: metric.met(s, fp32),
            higher_is_better=metric.higher_is_better, min_gain=options.min_gain,
            sqnr_gain_db=options.sqnr_gain_db, tolerance=metric.tolerance(),
            fixes=options.fixes, worst=options.worst, max_promotions=options.max_promotions,
        )
        lap("fixes")

        # 6. the plan, rebuilt the way a user rebuilds it
        plan = found.state
        final_sim = onnxq.quantize(source, calib, config=plan.config, passes=",".join(plan.passes))
        for name, _ in plan.algorithms:
            final_sim = FIXES[name].apply(final_sim, calib)  # type: ignore[attr-defined]
        plan_path = work / "plan.qdq.onnx"
        onnxq.save(final_sim.model, plan_path, overwrite=True)
        verify = sweep("verifying plan", [(f"model:{digest(plan_path)}",
                                           {"model": str(plan_path), "measure": measure})])
        plan_result = _strip(next(iter(verify.values())))
        plan_score = metric.of(plan_result)
        lap("plan")
    finally:
        for stop in cleanup:
            stop()
        if not keep_dir:
            shutil.rmtree(out_root, ignore_errors=True)
        else:
            for leftover in work.glob("trial-*.onnx"):
                leftover.unlink(missing_ok=True)

    timing["total"] = round(time.perf_counter() - t_start, 3)
    data = _assemble(
        options=options, metric=metric, qconfig=qconfig, pass_list=pass_list, sim=sim,
        quantizers=quantizers, sanity=sanity, heads=heads, rows=rows, ranking=ranking,
        w_ranges=w_ranges, a_ranges=a_ranges, found=found, plan_result=plan_result,
        plan_score=plan_score, fp32=fp32, timing=timing, calib=calib, held=proxy_batches,
        holdout=holdout, workers=workers, cache=cache, model=model,
        cle_ran=after_cle is not None,
    )
    result = AnalysisResult(data, plan.config, plan.passes, tuple(n for n, _ in plan.algorithms),
                            final_sim)
    if keep_dir:
        result.write(out_root, plots=options.plots > 0)
    return result


def _with_cle(passes: tuple[str, ...]) -> tuple[str, ...]:
    base = passes if "fold-bn" in passes else ("fold-bn",) + passes
    return base + ("cle",)


def _strip(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {k: v for k, v in result.items() if k not in ("cached",)}


def _fmt(value: float | None, name: str) -> str:
    if value is None:
        return "n/a"
    if name == "sqnr_db":
        return f"{value:.1f} dB"
    return f"{value:.4f}"


def _assemble(**k: Any) -> dict[str, Any]:
    """The JSON report (see ``report.py`` for how it is shown)."""
    metric: _Metric = k["metric"]
    fp32 = k["fp32"]
    heads = k["heads"]
    quantizers = k["quantizers"]
    by_id = {q.id: q for q in quantizers}
    w_ranges, a_ranges = k["w_ranges"], k["a_ranges"]
    found = k["found"]

    def head(name: str) -> dict[str, Any]:
        res = heads.get(name) or {}
        score = metric.of(res)
        return {"score": score, "drop": metric.drop(score, fp32), "proxy": res.get("proxy"),
                "eval": res.get("eval"), "error": res.get("error")}

    summary = {name: head(name) for name in ("fp32", "quantized", "weights_only", "activations_only")}
    summary["plan"] = {"score": k["plan_score"], "drop": metric.drop(k["plan_score"], fp32),
                       "proxy": (k["plan_result"] or {}).get("proxy"),
                       "eval": (k["plan_result"] or {}).get("eval"),
                       "search_score": found.score}
    rank_pos = {qid: i + 1 for i, qid in enumerate(k["ranking"])}
    graph_pos = {q.id: i for i, q in enumerate(quantizers)}
    sens = []
    for row in k["rows"]:
        q = by_id[row["id"]]
        entry = {"rank": rank_pos[q.id], "graph_index": graph_pos[q.id], **q.to_dict(),
                 "enabled_alone": row["enabled"], "disabled_alone": row["disabled"],
                 "layer": row["layer"]}
        if q.id in w_ranges:
            entry["spread"] = w_ranges[q.id]["spread"]
            entry["depthwise"] = w_ranges[q.id]["depthwise"]
        if q.id in a_ranges:
            entry["clipped"] = a_ranges[q.id]["clipped"]
        sens.append(entry)
    sens.sort(key=lambda e: e["rank"])
    plan_state = found.state
    data = {
        "version": ANALYSIS_VERSION,
        "model": str(k["model"]) if isinstance(k["model"], (str, os.PathLike)) else "<in memory>",
        "config": k["qconfig"].to_dict(),
        "passes": list(k["pass_list"]),
        "analysis": k["options"].to_dict(),
        "metric": {**metric.to_dict(), "target": metric.target(fp32)},
        "data": {"calibration_batches": len(k["calib"]),
                 "calibration_samples": sum(_samples(b) for b in k["calib"]),
                 "held_out_samples": sum(_samples(b) for b in k["held"]),
                 "held_out_from_calibration_batches": k["holdout"]},
        "workers": k["workers"],
        "cache": ({"hits": k["cache"].hits, "misses": k["cache"].misses} if k["cache"] else None),
        "summary": summary,
        "sanity": k["sanity"].to_dict(),
        "quantizers": len(quantizers),
        "sensitivity": sens,
        "weight_ranges": w_ranges,
        "activation_ranges": a_ranges,
        "cle_ran": k["cle_ran"],
        "plan": {
            "config": plan_state.config.to_dict(),
            "passes": list(plan_state.passes),
            "algorithms": [{"name": n, "options": dict(o)} for n, o in plan_state.algorithms],
            "changes": list(plan_state.changes),
            "high_precision": plan_state.promoted_ids(),
            "met": bool(k["plan_score"] is not None and metric.met(k["plan_score"], fp32)),
        },
        "trials": [t.to_dict() for t in found.trials],
        "skipped_fixes": found.skipped,
        "timing_s": k["timing"],
    }
    from onnxq.analysis.report import reproduce_passes

    data["plan"]["quantize_passes"] = reproduce_passes(data["plan"])
    data["diagnosis"] = diagnose(data)
    return data


def diagnose(data: Mapping[str, Any]) -> list[str]:
    """The analysis in plain words (a list of sentences)."""
    m = data["metric"]
    name = m["name"]
    s = data["summary"]
    words: list[str] = []
    san = data["sanity"]
    if san["ok"]:
        words.append(f"FP32 sanity passed: with every quantizer made lossless the QDQ model reproduces "
                     f"the float model exactly (max |Δ| = {san['max_abs_diff']:.3g}).")
    else:
        where = (f"{len(san['problems'])} quantizer(s) have inconsistent parameters, first "
                 f"{san['problems'][0]['quantizer']}" if san["problems"] else
                 "no quantizer has inconsistent parameters (an op the layout folded computes "
                 "differently)")
        words.append(f"FP32 sanity FAILED: the lossless QDQ model differs from the float model by "
                     f"{san['max_abs_diff']:.3g} ({san['max_rel_diff']:.3g} of the output range); "
                     f"{where}. Fix the QDQ model before reading the rest.")

    def d(key: str) -> str:
        drop = s[key]["drop"]
        if drop is None:
            return _fmt(s[key]["score"], name)
        unit = "pt" if name != "sqnr_db" else ""
        return f"{_fmt(s[key]['score'], name)} ({0.0 - drop * 100 + 0.0:+.1f} {unit})".replace(" )", ")")

    words.append(f"{m['name']} ({m['source']}): FP32 {_fmt(s['fp32']['score'], name)}, quantized "
                 f"{d('quantized')}, weights only {d('weights_only')}, activations only "
                 f"{d('activations_only')}.")
    wd, ad = s["weights_only"]["drop"], s["activations_only"]["drop"]
    if wd is None or ad is None:
        wd = -(s["weights_only"]["proxy"] or {}).get("sqnr_db", 0.0)
        ad = -(s["activations_only"]["proxy"] or {}).get("sqnr_db", 0.0)
    qd = s["quantized"]["drop"]
    if qd is not None and abs(qd) < 1e-12:
        words.append("Quantization costs nothing measurable in this metric.")
    elif wd is not None and ad is not None:
        if wd > 2 * max(ad, 1e-9) and wd > 0:
            words.append("The drop comes from the weights: quantizing them alone costs most of it.")
        elif ad > 2 * max(wd, 1e-9) and ad > 0:
            words.append("The drop comes from the activations: quantizing them alone costs most of it.")
        else:
            words.append("Weights and activations both contribute to the drop.")
    top = data["sensitivity"][:5]
    if top:
        parts = []
        for e in top:
            if e["kind"] == "weight":
                what = (f"weights of {e['node']} ({'depthwise ' if e.get('depthwise') else ''}"
                        f"{e['op_type']}, channel-range spread {e.get('spread', float('nan')):.1f})")
            elif e["kind"] == "constant":
                what = f"constant {e['tensor']} of {e['node']} ({e['op_type']})"
            else:
                what = (f"activation {e['tensor']} ({e['op_type']} output, "
                        f"{100 * e.get('clipped', 0.0):.2f}% clipped)")
            alone = (e.get("enabled_alone") or {}).get("proxy", {}).get("sqnr_db")
            if alone is not None:
                what += f", {alone:.1f} dB output SQNR alone"
            parts.append(what)
        words.append("The quantizers that cost the most, worst first: " + "; ".join(parts) + ".")
        weights_top = [e for e in data["sensitivity"][:10] if e["kind"] == "weight"]
        wide = [e for e in weights_top if e.get("spread", 0) > 10]
        if wide:
            dw = sum(1 for e in wide if e.get("depthwise"))
            words.append(f"{len(wide)} of the 10 most sensitive quantizers are weights with a "
                         f"per-channel range spread above 10 ({dw} depthwise): per-tensor scales "
                         "leave their narrow channels few levels.")
    plan = data["plan"]
    ps = s["plan"]
    if plan["changes"]:
        words.append(f"The automatic fix reaches {d('plan')} against the target "
                     f"{_fmt(m['target'], name)} ({'met' if plan['met'] else 'NOT met'}) by: "
                     + "; ".join(plan["changes"]) + f". High-precision quantizers: "
                     f"{len(plan['high_precision'])}.")
    elif plan["met"]:
        words.append("The quantized model already meets the target: nothing to change.")
    else:
        words.append("No candidate fix improved the metric; the target is not met.")
    if ps.get("search_score") is not None and ps.get("score") is not None and \
            abs(ps["search_score"] - ps["score"]) > 1e-9:
        words.append(f"Note: rebuilt with onnxq.quantize the plan scores {_fmt(ps['score'], name)} "
                     f"where the search measured {_fmt(ps['search_score'], name)}.")
    return words
