"""Does the ``dfq`` preset make per-tensor weight quantization work on real models?

For each model: FP32; FP32 after ``dfq`` (high-bias fold is approximate: its effect on accuracy
and agreement with FP32); weight-only round-to-nearest symmetric INT8 **per tensor** after BN
folding only (naive), after ``fold-bn, cle`` and after ``dfq``; and per channel as the reference.
Also the worst per-channel weight-range spread before/after, and, per layer, what limits the
result: the layers with the widest spread after ``dfq``, what keeps CLE from reaching them, and the
metric when only that one layer is rounded per tensor.

EfficientNet-Lite0 (``effnet-lite0-bn``, the export that keeps its 49 BatchNorms): top-1/top-5 on
the 500 images of ``../shared/data/imagenet-sample``. PP-OCR rec: character error rate on 150
rendered WordNet lines (DejaVu fonts). Run::

    python -m benchmarks.dfq [--models effnet-lite0-bn,ppocr-rec] [--layers 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

import onnxq
from benchmarks import assets, datasets
from onnxq.quant import round_weights

log = logging.getLogger("benchmarks.dfq")
RESULTS = Path(__file__).parent / "results"


class Evaluator:
    """Metric of a model on the benchmark data, higher-is-better flag, and FP32 logits kept."""

    def __init__(self, asset_id: str) -> None:
        self.asset_id = asset_id
        if asset_id.startswith("effnet"):
            self.images, self.labels = datasets.imagenet_sample()
            self.metric, self.higher_is_better = "top1", True
        elif asset_id == "ppocr-rec":
            self.lines = datasets.ocr_lines(150)
            self.metric, self.higher_is_better = "cer", False
        else:
            raise SystemExit(f"no evaluation for {asset_id}")
        self.reference: np.ndarray | None = None

    def __call__(self, model: ir.Model) -> dict[str, float]:
        if self.asset_id.startswith("effnet"):
            logits = datasets.predictions(model, self.images)
            out = datasets.topk_from_logits(logits, self.labels)
            if self.reference is None:
                self.reference = logits
            out["agreement"] = datasets.agreement(logits, self.reference)
            return out
        return {"cer": datasets.ppocr_rec_cer(model, self.lines)}


def _worst_spread(model: ir.Model) -> tuple[float, str]:
    worst = max(onnxq.inspect(model).layers, key=lambda s: s.spread)
    return worst.spread, worst.node


def run_model(asset_id: str, n_layers: int) -> dict:
    path = assets.path(asset_id)
    if path is None:
        raise SystemExit(f"asset {asset_id} missing: python -m benchmarks.assets fetch {asset_id}")
    evaluate = Evaluator(asset_id)
    t0 = time.perf_counter()
    fp32 = onnxq.load(path)
    folded = onnxq.optimize(fp32, passes=["fold-bn"])
    cle = onnxq.optimize(fp32, passes=["fold-bn", "cle"])
    dfq = onnxq.optimize(fp32, passes=["dfq"])
    t_passes = time.perf_counter() - t0

    rows = {}
    for name, model in [
        ("FP32", fp32),
        ("FP32 after dfq", dfq),
        ("W8 per-tensor, BN folded (naive)", round_weights(folded, 8)),
        ("W8 per-tensor after fold-bn+cle", round_weights(cle, 8)),
        ("W8 per-tensor after dfq", round_weights(dfq, 8)),
        ("W8 per-channel, BN folded", round_weights(folded, 8, per_channel=True)),
    ]:
        t = time.perf_counter()
        rows[name] = evaluate(model)
        log.info("%s %s: %s (%.1f s)", asset_id, name, rows[name], time.perf_counter() - t)

    spreads = {
        "folded": _worst_spread(folded),
        "cle": _worst_spread(cle),
        "dfq": _worst_spread(dfq),
    }
    layers = []
    for stats in onnxq.inspect(dfq).worst(n_layers):
        alone = evaluate(round_weights(dfq, 8, only={stats.node}))
        blocked = stats.cle_next if not stats.cle_next.startswith("->") else ""
        layers.append({
            "layer": stats.node, "op": stats.op_type, "groups": stats.groups,
            "spread": stats.spread, "cle": stats.cle_next, "cle_prev": stats.cle_prev,
            "limit": blocked, f"{evaluate.metric}_only_this_layer_w8_per_tensor": alone[evaluate.metric],
        })
    return {
        "asset": asset_id, "metric": evaluate.metric, "rows": rows,
        "worst_spread": {k: {"spread": v[0], "layer": v[1]} for k, v in spreads.items()},
        "limiting_layers": layers, "pass_time_s": t_passes,
    }


def print_report(result: dict) -> None:
    metric = result["metric"]
    print(f"\n== {result['asset']} ({metric}) ==")
    fp32 = result["rows"]["FP32"][metric]
    for name, row in result["rows"].items():
        delta = (row[metric] - fp32) * 100
        extra = f"  agreement {row['agreement']:.3f}" if "agreement" in row else ""
        print(f"  {name:<36} {metric} {row[metric]:.4f}  ({delta:+.1f} pt){extra}")
    ws = result["worst_spread"]
    print("  worst per-channel spread: " + ", ".join(
        f"{k} {v['spread']:.1f} ({v['layer']})" for k, v in ws.items()))
    print(f"  layers limiting per-tensor after dfq (metric with only that layer rounded):")
    key = f"{metric}_only_this_layer_w8_per_tensor"
    for row in result["limiting_layers"]:
        cle = row["cle"] if row["cle"].startswith("->") else f"blocked: {row['cle']}"
        prev = f" {row['cle_prev']}" if row["cle_prev"] else ""
        print(f"    {row['layer'][:34]:<34} {row['op']:<5} g{row['groups']:<4} spread {row['spread']:7.1f}"
              f"  {metric} {row[key]:.4f}  {cle[:60]}{prev}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="effnet-lite0-bn,ppocr-rec")
    parser.add_argument("--layers", type=int, default=8, help="limiting layers to evaluate")
    parser.add_argument("--json", default=str(RESULTS / "dfq.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    results = []
    for asset_id in args.models.split(","):
        result = run_model(asset_id.strip(), args.layers)
        print_report(result)
        results.append(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
