"""EfficientNet-Lite0 W4A8: a sweep of QAT settings from one AdaRound start point (issue 9).

Does QAT by distillation on the 256 calibration images of ``imagenet-sample`` beat its AdaRound
start on the 244 held-out images, for any reasonable setting? Each setting trains the same start
(``onnxq.train.prepare`` + ``fit``), exports, and is scored by onnxruntime: top-1 and mean
KL(FP32 ‖ quantized) on the held-out images.

The sweep is meant for a machine with a GPU (``--device cuda``: ~1 s per epoch on an H200,
against ~85 s on this 2-core CPU), which may lack the shared data and the model cache. So the
inputs can travel as files:

* ``--make-start DIR`` (here): AdaRound W4A8 (per-channel symmetric weights with MSE ranges,
  asymmetric 8-bit activations) on the calibration images, exported to ``DIR``
  (``effnet.float.onnx``, ``effnet.encodings.json``, ``fp32.onnx``: the teacher);
* ``--pack-data FILE.npz`` (here): the 500 centre crops as JPEG (quality 95, ~12 MB; the decoded
  pixels differ from the originals by 2.1 grey levels on average, so FP32 top-1 on the 244 is
  0.902 instead of 0.910: compare the rows with each other and with ``start``, not with
  ``benchmarks/qat.py``);
* ``--start DIR --data FILE.npz --grid JSON`` (there): the sweep, one JSON line per setting.

A grid entry holds :class:`onnxq.train.TrainConfig` fields (defaults here: batch 16, lr 5e-5,
range lr 5e-3, shift 0.06, as ``benchmarks/qat.py``) plus ``learn_ranges`` (default true),
``labels`` (default false: distillation only), ``features`` / ``feature_weight`` (feature
distillation, :func:`onnxq.train.prepare`) and ``only`` (``"bias"``: train the biases alone). ``--budget`` seconds: later settings are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxq
from onnxq.quant.sim import quantize_with_encodings


def config() -> onnxq.QuantConfig:
    """``benchmarks/qat.py``'s W4A8 config with MSE weight ranges."""
    from benchmarks.qat import effnet_config

    base = effnet_config()
    return base.replace(weights=dataclasses.replace(base.weights, range_method="mse"))


def make_start(out: Path) -> None:
    from benchmarks.quantize import asset_path, calibration_batches

    sim = onnxq.quantize(asset_path("effnet-lite0-bn"), calibration_batches("effnet-lite0-bn", False),
                         config=config(), passes=["fold-bn"], adaround=True)
    sim.export(out, "effnet")
    onnxq.save(sim.fp32_model, out / "fp32.onnx", overwrite=True)


def pack_data(path: Path) -> None:
    from PIL import Image

    from benchmarks import datasets

    pixels, labels = datasets._imagenet_crops()
    blobs = []
    for im in pixels:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    np.savez(path, blob=np.concatenate(blobs), lens=np.array([len(b) for b in blobs]), labels=labels)


def load_data(path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if path is None:
        from benchmarks import datasets

        return datasets.imagenet_sample(0, 500)
    from PIL import Image

    d = np.load(path)
    offs = np.concatenate([[0], np.cumsum(d["lens"])])
    px = np.stack([np.asarray(Image.open(io.BytesIO(d["blob"][offs[i]:offs[i + 1]].tobytes())))
                   for i in range(len(d["lens"]))])
    images = np.ascontiguousarray(((px.astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2))
    return images, d["labels"]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def sweep(start: Path, data: Path | None, grid: list[dict], budget: float, device: str) -> list[dict]:
    import onnx_ir as ir

    from benchmarks.datasets import predictions
    from onnxq.train import TrainConfig, fit, prepare

    images, labels = load_data(data)
    calib, held, held_labels = images[:256], images[256:500], labels[256:500]
    fp32 = onnxq.load(start / "fp32.onnx")
    sim = quantize_with_encodings(onnxq.load(start / "effnet.float.onnx"), start / "effnet.encodings.json", config())
    sim = dataclasses.replace(sim, reference=fp32)

    ref = _log_softmax(predictions(fp32, held, 64))

    def score(model: ir.Model) -> dict[str, float]:
        q = predictions(model, held, 64)
        kl = float((np.exp(ref) * (ref - _log_softmax(q))).sum(1).mean())
        return {"top1": float((q.argmax(1) == held_labels).mean()), "kl": round(kl, 4)}

    rows = [{"row": "fp32", "top1": float((ref.argmax(1) == held_labels).mean())},
            {"row": "start", **score(sim.model)}]
    print(json.dumps(rows[0]), json.dumps(rows[1]), sep="\n", flush=True)
    t_all = time.time()
    for entry in grid:
        if time.time() - t_all > budget:
            rows.append({"row": "skipped", "spec": entry})
            print(json.dumps(rows[-1]), flush=True)
            continue
        spec = dict(entry)
        learn = spec.pop("learn_ranges", True)
        use_labels = spec.pop("labels", False)
        features = spec.pop("features", False)
        feature_weight = spec.pop("feature_weight", 1.0)
        only = spec.pop("only", "all")
        t0 = time.time()
        qat = prepare(sim, learn_ranges=learn, features=features, feature_weight=feature_weight)
        if only == "bias":  # biases (1-D parameters) only, the weights stay as PTQ left them
            biases = [p for p in qat.weight_parameters() if p.dim() == 1]
            for p in qat.weight_parameters():
                p.requires_grad_(p.dim() == 1)
            qat.weight_parameters = lambda biases=biases: biases
        tc = TrainConfig(**{"batch_size": 16, "lr": 5e-5, "range_lr": 5e-3, "shift": 0.06, "progress": False,
                            "device": device, **spec})
        hist = fit(qat, {"input": calib}, labels[:256] if use_labels else None, tc)
        spec.update({"features": features, "feature_weight": feature_weight} if features else {})
        spec.update({"only": only} if only != "all" else {})
        rows.append({"row": "qat", "spec": spec, "learn": learn, "labels": use_labels, **score(qat.to_sim().model),
                     "s": round(time.time() - t0, 1), "loss": round(hist[-1]["loss"], 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--make-start", type=Path)
    parser.add_argument("--pack-data", type=Path)
    parser.add_argument("--start", type=Path)
    parser.add_argument("--data", type=Path, help="JPEG pack from --pack-data (default: the shared images)")
    parser.add_argument("--grid", default='[{"epochs": 5}]')
    parser.add_argument("--budget", type=float, default=1e9)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if args.make_start:
        make_start(args.make_start)
    if args.pack_data:
        pack_data(args.pack_data)
    if args.start:
        rows = sweep(args.start, args.data, json.loads(args.grid), args.budget, args.device)
        if args.json:
            args.json.write_text(json.dumps({"device": args.device, "data": str(args.data or "shared"),
                                             "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
