"""Step 3 of an analysis: which quantizers cost accuracy.

Two sweeps over the quantizers of the QDQ model, each variant cut from it by bypassing Q/DQ pairs
(no recalibration, so every variant keeps the encodings of the full model):

* **enabled alone**: only quantizer *i* is on. Its output SQNR against FP32 measures the noise
  *i* adds by itself; if the noise of independent quantizers adds up,
  ``N_total ≈ Σ N_i`` with ``N_i = P · 10^(−SQNR_i / 10)``;
* **disabled alone**: every quantizer but *i* is on. The gain over the full model measures what
  removing *i* buys in the presence of all the others (interactions included).

Quantizers are ranked by the noise they add alone (the lowest "enabled alone" SQNR first; with
the user's metric instead of the proxy, the largest drop first), ties broken by the "disabled
alone" gain.

:func:`layer_errors` measures, in one pass of each model over calibration samples, every layer's
output in the float model against the same tensor in the QDQ model: SQNR and MSE of the
quantized model's *accumulated* error at that point (what the next layer receives, i.e. the
dequantized activation, or the layer's raw output inside a fusion supergroup).
"""

from __future__ import annotations

__all__ = ["layer_errors", "rank", "sensitivity_sweep", "sweep_jobs"]

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.analysis.quantizers import QuantizerMap

log = logging.getLogger(__name__)


def sweep_jobs(qmap: QuantizerMap, modes: Sequence[str], measure: Sequence[str]) -> list[tuple[str, dict]]:
    """Jobs for :func:`~onnxq.analysis.sweep.run_sweep`: ``("enabled:<id>", payload)`` etc."""
    ids = [q.id for q in qmap.quantizers]
    jobs = []
    for mode in modes:
        for qid in ids:
            others = [i for i in ids if i != qid] if mode == "enabled" else [qid]
            jobs.append((f"{mode}:{qid}", {"bypass": others, "measure": list(measure)}))
    return jobs


def _split(feeds: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    arrays = {k: np.asarray(v) for k, v in feeds.items()}
    leading = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if len(leading) != 1 or None in leading:
        return [arrays]
    n = leading.pop()
    return [{k: a[i : i + size] for k, a in arrays.items()} for i in range(0, n, size)]


def _exposed(model: ir.Model, names: Sequence[str]) -> tuple[ir.Model, list[str]]:
    work = model.clone()
    values = {v.name: v for v in work.graph.inputs}
    for node in work.graph:
        for out in node.outputs:
            values[out.name] = out
    found = [n for n in names if n in values and not values[n].is_graph_input()]
    work.graph.outputs.clear()
    work.graph.outputs.extend(values[n] for n in found)
    return work, found


def layer_errors(
    float_model: ir.Model,
    qdq: ir.Model,
    qmap: QuantizerMap,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    max_samples: int = 32,
    chunk: int = 8,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """``{quantizer id: {"sqnr_db", "mse", "tensor"}}``: float vs quantized model at each layer.

    Activation quantizer: the float tensor against its dequantized value. Weight quantizer: the
    layer's output in both models. Samples: the first ``max_samples`` of ``batches``, run
    ``chunk`` at a time (memory: one chunk of every exposed tensor).
    """
    from onnxq.runtime import create_session

    pairs: dict[str, tuple[str, str]] = {}
    for q in qmap.quantizers:
        if q.kind == "activation":
            pair = qmap.acts[q.id]
            base = next((v for v in pair.views if v.value == q.tensor), pair.views[0])
            pairs[q.id] = (base.value, base.dq.outputs[0].name)
        else:
            site = qmap.weights[q.id]
            out = site.layer.outputs[0].name
            pairs[q.id] = (out, out)
    f_model, f_found = _exposed(float_model, sorted({f for f, _ in pairs.values()}))
    q_model, q_found = _exposed(qdq, sorted({d for _, d in pairs.values()}))
    f_sess = create_session(f_model, optimize=True)
    q_sess = create_session(q_model, optimize=True)
    acc = {qid: [0.0, 0.0, 0] for qid in pairs}
    seen = 0
    for feeds in batches:
        if seen >= max_samples:
            break
        for part in _split(feeds, chunk):
            if seen >= max_samples:
                break
            n = next(iter(part.values())).shape[0] if part else 0
            f_out = dict(zip(f_found, f_sess.run(f_found, part))) if f_found else {}
            q_out = dict(zip(q_found, q_sess.run(q_found, part))) if q_found else {}
            for qid, (fname, qname) in pairs.items():
                ref = part.get(fname) if fname not in f_out else f_out[fname]
                got = q_out.get(qname)
                if ref is None or got is None or ref.shape != got.shape:
                    continue
                ref64 = ref.astype(np.float64)
                err = got.astype(np.float64) - ref64
                acc[qid][0] += float(np.sum(ref64 * ref64))
                acc[qid][1] += float(np.sum(err * err))
                acc[qid][2] += ref.size
            seen += n
            if progress is not None:
                progress(1)
    out: dict[str, dict[str, float]] = {}
    for qid, (signal, noise, count) in acc.items():
        if count == 0:
            continue
        sqnr = 10 * np.log10(signal / noise) if noise > 0 else 200.0
        out[qid] = {"sqnr_db": float(min(sqnr, 200.0)), "mse": noise / count,
                    "tensor": pairs[qid][0]}
    return out


def _noise(sqnr_db: float | None) -> float:
    return 0.0 if sqnr_db is None else 10.0 ** (-sqnr_db / 10.0)


def rank(rows: Sequence[Mapping[str, Any]], use_eval: bool, higher_is_better: bool = True) -> list[str]:
    """Quantizer ids, most harmful first (see the module docstring).

    ``rows``: ``{"id", "enabled": {...}, "disabled": {...}}`` with ``proxy``/``eval`` results.
    """
    sign = 1.0 if higher_is_better else -1.0

    def key(row: Mapping[str, Any]) -> tuple[float, float]:
        en, dis = row.get("enabled") or {}, row.get("disabled") or {}
        if use_eval and "eval" in en:
            alone = -sign * en["eval"]["score"]  # lower score = more harmful
            gain = sign * dis.get("eval", {}).get("score", 0.0)
            return (-alone, -gain)
        alone = _noise(en.get("proxy", {}).get("sqnr_db"))
        gain = -_noise(dis.get("proxy", {}).get("sqnr_db"))
        return (-alone, -gain)

    return [row["id"] for row in sorted(rows, key=key)]


def sensitivity_sweep(
    qdq: ir.Model,
    float_model: ir.Model,
    data: Sequence[Mapping[str, np.ndarray]],
    *,
    modes: Sequence[str] = ("enabled", "disabled"),
    workers: int = 1,
    cache_dir: str | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[dict[str, Any]]:
    """Both sweeps on a given QDQ model (e.g. one from another tool); rows ranked worst first.

    ``data``: held-out batches; the proxy (output SQNR against ``float_model``) is measured on
    them. Each row: ``{"id", "quantizer", "enabled": {"proxy": …}, "disabled": {"proxy": …}}``.
    """
    import tempfile
    from pathlib import Path

    import onnxq
    from onnxq.analysis.evaluate import EvalSpec, Runner, RunnerFactory, save_proxy_data
    from onnxq.analysis.quantizers import find_quantizers
    from onnxq.analysis.sweep import ResultCache, digest, run_sweep
    from onnxq.runtime import create_session

    qmap = find_quantizers(qdq, float_model)
    with tempfile.TemporaryDirectory(prefix="onnxq-sweep-") as tmp:
        f_path, q_path, p_path = Path(tmp, "float.onnx"), Path(tmp, "qdq.onnx"), Path(tmp, "proxy.npz")
        onnxq.save(float_model, f_path)
        onnxq.save(qdq, q_path)
        ref = create_session(float_model, optimize=True)
        save_proxy_data(str(p_path), data, [ref.run(None, dict(b)) for b in data])
        spec = EvalSpec(str(f_path), str(q_path), str(p_path))
        cache = ResultCache(cache_dir, digest(f_path, q_path, p_path)) if cache_dir else None
        results = run_sweep(RunnerFactory(spec), sweep_jobs(qmap, modes, ["proxy"]), workers=workers,
                            cache=cache, progress=progress,
                            local_runner=Runner(spec) if workers <= 1 else None)
    rows = [{"id": q.id, "quantizer": q.to_dict(), "enabled": results.get(f"enabled:{q.id}"),
             "disabled": results.get(f"disabled:{q.id}")} for q in qmap.quantizers]
    order = {qid: i for i, qid in enumerate(rank(rows, use_eval=False))}
    return sorted(rows, key=lambda r: order[r["id"]])
