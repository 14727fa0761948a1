"""The QAT executor on the suite's real models: float output equals onnxruntime's
(max |Δ| ≤ 1e-4 × output range), and the QDQ form agrees with onnxruntime's QDQ execution.

Assets come from the cache (``python -m benchmarks.assets fetch ...``) and skip when absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnxq
from benchmarks import assets
from onnxq.runtime import run
from onnxq.train import prepare
from onnxq.train.executor import GraphModule

pytestmark = pytest.mark.integration
DEMO = Path(onnxq.__file__).parent / "demo" / "fashion_mnv2.onnx"
RESNET = Path(__file__).resolve().parents[2] / "models" / "fashion_resnet" / "fashion_resnet.onnx"


def _page(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A white page with dark text-like bars (the detector's output is flat on noise)."""
    rng = np.random.default_rng(seed)
    img = np.ones((1, 3, h, w), np.float32)
    for _ in range(12):
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 60)
        img[:, :, y:y + rng.integers(6, 12), x:x + rng.integers(20, 60)] = 0.1
    return (img - 0.5) / 0.5


def feeds_for(asset_id: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if asset_id in ("effnet-lite0", "effnet-lite0-bn"):
        return {"input": rng.standard_normal((2, 3, 224, 224)).astype(np.float32)}
    if asset_id == "ppocr-rec":
        return {"x": rng.uniform(-1, 1, (2, 3, 48, 320)).astype(np.float32)}
    if asset_id == "ppocr-cls":
        return {"x": rng.uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)}
    if asset_id == "ppocr-det":
        return {"x": _page(160, 192)}
    mask = np.ones((2, 16), np.int64)
    mask[1, 12:] = 0
    return {"input_ids": rng.integers(0, 30000, (2, 16)).astype(np.int64),
            "attention_mask": mask, "token_type_ids": np.zeros((2, 16), np.int64)}


def _check_float(model, feeds) -> None:
    want = run(model, feeds)
    got = GraphModule(model).run_numpy(feeds)
    for w, g in zip(want, got):
        span = float(w.max() - w.min())
        assert span > 0
        assert float(np.abs(w - g).max()) <= 1e-4 * span


@pytest.mark.parametrize("asset_id", ["effnet-lite0", "effnet-lite0-bn", "ppocr-rec", "ppocr-det",
                                      "ppocr-cls", "minilm"])
def test_float_executor_matches_onnxruntime(asset_id: str) -> None:
    path = assets.require(asset_id)
    _check_float(onnxq.load(path), feeds_for(asset_id))


@pytest.mark.parametrize("path", [DEMO, RESNET], ids=["fashion_mnv2", "fashion_resnet"])
def test_fashion_models_float(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path} missing: python models/fashion_resnet/train.py")
    x = np.random.default_rng(0).uniform(-1, 1, (8, 1, 28, 28)).astype(np.float32)
    _check_float(onnxq.load(path), {"image": x})


@pytest.mark.parametrize("asset_id", ["ppocr-rec", "effnet-lite0"])
def test_qdq_executor_agrees_with_onnxruntime(asset_id: str) -> None:
    path = assets.require(asset_id)
    feeds = feeds_for(asset_id)
    name = next(iter(feeds))
    calib = [{name: feeds[name]}]
    sim = onnxq.quantize(path, calib, "per-channel", passes="fold-bn")
    want = run(sim.model, feeds)[0]
    got = prepare(sim).graph.run_numpy(feeds)[0]
    err = np.sum((want.astype(np.float64) - got) ** 2)
    sqnr = 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / max(err, 1e-30))
    assert sqnr > 30, f"torch vs onnxruntime QDQ: SQNR {sqnr:.1f} dB"
    assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.99
