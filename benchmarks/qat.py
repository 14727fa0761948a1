"""Quantization-aware training on the ONNX file: nearest vs AdaRound vs QAT (fixed / learned
ranges) against FP32, accuracy + wall time + peak memory, one row per fresh subprocess.

Model: the Fashion-MNIST ResNet of ``models/fashion_resnet`` (14 weight layers, BatchNorm folded
first), W4A4 per-channel symmetric weights / asymmetric activations, calibration on the first
512 training images, accuracy on the 10k test images (onnxruntime runs every QDQ model written).

* ``nearest``: calibration ranges, round to nearest;
* ``adaround``: ``onnxq.quantize(..., adaround=True)`` (defaults), activations recalibrated;
* ``qat-fixed`` / ``qat-range``: the ``nearest`` model prepared with ``onnxq.train.prepare``
  (ranges fixed / learned) and trained by distillation from the FP32 model on the 60k training
  images **without labels** (``onnxq.train.fit``: AdamW, cosine, flip + shift augmentation),
  then exported; the row's time covers quantization, training and export.

Each row runs in its own process (``--one ROW``) so its wall time and peak memory (``VmHWM``) are
its own. ``--threads`` sets torch's and onnxruntime's threads (1 by default: on the shared 2-core
machine two spinning threads per process run several times slower).

Second model (``--models effnet-lite0-bn``): EfficientNet-Lite0 W4A8 per-channel, AdaRound on the
256 calibration images of ``imagenet-sample`` (as ``benchmarks/ptq.py``), then QAT from the AdaRound
result by distillation on the same 256 images; top-1 on the other 244.

Run::

    python -m benchmarks.qat [--rows nearest,adaround,qat-fixed,qat-range] [--epochs 2]
                             [--models fashion-resnet,effnet-lite0-bn] [--effnet-epochs 8]
                             [--json benchmarks/results/qat.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks.qat")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
RESNET = ROOT / "models" / "fashion_resnet" / "fashion_resnet.onnx"
ROWS = ("nearest", "adaround", "qat-fixed", "qat-range")
LABELS = {
    "fp32": "FP32",
    "nearest": "W4A4 pc  nearest (PTQ)",
    "adaround": "W4A4 pc  AdaRound (PTQ)",
    "qat-fixed": "W4A4 pc  QAT, fixed ranges",
    "qat-range": "W4A4 pc  QAT, range learning",
}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y), preprocessed as the model expects."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fashion_resnet_train",
                                                  RESNET.parent / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    xtr, ytr, xte, yte = module.load_fashion_mnist()
    return module.preprocess(xtr), ytr, module.preprocess(xte), yte


def config() -> Any:
    import onnxq

    return onnxq.QuantConfig(
        weights=onnxq.QuantSpec(bits=4, symmetric=True, per_channel=True),
        activations=onnxq.QuantSpec(bits=4, symmetric=False),
    )


def accuracy(model_path: Path, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 1000]})[0]
                             for i in range(0, len(x), 1000)])
    return float((logits.argmax(1) == y).mean())


def effnet_config() -> Any:
    import onnxq

    return onnxq.QuantConfig(
        weights=onnxq.QuantSpec(bits=4, symmetric=True, per_channel=True),
        activations=onnxq.QuantSpec(bits=8, symmetric=False),
    )


def run_one_effnet(row: str, out: Path, epochs: int, threads: int, steps: int | None,
                   lr: float = 5e-5) -> None:
    """EfficientNet-Lite0 W4A8: AdaRound on the 256 calibration images, then (``qat-*``) QAT by
    distillation from FP32 on the same 256 images (no labels)."""
    import torch

    import onnxq
    from benchmarks.quantize import asset_path, calibration_batches

    torch.set_num_threads(threads)
    batches = calibration_batches("effnet-lite0-bn", quick=False)
    images = np.concatenate([b["input"] for b in batches])
    rss_before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    sim = onnxq.quantize(asset_path("effnet-lite0-bn"), batches, effnet_config(),
                         passes="fold-bn", adaround=row != "nearest")
    extra["ptq_s"] = time.perf_counter() - t0
    model = sim.model
    if row.startswith("qat"):
        from onnxq.train import TrainConfig, fit, prepare

        ptq = out.with_suffix(".ptq.qdq.onnx")  # the starting point, evaluated as its own row
        onnxq.save(sim.model, ptq, overwrite=True)
        extra["ptq_qdq"] = str(ptq)
        extra["ptq_vmhwm_bytes"] = _status_bytes("VmHWM")

        qat = prepare(sim, learn_ranges=row == "qat-range")
        cfg = TrainConfig(epochs=epochs, batch_size=16, lr=lr, range_lr=5e-3, seed=0,
                          max_steps=steps, progress=False, shift=0.06)
        extra["history"] = fit(qat, {"input": images}, None, cfg)
        extra["train_config"] = dict(cfg.__dict__)
        model = qat.to_sim().model
    _write_row(out, row, model, time.perf_counter() - t0, rss_before, extra)


def _write_row(out: Path, row: str, model: Any, wall: float, rss_before: int,
               extra: dict[str, Any]) -> None:
    """Save a child's QDQ model beside ``out`` and its timings / extras as ``out`` (JSON)."""
    import onnxq

    target = out.with_suffix(".qdq.onnx")
    onnxq.save(model, target, overwrite=True)
    out.write_text(json.dumps({
        "row": row, "wall_s": wall, "vmhwm_bytes": _status_bytes("VmHWM"),
        "rss_before_bytes": rss_before, "qdq": str(target), **extra,
    }, default=float))


def run_one(row: str, out: Path, epochs: int, threads: int, steps: int | None) -> None:
    import torch

    import onnxq

    torch.set_num_threads(threads)
    xtr, _, _, _ = fashion()
    calib = [{"image": xtr[i:i + 128]} for i in range(0, 512, 128)]
    rss_before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if row == "adaround":
        # AdaRound's per-layer onnxruntime sessions cannot run 4-bit activations (onnxruntime
        # fuses uint4 Q/DQ into QLinearConv, which has no uint4 kernel): learn the rounding with
        # 8-bit activations, then rebuild W4A4 with those frozen weight encodings
        import dataclasses

        from onnxq.quant.sim import rebuild

        w4a8 = config().replace(activations=dataclasses.replace(config().activations, bits=8))
        ada = onnxq.quantize(RESNET, calib, w4a8, passes="fold-bn", adaround=True)
        near = onnxq.quantize(RESNET, calib, config(), passes="fold-bn")
        frozen = {e.name: e for e in ada.encodings if e.kind == "param" and e.frozen}
        extra["adaround_weights"] = len(frozen)
        sim = rebuild(near, ada.float_model, frozen, calib)
        model = sim.model
    else:
        sim = onnxq.quantize(RESNET, calib, config(), passes="fold-bn")
        model = sim.model
    if row.startswith("qat"):
        from onnxq.train import TrainConfig, fit, prepare

        qat = prepare(sim, learn_ranges=row == "qat-range")
        cfg = TrainConfig(epochs=epochs, batch_size=128, lr=3e-4, range_lr=1e-2, seed=0,
                          max_steps=steps, progress=False, shift=0.08)
        history = fit(qat, {"image": xtr}, None, cfg)
        extra["history"] = history
        model = qat.to_sim().model
        extra["train_config"] = {k: v for k, v in cfg.__dict__.items()}
    _write_row(out, row, model, time.perf_counter() - t0, rss_before, extra)


def spawn(row: str, work: Path, args: argparse.Namespace, model: str = "fashion-resnet",
          epochs: int | None = None) -> dict[str, Any]:
    out = work / f"{model}.{row}.json"
    log_file = out.with_suffix(".log")
    cmd = [sys.executable, "-m", "benchmarks.qat", "--one", f"{model}:{row}", "--out", str(out),
           "--epochs", str(epochs or args.epochs), "--threads", str(args.threads),
           "--effnet-lr", str(args.effnet_lr)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    with log_file.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                              check=False)
    if proc.returncode != 0 or not out.is_file():
        tail = log_file.read_text().strip().splitlines()[-3:]
        return {"row": row, "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - start
    return result


def _print(res: dict[str, Any], fp32: float) -> None:
    label = res.get("label") or LABELS.get(res["row"], res["row"])
    if "error" in res:
        print(f"  {label:<34} ERROR {res['error']}", flush=True)
        return
    acc = res["accuracy"]
    line = f"  {label:<34} top-1 {acc:.4f} ({(acc - fp32) * 100:+.2f} pt)"
    if "wall_s" in res:
        line += f"  {res['wall_s']:7.1f} s  peak {res['vmhwm_bytes'] / 2**20:6.0f} MiB"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion-resnet",
                        help="fashion-resnet and/or effnet-lite0-bn (comma-separated)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--effnet-rows", default="adaround,qat-range")
    parser.add_argument("--effnet-epochs", type=int, default=5,
                        help="QAT epochs over EfficientNet's 256 calibration images")
    parser.add_argument("--epochs", type=int, default=2, help="QAT epochs over the 60k images")
    parser.add_argument("--steps", type=int, default=None, help="cap on QAT steps (quick runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--effnet-lr", type=float, default=5e-5, help="EfficientNet QAT weight lr")
    parser.add_argument("--note", help="a remark stored with the results (e.g. machine load)")
    parser.add_argument("--json", default=str(RESULTS / "qat.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.one:
        model, _, row = args.one.rpartition(":")
        if model == "effnet-lite0-bn":
            run_one_effnet(row, Path(args.out), args.epochs, args.threads, args.steps,
                           args.effnet_lr)
        else:
            run_one(row, Path(args.out), args.epochs, args.threads, args.steps)
        return 0
    import tempfile

    work = Path(args.workdir or tempfile.mkdtemp(prefix="onnxq-qat-"))
    work.mkdir(parents=True, exist_ok=True)
    if "effnet-lite0-bn" in args.models.split(","):
        run_effnet(work, args)
    if "fashion-resnet" not in args.models.split(","):
        return 0
    if not RESNET.is_file():
        print(f"{RESNET} is missing: python models/fashion_resnet/train.py", file=sys.stderr)
        return 2
    _, _, xte, yte = fashion()
    fp32 = accuracy(RESNET, xte, yte, args.threads)
    rows = [{"row": "fp32", "accuracy": fp32}]
    print("\nfashion-resnet (W4A4 per-channel; top-1 on the 10k Fashion-MNIST test images)")
    _print(rows[0], fp32)
    for row in args.rows.split(","):
        res = spawn(row, work, args)
        if "error" not in res:
            res["accuracy"] = accuracy(Path(res["qdq"]), xte, yte, args.threads)
        rows.append(res)
        _print(res, fp32)
    from benchmarks.quantize import _commit, _environment

    payload = {"commit": _commit(), "environment": _environment(), "threads": args.threads,
               "epochs": args.epochs, "steps": args.steps,
               "results": [{"model": "fashion-resnet", "metric": "top1", "fp32": fp32,
                            "epochs": args.epochs, "threads": args.threads, "note": args.note,
                            "rows": rows}]}
    _write(args.json, payload, "fashion-resnet")
    return 0


def _write(path: str, payload: dict[str, Any], model: str) -> None:
    """Replace ``model``'s entry in the results file, keeping the other models' entries."""
    old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    keep = [r for r in old.get("results", []) if r.get("model") != model]
    previous = next((r for r in old.get("results", []) if r.get("model") == model), None)
    if previous is not None:  # rows not rerun this time stay as they were measured
        new_ids = {row["row"] for row in payload["results"][0]["rows"]}
        kept = [row for row in previous["rows"] if row["row"] not in new_ids]
        payload["results"][0]["rows"] = kept + payload["results"][0]["rows"]
        order = {r: i for i, r in enumerate(("fp32",) + ROWS)}
        payload["results"][0]["rows"].sort(key=lambda row: order.get(row["row"], 99))
    payload["results"] += keep
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1, default=float))
    print(f"\nwrote {path}")


def run_effnet(work: Path, args: argparse.Namespace) -> None:
    from benchmarks.quantize import Evaluator, _commit, _environment, asset_path

    evaluate = Evaluator("effnet-lite0-bn")
    fp32 = evaluate(asset_path("effnet-lite0-bn"))["top1"]
    rows: list[dict[str, Any]] = [{"row": "fp32", "accuracy": fp32}]
    print("\neffnet-lite0-bn (W4A8 per-channel; top-1 on imagenet-sample images 256..499)")
    _print(rows[0], fp32)
    for row in args.effnet_rows.split(","):
        res = spawn(row, work, args, "effnet-lite0-bn", args.effnet_epochs)
        if "ptq_qdq" in res:  # the AdaRound model QAT started from, measured in the same process
            ptq = {"row": "adaround", "label": "W4A8 pc  AdaRound (PTQ; start of QAT)",
                   "wall_s": res["ptq_s"], "vmhwm_bytes": res["ptq_vmhwm_bytes"]}
            ptq.update(evaluate(Path(res["ptq_qdq"])))
            ptq["accuracy"] = ptq["top1"]
            rows.append(ptq)
            _print(ptq, fp32)
        if "error" not in res:
            res.update(evaluate(Path(res["qdq"])))
            res["accuracy"] = res["top1"]
        res["label"] = {"nearest": "W4A8 pc  nearest (PTQ)", "adaround": "W4A8 pc  AdaRound (PTQ)",
                        "qat-range": "W4A8 pc  AdaRound + QAT, range learning",
                        "qat-fixed": "W4A8 pc  AdaRound + QAT, fixed ranges"}.get(row, row)
        rows.append(res)
        _print(res, fp32)
    payload = {"commit": _commit(), "environment": _environment(), "threads": args.threads,
               "epochs": args.effnet_epochs, "lr": args.effnet_lr, "note": args.note,
               "results": [{"model": "effnet-lite0-bn", "metric": "top1", "fp32": fp32,
                            "epochs": args.effnet_epochs, "lr": args.effnet_lr,
                            "threads": args.threads, "note": args.note, "rows": rows}]}
    _write(args.json, payload, "effnet-lite0-bn")


if __name__ == "__main__":
    sys.exit(main())
