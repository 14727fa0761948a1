"""Data-driven PTQ: nearest rounding vs AdaRound vs sequential MSE vs bias correction, side by side.

Same models, data and evaluation as ``benchmarks.quantize`` (EfficientNet-Lite0: calibration on
ImageNet-sample images 0..255 in 8 batches of 32, top-1 on images 256..499; PP-OCR rec: CER on
150 rendered lines, calibration on 150 others; MiniLM: WordNet R@1). Each row quantizes in a fresh
subprocess (``--one ROW``) so its wall time and peak memory (``VmHWM``) are its own; the parent
evaluates the QDQ model the child wrote. A row's time covers everything after loading the data:
float passes, calibration, the algorithms, and the final recalibration.

Rows (per model): W4A8 per-channel with nearest rounding, SeqMSE, AdaRound, SeqMSE + AdaRound,
empirical bias correction; EfficientNet-Lite0 and PP-OCR rec also W8A8 per-tensor with CLE
(``dfq`` passes) with and without bias correction (empirical, analytic from BN statistics,
measured input means). ``benchmarks/results/aimet_ref.json``
(AIMET-ONNX on the same data, written by ``benchmarks/aimet_ref.py`` in its own venv) is shown
beside them when present.

Run::

    python -m benchmarks.ptq [--models effnet-lite0-bn,ppocr-rec,minilm] [--rows SUBSTR]
                             [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.quantize import (
    METRIC, HIGHER_IS_BETTER, Evaluator, _commit, _environment, _status_bytes, asset_path,
    calibration_batches,
)

log = logging.getLogger("benchmarks.ptq")
RESULTS = Path(__file__).parent / "results"
MODELS = ("effnet-lite0-bn", "ppocr-rec", "minilm")


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    label: str
    w_bits: int = 4
    a_bits: int = 8
    per_channel: bool = True
    passes: Any = ("fold-bn",)
    steps: dict = dataclasses.field(default_factory=dict)
    #: the activations' range method
    a_range: str = "minmax"
    #: symmetric weight grids (False: asymmetric, a zero point per channel)
    w_symmetric: bool = True
    #: the weights' range method
    w_range: str = "minmax"


def rows_for(model: str) -> list[Row]:
    rows = [
        Row("w4a8-nearest", "W4A8 pc  nearest"),
        Row("w4a8-seqmse", "W4A8 pc  SeqMSE", steps={"seq_mse": True}),
        Row("w4a8-adaround", "W4A8 pc  AdaRound", steps={"adaround": True}),
        Row("w4a8-seqmse-adaround", "W4A8 pc  SeqMSE + AdaRound",
            steps={"seq_mse": True, "adaround": True}),
        Row("w4a8-bc", "W4A8 pc  bias correction (empirical)",
            steps={"bias_correction": {"mode": "empirical"}}),
        Row("w4a8-adaround-nofit", "W4A8 pc  AdaRound without the bias refit",
            steps={"adaround": {"fit_bias": False}}),
        # asymmetric 4-bit weights: 16 levels across each channel's [min, max] instead of 15
        # across [-max|w|, max|w|]
        Row("w4a8-asym-nearest", "W4A8 pc  asymmetric weights, nearest", w_symmetric=False),
        Row("w4a8-asym-adaround", "W4A8 pc  asymmetric weights, AdaRound", w_symmetric=False,
            steps={"adaround": True}),
        Row("w4a8-asym-mse-adaround", "W4A8 pc  asymmetric weights, MSE ranges, AdaRound",
            w_symmetric=False, w_range="mse", steps={"adaround": True}),
    ]
    if model == "minilm":
        rows += [
            Row("w4a8-adaround-wonly", "W4A8 pc  AdaRound, inputs from a weights-only model",
                steps={"adaround": {"act_quant": False}}),
            Row("w4a8-adaround-input", "W4A8 pc  AdaRound reconstructing W·x_q (target=input)",
                steps={"adaround": {"target": "input"}}),
            Row("w4a8-entropy-nearest", "W4A8 pc  nearest, entropy activation ranges", a_range="entropy"),
            Row("w4a8-entropy-adaround-input", "W4A8 pc  AdaRound target=input, entropy activation ranges",
                a_range="entropy", steps={"adaround": {"target": "input"}}),
            # 16-bit activations: the weights' rounding is the only error left
            Row("w4a16-nearest", "W4A16 pc nearest", a_bits=16),
            Row("w4a16-adaround", "W4A16 pc AdaRound", a_bits=16, steps={"adaround": True}),
        ]
    if model == "ppocr-rec":
        split = ("fold-bn", "split-identity")
        rows += [
            Row("w4a8-split-adaround", "W4A8 pc  split-identity + AdaRound", passes=split,
                steps={"adaround": True}),
            Row("w4a8-split-adaround-nofit", "W4A8 pc  split-identity + AdaRound without the bias refit",
                passes=split, steps={"adaround": {"fit_bias": False}}),
        ]
    if model in ("effnet-lite0-bn", "ppocr-rec"):
        rows += [
            Row("w8a8-pt-dfq", "W8A8 pt  dfq nearest", 8, per_channel=False, passes="dfq",
                steps={"bias_correction": False}),
            Row("w8a8-pt-dfq-bc", "W8A8 pt  dfq + bias correction (empirical)", 8,
                per_channel=False, passes="dfq", steps={"bias_correction": {"mode": "empirical"}}),
            Row("w8a8-pt-dfq-bca", "W8A8 pt  dfq + bias correction (analytic)", 8,
                per_channel=False, passes="dfq", steps={"bias_correction": {"mode": "analytic"}}),
            Row("w8a8-pt-dfq-bcm", "W8A8 pt  dfq + bias correction (measured; dfq default)", 8,
                per_channel=False, passes="dfq", steps={"bias_correction": {"mode": "measured"}}),
            Row("w8a8-pt-dfq-adaround", "W8A8 pt  dfq + AdaRound", 8, per_channel=False,
                passes="dfq", steps={"adaround": True}),
        ]
    return rows


def _config(row: Row):
    import onnxq

    return onnxq.QuantConfig(
        weights=onnxq.QuantSpec(bits=row.w_bits, symmetric=row.w_symmetric, per_channel=row.per_channel,
                                range_method=row.w_range),
        activations=onnxq.QuantSpec(bits=row.a_bits, symmetric=False, range_method=row.a_range),
    )


def run_one(model: str, row_id: str, out: Path) -> None:
    import onnxq

    row = next(r for r in rows_for(model) if r.id == row_id)
    batches = calibration_batches(model, quick=False)
    rss_before = _status_bytes("VmRSS")
    t = time.perf_counter()
    passes = list(row.passes) if isinstance(row.passes, tuple) else row.passes
    sim = onnxq.quantize(asset_path(model), batches, _config(row), passes=passes, **row.steps)
    wall = time.perf_counter() - t
    target = out.with_suffix(".qdq.onnx")
    onnxq.save(sim.model, target, overwrite=True)
    out.write_text(json.dumps({
        "row": row.id, "quantize_s": wall, "vmhwm_bytes": _status_bytes("VmHWM"),
        "rss_before_bytes": rss_before, "qdq": str(target),
    }))


def spawn(model: str, row: Row, work: Path) -> dict[str, Any]:
    out = work / f"{model}.{row.id}.json"
    log_file = out.with_suffix(".log")
    cmd = [sys.executable, "-m", "benchmarks.ptq", "--one", f"{model}:{row.id}", "--out", str(out)]
    start = time.perf_counter()
    with log_file.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                              cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0 or not out.is_file():
        tail = log_file.read_text().strip().splitlines()[-3:]
        return {"row": row.id, "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - start
    return result


def run_model(model: str, work: Path, pattern: str | None) -> dict[str, Any]:
    evaluate = Evaluator(model)
    metric = METRIC[model]
    fp32 = evaluate(asset_path(model))
    rows_out = [{"row": "fp32", "label": "FP32", metric: fp32[metric]}]
    for row in rows_for(model):
        if pattern and row.id not in pattern.split(","):
            continue
        log.info("%s: %s", model, row.id)
        res = spawn(model, row, work)
        res["label"] = row.label
        if "error" not in res:
            res.update(evaluate(Path(res["qdq"])))
        rows_out.append(res)
        _print_row(res, metric, fp32[metric])
    return {"model": model, "metric": metric, "fp32": fp32[metric], "rows": rows_out}


def _print_row(res: dict[str, Any], metric: str, ref: float) -> None:
    if "error" in res:
        print(f"  {res['label']:<44} ERROR {res['error']}", flush=True)
        return
    value = res[metric]
    delta = (value - ref) * 100
    wall = res.get("quantize_s")
    peak = res.get("vmhwm_bytes")
    print(f"  {res['label']:<44} {metric} {value:.4f} ({delta:+.1f} pt)"
          + (f"  {wall:7.1f} s  peak {peak / 2**30:.2f} GiB" if wall else ""), flush=True)


def _merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` results with the rows of ``new`` replacing (or added after) those of the same id;
    each row keeps the commit it was measured at."""
    by_model = {m["model"]: m for m in old}
    for res in new:
        before = by_model.get(res["model"])
        if before is None:
            by_model[res["model"]] = res
            continue
        rows = {r["row"]: r for r in before["rows"]}
        rows.update({r["row"]: r for r in res["rows"]})
        by_model[res["model"]] = {**before, **{k: v for k, v in res.items() if k != "rows"},
                                  "rows": list(rows.values())}
    return list(by_model.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", default=None, help="only these row ids (comma-separated)")
    parser.add_argument("--json", default=str(RESULTS / "ptq.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.one:
        model, row_id = args.one.split(":")
        run_one(model, row_id, Path(args.out))
        return 0
    import tempfile

    work = Path(args.workdir or tempfile.mkdtemp(prefix="onnxq-ptq-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models.split(","):
        print(f"\n{model}", flush=True)
        results.append(run_model(model, work, args.rows))
    commit = _commit()
    for res in results:
        for row in res["rows"]:
            row.setdefault("commit", commit)
    json_path = Path(args.json)
    partial = args.rows or set(args.models.split(",")) != set(MODELS)
    if partial and json_path.is_file():  # a partial run replaces only its models' / rows' results
        previous = json.loads(json_path.read_text())
        for res in previous.get("results", []):
            for row in res["rows"]:
                row.setdefault("commit", previous.get("commit"))
        results = _merge(previous.get("results", []), results)
    aimet = RESULTS / "aimet_ref.json"
    payload = {"commit": commit, "environment": _environment(), "results": results,
               "threads": os.environ.get("OMP_NUM_THREADS")}
    if aimet.is_file():
        payload["aimet_onnx"] = json.loads(aimet.read_text())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1, default=float))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
