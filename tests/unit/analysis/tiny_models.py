"""Tiny models and data for the analyzer tests (built in code, a few KB each)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import model_from_text

#: Conv → Clip(0, 6) → depthwise Conv → Relu → Conv → GAP → Flatten → Gemm
CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,5] y)
  <float[8,3,3,3] w1, float[8] b1, float lo, float hi, float[8,1,3,3] w2, float[8] b2,
   float[6,8,1,1] w3, float[6] b3, float[6,5] wf, float[5] bf> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Clip(a, lo, hi)
  c = Conv<pads=[1,1,1,1], group=8>(r, w2, b2)
  r2 = Relu(c)
  d = Conv(r2, w3, b3)
  p = GlobalAveragePool(d)
  f = Flatten(p)
  y = Gemm(f, wf, bf)
}"""

#: Conv → Relu → GAP → Flatten → Gemm whose output columns (classes) span 3000x in scale: per-tensor
#: INT8 weights zero the narrow columns; the classifier's outputs are not quantized
CLASSIFIER = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,5] y)
  <float[8,3,3,3] w1, float[8] b1, float[8,5] wf, float[5] bf> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(a)
  p = GlobalAveragePool(r)
  f = Flatten(p)
  y = Gemm(f, wf, bf)
}"""

CLASS_SCALES = np.array([0.01, 0.02, 1.0, 30.0, 0.05], np.float32)


def _named(model: ir.Model) -> ir.Model:
    for i, node in enumerate(model.graph):
        node.name = f"{node.op_type.lower()}_{i}"
    return model


def chain_model() -> ir.Model:
    return _named(model_from_text(CHAIN, lo=np.float32(0), hi=np.float32(6)))


def classifier_model() -> ir.Model:
    rng = np.random.default_rng(0)
    wf = rng.standard_normal((8, 5)).astype(np.float32) * CLASS_SCALES
    return _named(model_from_text(CLASSIFIER, wf=wf, bf=np.zeros(5, np.float32)))


def batches(count: int, size: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((size, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


_LABELS: dict[str, np.ndarray] = {}


def classifier_eval(session) -> dict[str, float]:
    """A user evaluation: argmax of the class-normalized scores y / scale, against FP32's, on
    128 samples (``acc``), plus an unrelated number the analysis must ignore."""
    x = batches(1, size=128, seed=7)[0]["x"]
    if "labels" not in _LABELS:
        from onnxq.runtime import create_session

        ref = create_session(classifier_model()).run(None, {"x": x})[0]
        _LABELS["labels"] = (ref / CLASS_SCALES).argmax(-1)
    pred = (session.run(None, {"x": x})[0] / CLASS_SCALES).argmax(-1)
    return {"acc": float(np.mean(pred == _LABELS["labels"])), "other": 0.0}

