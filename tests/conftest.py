"""Shared fixtures: tiny models built from ONNX text, and output comparison under onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from onnxq.runtime import run


def conv_classifier_text(side: int = 12) -> str:
    """Conv-ReLU ×3 → GlobalAveragePool → Gemm on ``[N, 3, side, side]`` images (10 classes): the
    small network the compression and distillation tests prune and train."""
    return f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,{side},{side}] x) => (float[N,10] y)
  <float[16,3,3,3] w1, float[16] b1, float[24,16,3,3] w2, float[24] b2, float[32,24,1,1] w3,
   float[32] b3, float[10,32] wg, float[10] bg> {{
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(a)
  c = Conv<pads=[1,1,1,1]>(r, w2, b2)
  r2 = Relu(c)
  d = Conv(r2, w3, b3)
  r3 = Relu(d)
  p = GlobalAveragePool(r3)
  f = Flatten(p)
  y = Gemm<transB=1>(f, wg, bg)
}}"""


def model_from_text(text: str, seed: int = 0, **arrays: np.ndarray) -> ir.Model:
    """Parse ONNX text; the names declared in the graph's ``<...>`` header become initializers.

    E.g. ``g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w, float[4] b> {...}``.
    Values come from ``arrays`` when given, else normal(0, 1) (names containing ``var`` get
    |normal| + 0.5 so a BatchNorm variance stays positive).
    """
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    produced = {o for n in proto.graph.node for o in n.output}
    keep = []
    for vi in proto.graph.value_info:
        if vi.name in produced:
            keep.append(vi)
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.name in arrays:
            data = np.asarray(arrays[vi.name], dtype=dtype).reshape(shape)
        else:
            data = rng.standard_normal(shape).astype(dtype)
            if "var" in vi.name:
                data = np.abs(data) + 0.5
        proto.graph.initializer.append(onnx.numpy_helper.from_array(data, vi.name))
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)
    return ir.serde.deserialize_model(proto)


def random_feeds(model: ir.Model, seed: int = 1, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.inputs:
        shape = [d if isinstance(d, int) else batch for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(inp.dtype.numpy())
    return feeds


def max_rel_diff(a: ir.Model, b: ir.Model, feeds: dict[str, np.ndarray]) -> float:
    """max |Δ| over all outputs divided by the reference output's range (ORT, no optimizations)."""
    worst = 0.0
    for x, y in zip(run(a, feeds), run(b, feeds)):
        scale = float(np.max(x) - np.min(x)) or 1.0
        worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))) / scale)
    return worst


@pytest.fixture
def assert_equivalent():
    def check(a: ir.Model, b: ir.Model, feeds=None, tol: float = 1e-5) -> float:
        feeds = feeds if feeds is not None else random_feeds(a)
        diff = max_rel_diff(a, b, feeds)
        assert diff <= tol, f"outputs differ: max |Δ| / range = {diff:.3g} > {tol}"
        return diff

    return check


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (``pytest.mark.usefixtures``): on tiny tensors a second
    OpenMP thread only spin-waits, much slower on a shared machine."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
