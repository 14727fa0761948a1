"""Greedy per-layer ratio selection (AIMET's greedy compression-ratio selection) over a sweep.

**Sweep.** For each candidate layer ``l`` and each ratio ``ρ`` in the candidate list (e.g.
0.1 … 0.9; ``ρ`` = the fraction of the layer's MACs kept for SVD, of its input channels kept for
channel pruning), the model is compressed at that layer only and scored: ``s(l, ρ)`` is the
user's evaluation function (a callable taking an onnxruntime session) or the label-free proxy
against the uncompressed model on held-out samples (the output SQNR in dB,
:mod:`onnxq.analysis.evaluate`; argmax agreement is recorded too). The job also measures the compressed model's
MACs ``m(l, ρ)``. One job is one layer with all its ratios (channel pruning captures the layer's
samples once per job); jobs run in worker processes through :mod:`onnxq.analysis.sweep`, with
one JSON file per finished job in a disk cache, so an interrupted or repeated sweep resumes. With
``ray`` (an address or ``"auto"``), the jobs run as Ray tasks on that cluster instead.

**Selection.** With the model's MACs ``M`` and the saving ``Δ(l, ρ) = M − m(l, ρ)`` (assumed
additive across layers), an accuracy threshold ``τ`` picks, per layer, the smallest ratio whose
score is at least ``τ`` (ratio 1, i.e. untouched, when none is)::

    ρ_l(τ) = min {ρ : s(l, ρ) ≥ τ},     M(τ) = M − Σ_l Δ(l, ρ_l(τ))

``M(τ)`` falls as ``τ`` falls; the selection takes the **highest** ``τ`` (over the measured
scores) with ``M(τ) ≤ C·M``: the target is reached with the least predicted loss, layers that
are cheap to compress being compressed most. When no ``τ`` reaches the target, the floor
``min_score`` (if given) bounds how far it goes, else every layer takes its smallest ratio.
Scores where lower is better (an error rate) are negated internally.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_RATIOS",
    "TECHNIQUES",
    "CompressRunner",
    "RayPool",
    "Selection",
    "SweepSpec",
    "candidate_layers",
    "choose_ratios",
    "run_ratio_sweep",
]

import dataclasses
import fnmatch
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: technique names used in schemes ("ssvd+cp"), with their long forms
TECHNIQUES = {"ssvd": "spatial-svd", "wsvd": "weight-svd", "cp": "channel-pruning"}


# ---- candidates ---------------------------------------------------------------------------------
def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in exclude)


def candidate_layers(model: ir.Model, technique: str, exclude: Sequence[str] = ()) -> tuple[list[str], list[tuple[str, str]]]:
    """(layers the technique can compress, [(layer, why not)]) in topological order."""
    from onnxq.compress.channel_pruning import _Blocked, plan_channels
    from onnxq.compress.macs import value_shapes
    from onnxq.passes._graph import weight_problem
    from onnxq.passes._layers import as_layer

    shapes = value_shapes(model) if technique == "cp" else {}
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or ""
        if not name:
            continue
        if _excluded(name, exclude):
            skipped.append((name, "excluded by name"))
            continue
        layer = as_layer(node)
        if isinstance(layer, str):
            continue  # activation × activation MatMul etc.: not a weight layer
        problem = weight_problem(layer.weight, [node])
        if problem is None:
            if technique in ("ssvd", "cp") and node.op_type != "Conv":
                problem = f"{node.op_type} (a {TECHNIQUES[technique]} applies to Convs)"
            elif layer.groups != 1:
                problem = f"grouped Conv (group={layer.groups})"
            elif technique == "ssvd":
                shape = layer.weight.const_value.shape
                if len(shape) != 4 or shape[2] == 1 or shape[3] == 1:
                    problem = f"kernel {tuple(shape[2:])} has nothing to split spatially"
            elif technique == "cp":
                try:
                    plan_channels(node, shapes)
                except _Blocked as exc:
                    problem = str(exc)
        if problem:
            skipped.append((name, problem))
        else:
            names.append(name)
    return names, skipped


def make_pass(technique: str, ratios: Mapping[str, float], *, data: Any = None,
              samples: Mapping[str, Any] | None = None, reference: ir.Model | None = None,
              method: str = "greedy", rows: int = 4096, seed: int = 0, multiple: int = 1):
    """The pass of ``technique`` compressing the named layers at the given ratios."""
    if technique == "ssvd":
        from onnxq.compress.spatial_svd import SpatialSVD

        return SpatialSVD(ratios=ratios)
    if technique == "wsvd":
        from onnxq.compress.weight_svd import WeightSVD

        return WeightSVD(ratios=ratios)
    if technique == "cp":
        from onnxq.compress.channel_pruning import ChannelPruning

        return ChannelPruning(ratios=ratios, data=data, samples=samples, reference=reference,
                              method=method, rows=rows, seed=seed, max_samples=None, multiple=multiple)
    raise ConfigError(f"unknown compression technique '{technique}' (known: {', '.join(TECHNIQUES)})")


# ---- the worker ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Everything a worker needs (picklable)."""

    model_path: str
    technique: str
    #: .npz of the calibration batches (channel pruning's samples), written by :func:`save_batches`
    calib_path: str | None
    #: .npz of held-out feeds and reference outputs (:func:`onnxq.analysis.evaluate.save_proxy_data`)
    proxy_path: str
    evaluator: Any = None
    metric: str | None = None
    method: str = "greedy"
    rows: int = 4096
    seed: int = 0
    threads: int | None = None
    channel_multiple: int = 1


def save_batches(path: str, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
    arrays = {f"{b}/{name}": np.asarray(arr) for b, feeds in enumerate(batches) for name, arr in feeds.items()}
    np.savez(path, **arrays)


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            b, name = key.split("/", 1)
            out.setdefault(int(b), {})[name] = data[key]
    return [out[b] for b in sorted(out)]


def proxy_score(metrics: Mapping[str, float]) -> float:
    """The proxy's score: the output SQNR (dB) against the uncompressed model.

    Argmax agreement is kept in the metrics but not used to choose: on the few dozen held-out
    samples a sweep can afford it moves in steps of 1/n and saturates at 1 for most single-layer
    changes (measured on EfficientNet-Lite0 with 16 samples: layers scored 1.0 lost 23 % of the
    agreement on 96 others), while the SQNR is continuous.
    """
    return float(metrics["sqnr_db"])


class CompressRunner:
    """A worker's job runner: ``{"layer": name, "ratios": [...]}`` → the layer's score curve;
    ``{"baseline": True}`` → the uncompressed model's score and MACs."""

    def __init__(self, spec: SweepSpec) -> None:
        import onnxq
        from onnxq.analysis.evaluate import load_proxy_data, resolve_evaluator

        self.spec = spec
        self.model = onnxq.load(spec.model_path)
        self.feeds, self.refs = load_proxy_data(spec.proxy_path)
        self.batches = load_batches(spec.calib_path) if spec.calib_path else None
        self.evaluate = resolve_evaluator(spec.evaluator)

    def score(self, model: ir.Model) -> tuple[float, dict[str, float]]:
        from onnxq.analysis.evaluate import proxy_metrics, score_of
        from onnxq.runtime.session import create_session

        session = create_session(model, optimize=True, threads=self.spec.threads)
        outs = [session.run(None, f) for f in self.feeds]
        metrics = proxy_metrics(outs, self.refs)
        if self.evaluate is not None:
            score, user = score_of(self.evaluate(session), self.spec.metric)
            return score, {**user, **{f"proxy_{k}": v for k, v in metrics.items()}}
        return proxy_score(metrics), metrics

    def __call__(self, payload: Mapping[str, Any]) -> dict:
        from onnxq.compress.macs import count_macs
        from onnxq.passes.cleanup import Cleanup

        if payload.get("baseline"):
            score, metrics = self.score(self.model)
            cost = count_macs(self.model)
            return {"score": score, "metrics": metrics, "macs": cost.macs, "params": cost.params}
        name, technique = payload["layer"], self.spec.technique
        samples = None
        if technique == "cp":
            from onnxq.compress.channel_pruning import ChannelPruning, capture_samples
            from onnxq.passes._layers import as_layer

            node = next(n for n in self.model.graph if n.name == name)
            layer = as_layer(node)
            rows = ChannelPruning(rows=self.spec.rows)._rows(layer)
            samples = capture_samples(self.model, self.model, [name], self.batches, rows, self.spec.seed)
        curve = []
        done: dict[Any, dict] = {}
        for ratio in payload["ratios"]:
            if technique == "cp":  # ratios that round to the same channel count: one evaluation
                from onnxq.compress.channel_pruning import kept_count

                key = kept_count(None, ratio, layer.in_channels, self.spec.channel_multiple)
                if key in done:
                    curve.append({**done[key], "ratio": ratio})
                    continue
            work = self.model.clone()
            compress = make_pass(technique, {name: ratio}, samples=samples, data=self.batches,
                                 method=self.spec.method, rows=self.spec.rows, seed=self.spec.seed,
                                 multiple=self.spec.channel_multiple)
            compress(work)
            if not compress.report.changed:
                reason = compress.report.skipped[0][1] if compress.report.skipped else "not compressed"
                curve.append({"ratio": ratio, "skipped": reason})
                if technique == "cp":
                    done[key] = curve[-1]
                continue
            Cleanup()(work)
            score, metrics = self.score(work)
            cost = count_macs(work)
            curve.append({"ratio": ratio, "score": score, "metrics": metrics, "macs": cost.macs,
                          "params": cost.params})
            if technique == "cp":
                done[key] = curve[-1]
        return {"layer": name, "curve": curve}


@dataclasses.dataclass(frozen=True)
class RunnerFactory:
    spec: SweepSpec

    def __call__(self) -> CompressRunner:
        return CompressRunner(self.spec)


# ---- Ray ----------------------------------------------------------------------------------------
class RayPool:
    """Runs sweep jobs as Ray tasks (the same ``run(jobs)`` interface as
    :class:`onnxq.analysis.sweep.WorkerPool`). ``address``: ``"auto"``, ``"local"`` (start a
    local instance) or a cluster address. Ray is imported only here (``pip install onnxq[ray]``)."""

    def __init__(self, factory: Callable[[], Callable[[Any], dict]], address: str = "auto",
                 workers: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs Ray: pip install 'onnxq[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        self.factory = factory
        self.workers = int(workers or max(1, int(ray.available_resources().get("CPU", 1))))
        self._task = ray.remote(_ray_job)

    def run(self, jobs: Sequence[tuple[str, Any]]):
        ray = self._ray
        factory = ray.put(self.factory)
        pending = {self._task.remote(factory, key, payload): key for key, payload in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                yield ray.get(ref)

    def close(self) -> None:
        pass


_RAY_RUNNERS: dict[int, Callable[[Any], dict]] = {}


def _ray_job(factory: Callable[[], Callable[[Any], dict]], key: str, payload: Any) -> tuple[str, dict, float]:
    from onnxq.analysis.sweep import _call

    runner = _RAY_RUNNERS.get(hash(factory))
    if runner is None:
        runner = _RAY_RUNNERS[hash(factory)] = factory()
    return _call(runner, key, payload)


# ---- the sweep ----------------------------------------------------------------------------------
def run_ratio_sweep(spec: SweepSpec, layers: Sequence[str], ratios: Sequence[float], *,
                    workers: int = 1, cache_dir: str | None = None, namespace: str = "",
                    progress: Callable[[int], Any] | None = None, ray: str | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """(baseline result, {layer: curve}) for every layer × ratio (see the module docstring)."""
    from onnxq.analysis.sweep import ResultCache, digest, run_sweep

    ratio_list = [float(r) for r in ratios]
    jobs: list[tuple[str, Any]] = [("baseline", {"baseline": True})]
    jobs += [(f"{spec.technique}/{name}/{digest(ratio_list)[:12]}", {"layer": name, "ratios": ratio_list})
             for name in layers]
    cache = ResultCache(cache_dir, namespace) if cache_dir else None
    factory = RunnerFactory(spec)
    pool = None
    if ray:
        pool = RayPool(factory, ray, workers or None)
        workers = max(2, pool.workers)
    try:
        results = run_sweep(factory, jobs, workers=workers, cache=cache, progress=progress, pool=pool)
    finally:
        if pool is not None:
            pool.close()
    baseline = results.get("baseline", {})
    if "error" in baseline or "score" not in baseline:
        raise RuntimeError(f"the uncompressed model could not be scored: {baseline.get('error')}")
    curves = {}
    for key, payload in jobs[1:]:
        result = results.get(key, {})
        if "error" in result:
            log.warning("%s: sweep job failed: %s", payload["layer"], result["error"])
            continue
        curves[payload["layer"]] = result.get("curve", [])
    return baseline, curves


# ---- selection ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Selection:
    ratios: dict[str, float]
    predicted_macs: int
    threshold: float
    reached: bool


def choose_ratios(curves: Mapping[str, Sequence[Mapping[str, Any]]], total_macs: int,
                  target_macs: float, *, higher_is_better: bool = True,
                  min_score: float | None = None, baseline: float | None = None) -> Selection:
    """Per-layer ratios reaching ``target_macs`` (absolute MACs) with the highest threshold.

    After the threshold, ratios are relaxed one step at a time (the step that gains the most
    score, then the one that costs the fewest MACs) while the prediction stays within the
    target: a threshold met by many layers at once (saturated scores) does not overshoot.
    ``baseline``: the uncompressed score (the score of leaving a layer untouched).
    """
    sign = 1.0 if higher_is_better else -1.0
    options: dict[str, list[tuple[float, float, int]]] = {}  # layer -> [(ratio, score, saving)]
    for layer, curve in curves.items():
        pts = [(float(p["ratio"]), sign * float(p["score"]), int(total_macs - p["macs"]))
               for p in curve if "score" in p and np.isfinite(p["score"]) and p["macs"] < total_macs]
        if pts:
            options[layer] = sorted(pts)
    top = sign * float(baseline) if baseline is not None else max(
        (s for pts in options.values() for _, s, _ in pts), default=0.0)

    def pick(tau: float) -> dict[str, int]:
        chosen = {}
        for layer, pts in options.items():
            for i, (_, score, _) in enumerate(pts):  # ascending ratio: the smallest that passes
                if score >= tau:
                    chosen[layer] = i
                    break
        return chosen

    def macs_of(chosen: Mapping[str, int]) -> int:
        return total_macs - sum(options[layer][i][2] for layer, i in chosen.items())

    floor = None if min_score is None else sign * float(min_score)
    thresholds = sorted({s for pts in options.values() for _, s, _ in pts}, reverse=True)
    found: tuple[dict[str, int], float] | None = None
    for tau in thresholds:
        if floor is not None and tau < floor:
            break
        chosen = pick(tau)
        if macs_of(chosen) <= target_macs:
            found = (chosen, tau)
            break
    if found is None:
        tau = floor if floor is not None else -math.inf
        chosen = pick(tau)
        macs = macs_of(chosen)
        ratios = {layer: options[layer][i][0] for layer, i in chosen.items()}
        return Selection(ratios, macs, sign * tau if math.isfinite(tau) else float("nan"), macs <= target_macs)
    chosen, tau = found
    while True:  # relax while the target still holds
        macs = macs_of(chosen)
        best = None
        for layer, i in chosen.items():
            pts = options[layer]
            score_now, saving_now = pts[i][1], pts[i][2]
            score_next, saving_next = (pts[i + 1][1], pts[i + 1][2]) if i + 1 < len(pts) else (top, 0)
            if macs + saving_now - saving_next > target_macs:
                continue
            key = (score_next - score_now, -(saving_now - saving_next))
            if best is None or key > best[0]:
                best = (key, layer)
        if best is None:
            break
        layer = best[1]
        if chosen[layer] + 1 < len(options[layer]):
            chosen[layer] += 1
        else:
            del chosen[layer]
    ratios = {layer: options[layer][i][0] for layer, i in chosen.items()}
    return Selection(ratios, macs_of(chosen), sign * tau, True)
