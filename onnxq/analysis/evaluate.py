"""What "accuracy" means in an analysis, and the worker that measures it on model variants.

Two kinds of measurement, both on an onnxruntime session of the model (graph optimizations on,
as a deployed QDQ model runs, so Q/DQ pairs fuse into integer kernels):

* the **user's evaluation**: a callable ``evaluate(session) -> float | {name: float}`` (on the
  command line ``module:function``) that receives an ``onnxruntime.InferenceSession`` and returns
  the metric (top-1, CER, …); with a dict, ``AnalysisConfig.metric`` names the key;
* the built-in **proxy**, label-free, against the FP32 model's outputs on held-out samples:
  ``sqnr_db = 10·log10(Σ y² / Σ (ŷ − y)²)`` pooled over every output and sample (the output
  signal-to-quantization-noise ratio), ``mse``, and ``agreement`` = the fraction of argmaxes over
  the last axis of the first output that equal FP32's (meaningful for class scores, including
  per-position scores such as a CTC recognizer's).

:class:`Runner` is what each worker process of a sweep builds once (from a picklable
:class:`EvalSpec`): it loads the float and QDQ models from files, cuts variants with
:func:`~onnxq.analysis.quantizers.bypass`, and opens its own session per variant.
"""

from __future__ import annotations

__all__ = ["EvalSpec", "Runner", "evaluator_id", "proxy_metrics", "resolve_evaluator"]

import dataclasses
import importlib
import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from onnxq.errors import ConfigError

log = logging.getLogger(__name__)

Evaluator = Callable[[Any], "float | Mapping[str, float]"]


def resolve_evaluator(spec: str | Evaluator | None) -> Evaluator | None:
    """A callable from ``module:function`` (importable, or in the current directory) or
    ``path/to/file.py:function``; a callable ``spec`` is returned as it is."""
    if spec is None or callable(spec):
        return spec
    module_name, sep, func_name = str(spec).rpartition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"evaluation function '{spec}' must be given as module:function")
    try:
        if module_name.endswith(".py"):
            from pathlib import Path

            path = Path(module_name)
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            import os
            import sys

            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())  # as `python -m` would; workers inherit sys.path
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"cannot import '{module_name}' for --eval ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"'{module_name}' has no function '{func_name}'")
    return fn


def evaluator_id(spec: str | Evaluator | None) -> str:
    """A stable name for cache keys: ``module:qualname`` of the evaluator (``proxy`` if none)."""
    if spec is None:
        return "proxy"
    if isinstance(spec, str):
        return spec
    module = getattr(spec, "__module__", "?")
    name = getattr(spec, "__qualname__", type(spec).__qualname__)
    return f"{module}:{name}"


def proxy_metrics(outputs: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
    """Output SQNR (dB), MSE and argmax agreement of ``outputs`` against ``reference``.

    Both are lists (one per batch) of lists of output arrays.
    """
    signal = noise = 0.0
    count = 0
    agree = total = 0
    for outs, refs in zip(outputs, reference):
        for i, (y_hat, y) in enumerate(zip(outs, refs)):
            if y.dtype.kind != "f":
                continue
            y64, d = y.astype(np.float64), y_hat.astype(np.float64) - y.astype(np.float64)
            signal += float(np.sum(y64 * y64))
            noise += float(np.sum(d * d))
            count += y.size
            if i == 0 and y.ndim >= 2 and y.shape[-1] >= 2:
                agree += int(np.sum(np.argmax(y_hat, -1) == np.argmax(y, -1)))
                total += int(np.prod(y.shape[:-1]))
    sqnr = 10.0 * np.log10(signal / noise) if noise > 0 else float("inf")
    out = {"sqnr_db": float(min(sqnr, 200.0)), "mse": noise / max(count, 1)}
    if total:
        out["agreement"] = agree / total
    return out


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Everything a worker needs (picklable): model files, proxy data, the user's evaluator."""

    float_path: str
    qdq_path: str
    #: .npz written by :func:`save_proxy_data`: feeds and FP32 reference outputs per batch
    proxy_path: str | None
    evaluator: Any = None  # "module:function", a picklable callable, or None
    metric: str | None = None
    threads: int | None = None


def save_proxy_data(path: str, batches: Sequence[Mapping[str, np.ndarray]],
                    reference: Sequence[Sequence[np.ndarray]]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for b, (feeds, refs) in enumerate(zip(batches, reference)):
        for name, arr in feeds.items():
            arrays[f"feed/{b}/{name}"] = np.asarray(arr)
        for i, arr in enumerate(refs):
            arrays[f"ref/{b}/{i}"] = np.asarray(arr)
    np.savez(path, **arrays)


def load_proxy_data(path: str) -> tuple[list[dict[str, np.ndarray]], list[list[np.ndarray]]]:
    feeds: dict[int, dict[str, np.ndarray]] = {}
    refs: dict[int, dict[int, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            kind, b, name = key.split("/", 2)
            if kind == "feed":
                feeds.setdefault(int(b), {})[name] = data[key]
            else:
                refs.setdefault(int(b), {})[int(name)] = data[key]
    order = sorted(feeds)
    return [feeds[b] for b in order], [[refs[b][i] for i in sorted(refs[b])] for b in order]


def score_of(result: Any, metric: str | None) -> tuple[float, dict[str, float]]:
    """(the metric, all metrics) from what a user's evaluator returned."""
    if isinstance(result, Mapping):
        values = {str(k): float(v) for k, v in result.items() if np.isscalar(v)}
        if metric is None:
            if len(values) != 1:
                raise ConfigError(
                    f"the evaluation function returned {sorted(values)}: name the metric to use "
                    "(AnalysisConfig.metric, --metric)"
                )
            metric = next(iter(values))
        if metric not in values:
            raise ConfigError(f"the evaluation function returned no '{metric}' (got {sorted(values)})")
        return values[metric], values
    return float(result), {metric or "metric": float(result)}


class Runner:
    """A worker's evaluator of model variants; ``runner(payload) -> dict``.

    ``payload``: ``{"bypass": [quantizer ids]}`` (a variant of the QDQ model), ``{"model": path}``
    (any model file) or ``{"float": True}``; ``"measure"``: a subset of ``("proxy", "eval")``.
    Returns ``{"proxy": {...}, "eval": {"score": x, "metrics": {...}}}``.
    """

    def __init__(self, spec: EvalSpec) -> None:
        self.spec = spec
        self._float = None
        self._qdq = None
        self._proxy: tuple[list, list] | None = None
        self._evaluate = resolve_evaluator(spec.evaluator)

    def _models(self):
        if self._float is None:
            import onnxq

            self._float = onnxq.load(self.spec.float_path)
            self._qdq = onnxq.load(self.spec.qdq_path)
        return self._float, self._qdq

    def session(self, model: Any):
        from onnxq.runtime import create_session

        return create_session(model, optimize=True, threads=self.spec.threads)

    def model_for(self, payload: Mapping[str, Any]):
        import onnxq
        from onnxq.analysis.quantizers import bypass

        if "bypass" in payload:
            float_model, qdq = self._models()
            return bypass(qdq, float_model, payload["bypass"])
        if payload.get("float"):
            return self._models()[0]
        return onnxq.load(payload["model"])

    def __call__(self, payload: Mapping[str, Any]) -> dict:
        session = self.session(self.model_for(payload))
        measure = payload.get("measure", ("proxy", "eval"))
        out: dict[str, Any] = {}
        if "proxy" in measure and self.spec.proxy_path:
            if self._proxy is None:
                self._proxy = load_proxy_data(self.spec.proxy_path)
            feeds, refs = self._proxy
            outs = [session.run(None, f) for f in feeds]
            out["proxy"] = proxy_metrics(outs, refs)
        if "eval" in measure and self._evaluate is not None:
            score, metrics = score_of(self._evaluate(session), self.spec.metric)
            out["eval"] = {"score": score, "metrics": metrics}
        return out


@dataclasses.dataclass(frozen=True)
class RunnerFactory:
    """Picklable factory for :func:`~onnxq.analysis.sweep.run_sweep`."""

    spec: EvalSpec

    def __call__(self) -> Runner:
        return Runner(self.spec)
