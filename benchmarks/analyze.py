"""The quantization analyzer on real models: diagnosis, automatic fix, wall time.

For each model, one ``onnxq.analysis.analyze`` run from the naive W8A8 per-tensor config
(``default`` preset: symmetric INT8 weights per tensor, asymmetric UINT8 activations, min-max,
BatchNorms folded), with the model's real metric as the evaluation function:

* ``fashion-mnv2`` (bundled with onnxq, no download): calibration on test images 0..199 (4 batches
  of 50), top-1 on images 200..1999, proxy on images 200..263.
* ``effnet-lite0-bn``: calibration on images 0..255 of the ImageNet sample (8 batches of 32),
  top-1 on images 256..499 (the split of ``benchmarks.quantize``); held-out samples for the proxy
  (output SQNR, which ranks quantizers): images 256..319, labels unused. Target: at most 1 point
  of top-1 below FP32. Also reported: top-1 of each model on the 256 calibration images, which
  the search never evaluates (a check that the kept fixes are not tuned to the test images).
* ``ppocr-rec``: calibration on ``ocr_lines(150, seed=1)`` (25 batches of 6), CER on
  ``ocr_lines(150, seed=0)``, proxy on the first 24 of those lines (4 batches: the model has 378
  quantizers, so 756 sweep variants). Target: CER at most 1 point above FP32.

Every analysis runs with 2 worker processes (one onnxruntime thread each) on this 2-core
machine; its wall time is the figure to read. The HTML report of each model is written to
``--out`` (default ``/tmp/onnxq-analyze``) and checked in headless Chromium when it is installed
(``apt-get install chromium``): the expected sections are there and every embedded image decoded.
The plan is checked too: ``onnxq quantize --config plan.json --passes …`` (the CLI, in-process)
gives a model with the encodings of the analysis' final model.

Run (one benchmark at a time on a shared machine)::

    flock /tmp/onnxq-bench.lock python -m benchmarks.analyze [--models effnet-lite0-bn,ppocr-rec]
        [--out DIR] [--json PATH] [--fresh]

``--fresh`` clears the evaluation cache first (otherwise a rerun is incremental and fast).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import assets, datasets

log = logging.getLogger("benchmarks.analyze")
RESULTS = Path(__file__).parent / "results"
MODELS = ("fashion-mnv2", "effnet-lite0-bn", "ppocr-rec")

# --------------------------------------------------------------------------------------------------
# evaluation functions (module level: the analyzer's worker processes import them)
# --------------------------------------------------------------------------------------------------

_DATA: dict[str, Any] = {}


def _imagenet(start: int, count: int):
    key = f"imagenet-{start}-{count}"
    if key not in _DATA:
        _DATA[key] = datasets.imagenet_sample(start, count)
    return _DATA[key]


def effnet_top1(session) -> dict[str, float]:
    """Top-1 on ImageNet-sample images 256..499 (244 images)."""
    images, labels = _imagenet(256, 244)
    return {"top1": datasets.topk_from_logits(datasets.predictions(session, images), labels, (1,))["top1"]}


def effnet_top1_calibration_images(session) -> dict[str, float]:
    """Top-1 on the 256 calibration images (never used by the search)."""
    images, labels = _imagenet(0, 256)
    return {"top1": datasets.topk_from_logits(datasets.predictions(session, images), labels, (1,))["top1"]}


def _ocr(seed: int):
    key = f"ocr-{seed}"
    if key not in _DATA:
        _DATA[key] = datasets.ocr_lines(150, seed=seed)
    return _DATA[key]


def fashion_top1(session) -> dict[str, float]:
    """Top-1 of the bundled Fashion-MNIST model on its test images 200..1999."""
    if "fashion" not in _DATA:
        from onnxq.demo import bundled_test_set

        x, y = bundled_test_set()
        _DATA["fashion"] = (x[200:], y[200:])
    x, y = _DATA["fashion"]
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i : i + 500]})[0] for i in range(0, len(x), 500)])
    return {"top1": float(np.mean(logits.argmax(-1) == y))}


def fashion_top1_calibration_images(session) -> dict[str, float]:
    from onnxq.demo import bundled_test_set

    x, y = bundled_test_set()
    name = session.get_inputs()[0].name
    return {"top1": float(np.mean(session.run(None, {name: x[:200]})[0].argmax(-1) == y[:200]))}


def ppocr_cer(session) -> dict[str, float]:
    """Character error rate on ``ocr_lines(150, seed=0)``."""
    return {"cer": datasets.ppocr_rec_cer(session, _ocr(0))}


def ppocr_cer_calibration_lines(session) -> dict[str, float]:
    return {"cer": datasets.ppocr_rec_cer(session, _ocr(1))}


# --------------------------------------------------------------------------------------------------


def setup(model: str) -> dict[str, Any]:
    if model == "fashion-mnv2":
        from onnxq.demo import bundled_test_set

        x, _ = bundled_test_set()
        return {
            "calib": [{"image": x[i : i + 50]} for i in range(0, 200, 50)],
            "eval_data": [{"image": x[200:264]}],
            "evaluate": "benchmarks.analyze:fashion_top1", "check": fashion_top1_calibration_images,
            "metric": "top1", "higher_is_better": True,
        }
    if model == "effnet-lite0-bn":
        images, _ = _imagenet(0, 256)
        held, _ = _imagenet(256, 64)
        return {
            "calib": [{"input": images[i : i + 32]} for i in range(0, 256, 32)],
            "eval_data": [{"input": held[i : i + 32]} for i in range(0, 64, 32)],
            "evaluate": "benchmarks.analyze:effnet_top1", "check": effnet_top1_calibration_images,
            "metric": "top1", "higher_is_better": True,
        }
    if model == "ppocr-rec":
        calib = [{"x": b} for b, _ in datasets.ppocr_rec_batches(_ocr(1))]
        held = [{"x": b} for b, _ in datasets.ppocr_rec_batches(_ocr(0)[:24])]
        return {"calib": calib, "eval_data": held, "evaluate": "benchmarks.analyze:ppocr_cer",
                "check": ppocr_cer_calibration_lines, "metric": "cer", "higher_is_better": False}
    raise SystemExit(f"no analysis benchmark for {model} (known: {', '.join(MODELS)})")


def check_html(path: Path) -> dict[str, Any]:
    """Open the report in headless Chromium; the sections and decoded images it shows."""
    from onnxq.analysis.report import SECTIONS

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        return {"skipped": "no chromium (apt-get install chromium)"}
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
           "--dump-dom", path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    dom = proc.stdout
    import re

    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images="(\d+)"', dom)
    return {
        "sections": {s: f'id="{s}"' in dom for s in SECTIONS},
        "images": int(total.group(1)) if total else None,
        "images_decoded": int(loaded.group(1)) if loaded else None,
    }


def check_plan_roundtrip(model_path: Path, result, calib, work: Path) -> dict[str, Any]:
    """``onnxq quantize --config plan.json --passes …`` reproduces the analysis' final model."""
    from onnxq.cli import main

    npy = work / "calib-npy"
    shutil.rmtree(npy, ignore_errors=True)
    npy.mkdir(parents=True)
    name = next(iter(calib[0]))
    for i, b in enumerate(calib):
        np.save(npy / f"{i:03d}.npy", b[name])
    out = work / "roundtrip"
    args = ["quantize", str(model_path), "--calib", str(npy), "--config", str(result.paths["plan"]),
            "--passes", result.data["plan"]["quantize_passes"], "-o", str(out)]
    rc = main(args)
    if rc != 0:
        return {"ok": False, "rc": rc}
    enc = json.loads((out / f"{model_path.stem}.encodings.json").read_text())
    from onnxq.quant.encodings import to_aimet_v1

    want = to_aimet_v1(result.sim.encodings, {})
    same = enc.get("activation_encodings") == want.get("activation_encodings") and \
        enc.get("param_encodings") == want.get("param_encodings")
    return {"ok": bool(same), "command": "onnxq " + " ".join(args)}


def run_model(model: str, out_root: Path, fresh: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from onnxq.analysis import AnalysisConfig, analyze

    if model == "fashion-mnv2":
        from onnxq.demo import bundled_model

        path = bundled_model()
    else:
        path = assets.path(model)
    if path is None:
        raise SystemExit(f"asset {model} missing: python -m benchmarks.assets fetch {model}")
    s = setup(model)
    out = out_root / model
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    options = AnalysisConfig(metric=s["metric"], higher_is_better=s["higher_is_better"],
                             target_drop=0.01, workers=2)
    t0 = time.perf_counter()
    result = analyze(
        path, s["calib"], s["evaluate"], config="default", passes="fold-bn",
        eval_data=s["eval_data"], options=options, output_dir=out,
        progress=lambda stage, total: tqdm(total=total, desc=stage, leave=False, file=sys.stderr),
    )
    wall = time.perf_counter() - t0
    print(result.summary())
    data = result.data
    # top-1 / CER on data the search never saw, for FP32, naive and the plan
    from onnxq.runtime import create_session

    naive = out / ".work" / "qdq.onnx"
    import onnxq

    check = {
        "fp32": s["check"](create_session(onnxq.load(out / ".work" / "float.onnx"), optimize=True)),
        "naive": s["check"](create_session(onnxq.load(naive), optimize=True)),
        "plan": s["check"](create_session(result.sim.model, optimize=True)),
    }
    row = {
        "model": model,
        "metric": data["metric"],
        "summary": {k: {"score": v["score"], "drop": v["drop"],
                        "sqnr_db": (v.get("proxy") or {}).get("sqnr_db")}
                    for k, v in data["summary"].items()},
        "plan": data["plan"],
        "diagnosis": data["diagnosis"],
        "worst": [{k: e.get(k) for k in ("rank", "id", "op_type", "depthwise", "spread", "clipped")}
                  | {"enabled_alone_sqnr_db": (e.get("enabled_alone") or {}).get("proxy", {}).get("sqnr_db"),
                     "disabled_alone_sqnr_db": (e.get("disabled_alone") or {}).get("proxy", {}).get("sqnr_db")}
                  for e in data["sensitivity"][:10]],
        "sanity": {k: data["sanity"][k] for k in ("ok", "max_abs_diff", "max_rel_diff")},
        "trials": len(data["trials"]),
        "quantizers": data["quantizers"],
        "timing_s": data["timing_s"],
        "wall_s": round(wall, 1),
        "cache": data["cache"],
        "unseen_data_check": check,
        "html": check_html(result.paths["html"]),
        "plan_roundtrip": check_plan_roundtrip(path, result, s["calib"], out / ".work"),
        "report": str(result.paths["html"]),
    }
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        m = row["metric"]["name"]
        print(f"\n{row['model']}  ({m}; target {row['metric']['target']:.4f}; "
              f"analysis wall time {row['wall_s']:.0f} s, {row['quantizers']} quantizers, "
              f"{row['trials']} fix trials)")
        for key, label in (("fp32", "FP32"), ("quantized", "W8A8 per-tensor naive"),
                           ("weights_only", "  weights only"), ("activations_only", "  activations only"),
                           ("plan", "automatic fix")):
            v = row["summary"][key]
            drop = "" if v["drop"] is None else f"{-v['drop'] * 100:+.2f} pt"
            print(f"  {label:<26} {v['score']:.4f} {drop:>10}   SQNR {v['sqnr_db'] or 0:.1f} dB")
        print("  changes: " + ("; ".join(row["plan"]["changes"]) or "none"))
        print(f"  unseen data: {row['unseen_data_check']}")
        print(f"  html: {row['html']}  plan round trip: {row['plan_roundtrip'].get('ok')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.analyze", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default="/tmp/onnxq-analyze")
    parser.add_argument("--json", default=str(RESULTS / "analyze.json"))
    parser.add_argument("--fresh", action="store_true", help="clear the evaluation cache first")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    rows = [run_model(m, Path(args.out), args.fresh) for m in args.models.split(",") if m]
    print_table(rows)
    import onnxruntime

    result = {"environment": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                              "machine": platform.machine(), "cpus": __import__("os").cpu_count()},
              "models": {r["model"]: r for r in rows}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        old.setdefault("models", {}).update(result["models"])
        old["environment"] = result["environment"]
        Path(args.json).write_text(json.dumps(old, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
