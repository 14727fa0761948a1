"""Fake quantization: bit for bit equal to onnxruntime's Q/DQ; STE and LSQ gradients."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from onnxq.train import fake_quant as fq
from onnxq.train.executor import Quantizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRIDS = {  # onnx type, (qmin, qmax)
    "int4": (TensorProto.INT4, (-8, 7)),
    "uint4": (TensorProto.UINT4, (0, 15)),
    "int8": (TensorProto.INT8, (-128, 127)),
    "uint8": (TensorProto.UINT8, (0, 255)),
    "int16": (TensorProto.INT16, (-32768, 32767)),
    "uint16": (TensorProto.UINT16, (0, 65535)),
}


def ort_qdq(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, dtype: int,
            axis: int | None) -> np.ndarray:
    """onnxruntime's DequantizeLinear(QuantizeLinear(x)) (opset 21, no graph optimizations)."""
    import onnxruntime as ort

    attrs = {"axis": axis} if axis is not None else {}
    zero_t = helper.make_tensor("z", dtype, list(zero.shape), zero.reshape(-1).tolist())
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [onnx.numpy_helper.from_array(scale.astype(np.float32), "s"), zero_t],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("axis", [None, 1])
def test_forward_equals_onnxruntime_bit_for_bit(grid: str, axis: int | None) -> None:
    dtype, (qmin, qmax) = GRIDS[grid]
    rng = np.random.default_rng(7)
    channels = 5
    x = (rng.standard_normal((4, channels, 6, 7)) * 3).astype(np.float32)
    shape = (channels,) if axis is not None else ()
    scale = np.asarray(rng.uniform(0.5, 2.0, shape) * 6 / (qmax - qmin), np.float32)
    zero = rng.integers(qmin, qmax + 1, shape) if qmin == 0 else np.zeros(shape, np.int64)
    # exact ties: x / s = k + 0.5 must round to even, and far outside the grid must saturate
    s_b = fq.channel_shape(torch.from_numpy(scale), 4, axis).numpy()
    x[0, :, 0, :4] = ((np.arange(4) - 2 + 0.5)[None, :] * s_b.reshape(-1, 1)).astype(np.float32)
    x[1, :, 1, :2] = np.array([1e4, -1e4], np.float32)
    want = ort_qdq(x, scale, zero, dtype, axis)
    got = fq.fake_quantize(torch.from_numpy(x), torch.from_numpy(np.asarray(scale)),
                           torch.from_numpy(np.asarray(zero, np.float32)), qmin, qmax, axis).numpy()
    assert np.array_equal(got, want), f"{np.sum(got != want)} of {got.size} differ"


def surrogate(x: torch.Tensor, s: torch.Tensor, z: float, qmin: int, qmax: int,
              residual: torch.Tensor) -> torch.Tensor:
    """The STE's surrogate: round(u) replaced by u + (round(u₀) − u₀) with the residual held
    at the evaluation point; its ordinary derivatives are the gradients the STE defines."""
    return (torch.clamp(x / s + residual + z, qmin, qmax) - z) * s


@pytest.mark.parametrize("zero", [0.0, 7.0])
def test_gradients_against_finite_differences(zero: float) -> None:
    qmin, qmax = (-8, 7) if zero == 0 else (0, 15)
    # no input lands exactly on the edge of the grid (the clamp has no derivative there)
    x = torch.tensor([-3.1, -0.73, 0.2, 0.49, 1.3, 2.2, 9.0, -12.0], dtype=torch.float64)
    s0 = 0.35
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    xs = x.clone().requires_grad_(True)
    z = torch.tensor(zero, dtype=torch.float64, requires_grad=True)
    y = fq.fake_quantize(xs, s, z, qmin, qmax)
    weights = torch.linspace(0.5, 1.5, len(x), dtype=torch.float64)
    (y * weights).sum().backward()

    residual = torch.round(x / s0) - x / s0
    eps = 1e-6

    def loss(xv: torch.Tensor, sv: float, zv: float) -> float:
        return float((surrogate(xv, torch.tensor(sv, dtype=torch.float64), zv, qmin, qmax,
                                residual) * weights).sum())

    fd_s = (loss(x, s0 + eps, zero) - loss(x, s0 - eps, zero)) / (2 * eps)
    assert s.grad is not None and abs(float(s.grad) - fd_s) < 1e-6 * max(1.0, abs(fd_s))
    for i in range(len(x)):
        dx = torch.zeros_like(x)
        dx[i] = eps
        fd_x = (loss(x + dx, s0, zero) - loss(x - dx, s0, zero)) / (2 * eps)
        assert xs.grad is not None and abs(float(xs.grad[i]) - fd_x) < 1e-6
    # clipped inputs: the surrogate is the true function there, d x̂/ds = qmax − z or qmin − z
    assert float(xs.grad[-1]) == 0.0 and float(xs.grad[-2]) == 0.0
    # STE inside the grid: d x̂/dx = 1
    assert float(xs.grad[2]) == pytest.approx(float(weights[2]))
    fd_z = (loss(x, s0, zero + eps) - loss(x, s0, zero - eps)) / (2 * eps)
    assert z.grad is not None and abs(float(z.grad) - fd_z) < 1e-6


def test_lsq_scale_gradient_closed_form() -> None:
    """∂x̂/∂s = round(x/s) − x/s inside, qmax − z / qmin − z outside (LSQ)."""
    x = torch.tensor([0.26, -0.61, 5.0, -5.0])
    s = torch.tensor(0.1, requires_grad=True)
    grads = []
    for i in range(len(x)):
        s.grad = None
        fq.fake_quantize(x[i:i + 1], s, torch.tensor(0.0), -8, 7).sum().backward()
        grads.append(float(s.grad))
    assert grads[0] == pytest.approx(float(torch.round(x[0] / 0.1) - x[0] / 0.1), abs=1e-5)
    assert grads[1] == pytest.approx(float(torch.round(x[1] / 0.1) - x[1] / 0.1), abs=1e-5)
    assert grads[2] == pytest.approx(7.0) and grads[3] == pytest.approx(-8.0)


def test_range_learning_shrinks_a_too_wide_range() -> None:
    """A 4-bit grid calibrated 20x too wide: learning the scale lowers the error a lot."""
    torch.manual_seed(0)
    x = torch.randn(4096)
    too_wide = float(x.abs().max()) * 20 / 7
    q = Quantizer("x", np.array(too_wide, np.float32), np.array(0.0, np.float32), -8, 7, None,
                  "activation")
    q.set_learnable(True)
    opt = torch.optim.Adam([q.log_scale], lr=0.05)
    start = float(((q(x) - x) ** 2).mean().detach())
    for _ in range(200):
        loss = ((q(x) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = float(((q(x) - x) ** 2).mean().detach())
    assert float(q.scale()) < too_wide / 5
    assert end < start / 20


def test_untrained_quantizer_keeps_the_stored_scale_exactly() -> None:
    q = Quantizer("w", np.array([0.1, 0.3], np.float32), np.zeros(2, np.float32), -8, 7, 0, "param")
    q.set_learnable(True)
    assert torch.equal(q.scale(), torch.tensor([0.1, 0.3], dtype=torch.float32))
    q.frozen = True
    q.set_learnable(True)
    assert not q.log_scale.requires_grad
