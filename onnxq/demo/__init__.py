"""``onnxq demo``: the main job on a model this project trains itself, offline, in seconds.

The bundled model (``fashion_mnv2.onnx``) is a MobileNetV2-style Fashion-MNIST classifier with
depthwise convolutions, BatchNorms and ReLU6 (``Clip(0, 6)``), trained by
``models/fashion_mnv2/train.py``; ``fashion_test.npz`` holds 2000 labelled test images. The demo
folds the BNs, equalizes across the ReLU6s (exactly) and compares W8A8 quantization — per tensor
naive, per tensor after CLE, per channel — with FP32.
"""

from __future__ import annotations

__all__ = ["run_demo", "bundled_model", "bundled_test_set"]

import logging
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)


def _data(name: str) -> Path:
    return Path(str(resources.files(__package__).joinpath(name)))


def bundled_model() -> Path:
    return _data("fashion_mnv2.onnx")


def bundled_test_set() -> tuple[np.ndarray, np.ndarray]:
    """Images float32 [N, 1, 28, 28] normalized to [-1, 1] and labels int64 [N]."""
    with np.load(_data("fashion_test.npz")) as data:
        images = (data["images"].astype(np.float32) / 255.0 - 0.5) / 0.5
        return images[:, None], data["labels"].astype(np.int64)


def accuracy(model: ir.Model, images: np.ndarray, labels: np.ndarray) -> float:
    from onnxq.runtime import create_session

    session = create_session(model, optimize=True)
    name = session.get_inputs()[0].name
    logits = np.concatenate(
        [session.run(None, {name: images[i : i + 500]})[0] for i in range(0, len(images), 500)]
    )
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def run_demo(out_dir: str | Path, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Run the demo, print a table through ``echo``, write the quantized model; returns accuracies."""
    import onnxq
    from onnxq.passes.pipelines import parse_passes, run_pipeline

    start = time.perf_counter()
    images, labels = bundled_test_set()
    calib = [images[i : i + 50] for i in range(0, 200, 50)]  # first 200 images calibrate
    test_x, test_y = images[200:], labels[200:]  # the other 1800 measure
    fp32 = onnxq.load(bundled_model())
    ops = onnxq.inspect(fp32).op_counts
    echo(f"model: {bundled_model().name} (" + ", ".join(f"{k} {v}" for k, v in ops.items()) + ")")
    echo(f"data:  {len(calib) * 50} calibration / {len(test_y)} test images (Fashion-MNIST)\n")

    dfq = fp32.clone()
    for name, report, _ in run_pipeline(dfq, parse_passes("dfq")):
        if name not in ("lift-constants", "cleanup"):
            echo("  " + report.summary())
    folded = onnxq.optimize(fp32, passes=["fold-bn"])
    before = max(s.spread for s in onnxq.inspect(folded).layers)
    after = max(s.spread for s in onnxq.inspect(dfq).layers)
    echo(f"  worst per-channel weight-range spread: {before:.1f} -> {after:.1f}\n")

    variants = [
        ("FP32", None, None),
        ("INT8 per-tensor, naive (BN folded)", "default", ["fold-bn"]),
        ("INT8 per-tensor after CLE (dfq)", "default", "dfq"),
        ("INT8 per-channel (BN folded)", "per-channel", ["fold-bn"]),
    ]
    results: dict[str, float] = {}
    sims = {}
    echo(f"{'W8A8 (weights and activations)':<40} {'accuracy':>8}")
    for name, config, passes in variants:
        if config is None:
            model = fp32
        else:
            sims[name] = onnxq.quantize(fp32, calib, config=config, passes=passes)
            model = sims[name].model
        results[name] = accuracy(model, test_x, test_y)
        delta = (results[name] - results["FP32"]) * 100
        echo(f"{name:<40} {results[name]:>8.4f}  ({delta:+.2f} pt)")

    paths = sims["INT8 per-tensor after CLE (dfq)"].export(out_dir, "fashion_mnv2.dfq")
    echo(f"\nwrote {paths['qdq']}, {paths['encodings'].name} and the float model "
         f"({time.perf_counter() - start:.1f} s)")
    return results
