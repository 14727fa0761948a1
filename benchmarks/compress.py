"""Model compression to a MAC target: accuracy, MACs, parameters and onnxruntime latency.

Rows (one run, side by side):

* ``effnet-lite0`` (BN folded) at 75 % MACs, scheme ``ssvd+cp`` (spatial SVD, then channel
  pruning; the proxy score is argmax agreement with FP32 on the last fifth of the calibration
  images). Calibration: ImageNet-sample images 0..255; top-1 on images 256..499 (244 held out).
* ``fashion-mnv2`` (the bundled MobileNetV2-style demo model, unfolded BN) at 50 % MACs, scheme
  ``ssvd+cp``: ``--train-samples`` Fashion-MNIST training images (Debian
  ``dataset-fashion-mnist``; 512 of them fit the pruned layers, all of them fine-tune), 256 other
  training images for the sweep's proxy score, accuracy on the 2000 bundled test images.
* ``fashion-resnet`` (``models/fashion_resnet/fashion_resnet.onnx``, the QAT issue's ResNet) at
  50 % MACs when its ONNX file exists, accuracy on the 10k Fashion-MNIST test images.

Fine-tuning (``--finetune-epochs N``): distillation from the uncompressed model after each stage
(:mod:`onnxq.compress.finetune`, on ``onnxq.train``'s graph executor; torch) on every training
sample given (``--train-samples`` for Fashion-MNIST; the 256 − 51 calibration images that are not
held out for EfficientNet-Lite0). Rows are keyed by (model, scheme, epochs, learning rate, augmentation, features, first-stage shares) in the JSON: a run adds or
replaces its rows and keeps the others.
Latency: onnxruntime, graph optimizations on, batch 1 (median of 50 runs) and batch 32 of test
images (median of 20), measured for the FP32 and compressed models alternately over 3 rounds
(best round each), so that load from other processes on the shared machine does not land on
one of them only. At batch 1 the Fashion-MNIST models run in ~0.1 ms, which per-node overhead
dominates (spatial SVD adds nodes): batch 32 shows the compute saved.

Run::

    python -m benchmarks.compress [--models effnet-lite0,fashion-mnv2] [--json PATH] [--workers 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks.compress")
RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
MODELS = ("effnet-lite0", "fashion-mnv2", "fashion-resnet")
FASHION_TRAIN = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
FASHION_TEST_LABELS = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")


def _batches(x: np.ndarray, name: str, size: int) -> list[dict[str, np.ndarray]]:
    return [{name: x[i:i + size]} for i in range(0, len(x), size)]


def _top1(model: Any, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    from onnxq.runtime.session import create_session

    session = create_session(model, optimize=True)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: images[i:i + 64]})[0] for i in range(0, len(images), 64)])
    return float(np.mean(logits.argmax(1) == labels)), logits.argmax(1)


def _fashion_train(count: int, held_out: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``count`` Fashion-MNIST training images (calibration / fine-tuning) and ``held_out`` others
    (the proxy score of the sweep), drawn without overlap, (u8 / 255 − 0.5) / 0.5."""
    with gzip.open(FASHION_TRAIN, "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(raw))[: min(len(raw), count + held_out)]
    images = (raw[pick].astype(np.float32) / 255.0 - 0.5) / 0.5
    return images[held_out:], images[:held_out]


def _fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10k Fashion-MNIST test images, (u8 / 255 − 0.5) / 0.5, and labels."""
    with gzip.open(FASHION_TEST, "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FASHION_TEST_LABELS, "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return (raw.astype(np.float32) / 255.0 - 0.5) / 0.5, labels


def _setup(model_id: str, train_samples: int = 640) -> dict | None:
    """Model path, calibration batches, test images/labels and the target for one row."""
    if model_id == "effnet-lite0":
        from benchmarks import assets
        from benchmarks.datasets import imagenet_sample

        path = assets.path("effnet-lite0")
        if path is None:
            log.warning("effnet-lite0 not in the asset cache: python -m benchmarks.assets fetch effnet-lite0")
            return None
        calib, _ = imagenet_sample(0, 256)
        test, labels = imagenet_sample(256, None)
        return {"path": str(path), "data": _batches(calib, "input", 32), "test": test, "labels": labels,
                "target": 0.75, "scheme": "ssvd+cp", "calib_samples": 128}
    if model_id == "fashion-mnv2":
        from onnxq.demo import bundled_model, bundled_test_set

        if not FASHION_TRAIN.is_file():
            log.warning("%s missing: apt-get install dataset-fashion-mnist", FASHION_TRAIN)
            return None
        test, labels = bundled_test_set()
        train, held = _fashion_train(train_samples)
        return {"path": str(bundled_model()), "data": _batches(train, "image", 64), "test": test,
                "labels": labels, "target": 0.5, "scheme": "ssvd+cp", "calib_samples": 512,
                "eval_data": _batches(held, "image", 64)}
    if model_id == "fashion-resnet":
        path = ROOT / "models" / "fashion_resnet" / "fashion_resnet.onnx"
        if not path.is_file() or not FASHION_TEST.is_file():
            log.warning("fashion-resnet: %s not written yet (models/fashion_resnet/train.py); row skipped", path)
            return None
        test, labels = _fashion_test()
        train, held = _fashion_train(train_samples)
        return {"path": str(path), "data": _batches(train, "image", 64), "test": test,
                "labels": labels, "target": 0.5, "scheme": "ssvd+cp", "calib_samples": 512,
                "eval_data": _batches(held, "image", 64)}
    raise SystemExit(f"unknown model {model_id!r}; known: {', '.join(MODELS)}")


def _latency_pair(a: Any, b: Any, rounds: int = 3, feeds: dict | None = None) -> tuple[dict, dict]:
    from onnxq.compress.macs import measure_latency

    best_a: dict | None = None
    best_b: dict | None = None
    repeats = 50 if feeds is None else 20
    for _ in range(rounds):
        la = measure_latency(a, feeds, repeats=repeats, warmup=5)
        lb = measure_latency(b, feeds, repeats=repeats, warmup=5)
        best_a = la if best_a is None or la["median_ms"] < best_a["median_ms"] else best_a
        best_b = lb if best_b is None or lb["median_ms"] < best_b["median_ms"] else best_b
    return best_a, best_b


def run_row(model_id: str, workers: int, finetune_epochs: int, cache_dir: str | None,
            train_samples: int = 640, finetune_lr: float = 1e-4, finetune_augment: str = "auto",
            finetune_features: bool = False, scheme: str | None = None,
            first_stage_shares: tuple[float, ...] = ()) -> dict | None:
    import onnxq
    from onnxq.compress import CompressConfig, compress

    setup = _setup(model_id, train_samples)
    if setup is None:
        return None
    if scheme:
        setup["scheme"] = scheme
    original = onnxq.load(setup["path"])
    config = CompressConfig(target_macs=setup["target"], scheme=setup["scheme"], workers=workers,
                            calib_samples=setup["calib_samples"], finetune_epochs=finetune_epochs,
                            finetune_lr=finetune_lr, finetune_augment=finetune_augment,
                            finetune_features=finetune_features, first_stage_shares=first_stage_shares,
                            cache_dir=cache_dir, latency_repeats=10)
    start = time.perf_counter()
    result = compress(original, setup["data"], config=config, eval_data=setup.get("eval_data"))
    seconds = time.perf_counter() - start
    top1_fp32, pred_fp32 = _top1(original, setup["test"], setup["labels"])
    top1, pred = _top1(result.model, setup["test"], setup["labels"])
    lat_fp32, lat = _latency_pair(original, result.model)
    name = next(iter(setup["data"][0]))
    batch32 = {name: np.ascontiguousarray(setup["test"][:32])}
    lat32_fp32, lat32 = _latency_pair(original, result.model, feeds=batch32)
    s = result.summary
    row = {
        "model": model_id,
        "scheme": setup["scheme"],
        "target_macs": setup["target"],
        "finetune_epochs": finetune_epochs,
        "finetune_lr": finetune_lr if finetune_epochs else None,
        "finetune_augment": finetune_augment if finetune_epochs else None,
        "finetune_features": finetune_features if finetune_epochs else None,
        "first_stage_shares": list(first_stage_shares),
        "first_stage_share": s.get("first_stage_share"),
        "candidates": s.get("candidates"),
        # samples given to compress(); without eval_data its last fifth is held out for the proxy
        "train_samples": sum(len(next(iter(b.values()))) for b in setup["data"]),
        "test_images": len(setup["labels"]),
        "top1_fp32": top1_fp32,
        "top1": top1,
        "agreement_with_fp32": float(np.mean(pred == pred_fp32)),
        "macs_fp32": s["before"]["macs"],
        "macs": s["after"]["macs"],
        "macs_ratio": s["after"]["macs"] / s["before"]["macs"],
        "params_fp32": s["before"]["params"],
        "params": s["after"]["params"],
        "latency_fp32_ms": lat_fp32["median_ms"],
        "latency_ms": lat["median_ms"],
        "latency_b32_fp32_ms": lat32_fp32["median_ms"],
        "latency_b32_ms": lat32["median_ms"],
        "compress_seconds": seconds,
        "proxy_score_fp32": s["before"]["score"],
        "proxy_score": s["after"]["score"],
        "stages": [{k: st[k] for k in ("technique", "macs_before", "target_macs", "macs_after", "reached",
                                       "score_before", "score_after", "layers", "finetune")}
                   for st in s["stages"]],
        "curves": {st["technique"]: st["curves"] for st in s["stages"]},
    }
    return row


def _ft(row: dict) -> str:
    """'-' without fine-tuning, else epochs x samples @ lr (e.g. '2x10000@1e-04')."""
    if not row["finetune_epochs"]:
        return "-"
    aug = row.get("finetune_augment") or "auto"
    shares = "/" + ",".join(f"{x:g}" for x in row["first_stage_shares"]) if row.get("first_stage_shares") else ""
    return (f"{row['finetune_epochs']}x{row.get('train_samples', '?')}@{row.get('finetune_lr') or 1e-4:.0e}"
            + ("" if aug == "auto" else f"/{aug}") + ("+feat" if row.get("finetune_features") else "") + shares)


def _table(rows: list[dict]) -> str:
    head = (f"{'model':<14} {'scheme':<8} {'FT':>9} {'MACs':>7} {'params':>7} {'top-1 FP32':>10} {'top-1':>7} "
            f"{'agree':>6} {'lat FP32':>9} {'lat':>7} {'b32 FP32':>9} {'b32':>8} {'time':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<14} {r['scheme']:<8} {_ft(r):>15} {r['macs_ratio']:>7.3f} {r['params'] / r['params_fp32']:>7.3f} "
            f"{r['top1_fp32']:>10.4f} {r['top1']:>7.4f} {r['agreement_with_fp32']:>6.3f} "
            f"{r['latency_fp32_ms']:>7.2f}ms {r['latency_ms']:>5.2f}ms "
            f"{r.get('latency_b32_fp32_ms', float('nan')):>7.2f}ms {r.get('latency_b32_ms', float('nan')):>6.2f}ms "
            f"{r['compress_seconds']:>6.0f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="effnet-lite0,fashion-mnv2,fashion-resnet")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--cache-dir", help="sweep cache (default ~/.cache/onnxq/compress)")
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--finetune-augment", default="auto", choices=("auto", "match", "none"),
                        help="fine-tuning augmentation (auto: flip + shift; match: + resized crop, mixup)")
    parser.add_argument("--scheme", help="override each model's scheme (e.g. cp, wsvd+cp)")
    parser.add_argument("--first-stage-shares", default="",
                        help="first stage at these shares of the reduction, keep the best (e.g. 0.3,0.5,0.7)")
    parser.add_argument("--finetune-features", action="store_true",
                        help="also distill the intermediate tensors both models share")
    parser.add_argument("--train-samples", type=int, default=640,
                        help="Fashion-MNIST training images given to compress (calibration, fine-tuning)")
    parser.add_argument("--json", default=str(RESULTS / "compress.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxq.passes", "onnx_ir"):  # one line per sweep job otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rows = []
    for model_id in [m.strip() for m in args.models.split(",") if m.strip()]:
        row = run_row(model_id, args.workers, args.finetune_epochs, args.cache_dir, args.train_samples,
                      args.finetune_lr, args.finetune_augment, args.finetune_features, args.scheme,
                      tuple(float(x) for x in args.first_stage_shares.split(",") if x.strip()))
        if row is not None:
            rows.append(row)
            log.info("%s done in %.0f s", model_id, row["compress_seconds"])
    print(_table(rows))
    if args.json and rows:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else {}
        def key(r: dict) -> tuple:
            ft = r["finetune_epochs"]
            return (r["model"], r["scheme"], ft, r.get("finetune_lr") if ft else None,
                    (r.get("finetune_augment") or "auto") if ft else None, bool(r.get("finetune_features")),
                    tuple(r.get("first_stage_shares") or ()))

        by_key = {key(r): r for r in old.get("rows", [])}
        by_key.update({key(r): r for r in rows})
        data = {"host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                "rows": sorted(by_key.values(), key=lambda r: (r["model"], r["scheme"], r["finetune_epochs"],
                                                                r.get("finetune_lr") or 0.0))}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=float))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
