"""The torch executor runs ONNX graphs as onnxruntime does (float: |Δ| ≤ 1e-4·range)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import model_from_text

torch = pytest.importorskip("torch")

from onnxq.errors import UnsupportedModelError
from onnxq.runtime import run
from onnxq.train.executor import GraphModule
from onnxq.train.ops import OPS, lookup

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADER17 = '<ir_version: 8, opset_import: ["" : 17]>'
HEADER11 = '<ir_version: 7, opset_import: ["" : 11]>'

GRAPHS = {
    "conv_bn_clip_residual_head": (HEADER17 + """
        g (float[N,3,12,12] x) => (float[N,5] y)
          <float[8,3,3,3] w, float[8] b, float[8] s, float[8] beta, float[8] mean, float[8] var,
           float[8,1,3,3] dw, float[5,8] fc, float[5] fcb, float lo, float hi> {
            c = Conv <pads=[1,1,1,1]> (x, w, b)
            n = BatchNormalization <epsilon=1e-3> (c, s, beta, mean, var)
            r = Clip (n, lo, hi)
            d = Conv <group=8, pads=[1,1,1,1], strides=[1,1]> (r, dw)
            a = Add (d, r)
            p = GlobalAveragePool (a)
            f = Flatten (p)
            y = Gemm <transB=1> (f, fc, fcb)
        }""", {"lo": np.array(0.0), "hi": np.array(6.0)}),
    "attention_block": (HEADER17 + """
        g (float[N,6,16] x) => (float[N,6,16] y) <float[16,16] wq, float[16,16] wk, float[16] g1,
            float[16] b1, float[1] c> {
            q = MatMul (x, wq)
            k = MatMul (x, wk)
            kt = Transpose <perm=[0,2,1]> (k)
            s = MatMul (q, kt)
            sc = Div (s, c)
            p = Softmax <axis=-1> (sc)
            o = MatMul (p, x)
            e = Erf (o)
            h = Mul (o, e)
            y = LayerNormalization <axis=-1, epsilon=1e-5> (h, g1, b1)
        }""", {"c": np.array([4.0])}),
    "shape_arithmetic": (HEADER17 + """
        g (float[N,4,6] x) => (float[N,24] y) <int64[] i0, int64[1] ax, int64[1] m1> {
            s = Shape (x)
            n = Gather <axis=0> (s, i0)
            u = Unsqueeze (n, ax)
            shp = Concat <axis=0> (u, m1)
            y = Reshape (x, shp)
        }""", {"i0": np.array(0), "ax": np.array([0]), "m1": np.array([-1])}),
    "pools_resize_transpose_conv": (HEADER17 + """
        g (float[N,4,8,8] x) => (float[N,4,16,16] y, float[N,1,4,4] z)
          <float[4,4,2,2] wt, float[4] bt, float[4] roi, float[4] scales, int64[8] pads, float cval> {
            m = MaxPool <kernel_shape=[3,3], pads=[1,1,1,1], strides=[2,2]> (x)
            a = AveragePool <kernel_shape=[2,2], strides=[1,1]> (m)
            pd = Pad <mode="constant"> (a, pads, cval)
            hs = HardSigmoid <alpha=0.2, beta=0.5> (pd)
            up = Resize <mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"> (hs, roi, scales)
            ct = ConvTranspose <strides=[2,2], kernel_shape=[2,2]> (x, wt, bt)
            sg = Sigmoid (ct)
            y = Add (sg, up)
            z = ReduceMean <axes=[1], keepdims=1> (m) 
            }""", {"roi": np.zeros(4), "scales": np.array([1, 1, 4.0, 4.0]),
                   "pads": np.array([0, 0, 0, 0, 0, 0, 1, 1]), "cval": np.array(0.5)}),
    "slice_where_cast_pow": (HEADER17 + """
        g (float[N,8,5] x) => (float[N,4,5] y) <int64[1] st, int64[1] en, int64[1] ax, int64[1] sp,
            float two, float zero> {
            sl = Slice (x, st, en, ax, sp)
            p = Pow (sl, two)
            q = Sqrt (p)
            c = GreaterOrEqual (sl, zero)
            ci = Cast <to=6> (c)
            cf = Cast <to=1> (ci)
            w = Where (c, q, cf)
            n = Neg (w)
            y = Sub (w, n)
        }""", {"st": np.array([1]), "en": np.array([8]), "ax": np.array([1]), "sp": np.array([2]),
               "two": np.array(2.0), "zero": np.array(0.0)}),
    "opset11_semantics": (HEADER11 + """
        g (float[N,3,4,5] x) => (float[N,3,20] y, float[N,3,5] z) <float lo, float hi> {
            c = Clip (x, lo, hi)
            r = Reshape (c, shp)
            shp = Constant <value = int64[3] {0, 3, 20}> ()
            y = Softmax <axis=1> (r)
            m = ReduceMean <axes=[2], keepdims=0> (x)
            z = Squeeze <axes=[2]> (zz)
            zz = Unsqueeze <axes=[2]> (m)
        }""", {"lo": np.array(-0.5), "hi": np.array(0.7)}),
}


def _sorted(model):
    import onnx_ir as ir

    ir.passes.common.TopologicalSortPass()(model)
    return model


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_float_graph_matches_onnxruntime(name: str) -> None:
    text, arrays = GRAPHS[name]
    model = _sorted(model_from_text(text, **arrays))
    rng = np.random.default_rng(3)
    feeds = {v.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in v.shape])
             .astype(np.float32) for v in model.graph.inputs}
    want = run(model, feeds)
    got = GraphModule(model).run_numpy(feeds)
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        span = float(w.max() - w.min()) or 1.0
        assert float(np.abs(w - g).max()) <= 1e-4 * span, name


def test_weights_are_parameters_keyed_by_onnx_name_and_get_gradients() -> None:
    text, arrays = GRAPHS["conv_bn_clip_residual_head"]
    module = GraphModule(_sorted(model_from_text(text, **arrays)))
    names = set(module.named_onnx_parameters())
    assert {"w", "b", "s", "beta", "dw", "fc", "fcb"} <= names
    assert "mean" not in names and "var" not in names and "lo" not in names  # statistics, bounds
    out = module(torch.randn(2, 3, 12, 12))
    out.square().sum().backward()
    assert module.parameter("w").grad is not None and module.parameter("w").grad.abs().sum() > 0


def test_unsupported_op_names_node_op_and_opset() -> None:
    model = model_from_text(HEADER17 + """
        g (float[2,3] x) => (float[2,3] y) {
            t = Relu (x)
            y = Einsum <equation="ij->ij"> (t)
        }""")
    model.graph.node(1).name = "the_einsum"
    with pytest.raises(UnsupportedModelError) as err:
        GraphModule(model)
    message = str(err.value)
    assert "the_einsum" in message and "Einsum" in message and "opset 17" in message
    assert "\n" not in message


def test_unsupported_attribute_is_reported_before_running() -> None:
    model = model_from_text(HEADER17 + """
        g (float[1,1,4,4] x) => (float[1,1,8,8] y) <float[4] roi, float[4] scales> {
            y = Resize <mode="cubic"> (x, roi, scales)
        }""", roi=np.zeros(4), scales=np.array([1, 1, 2.0, 2.0]))
    with pytest.raises(UnsupportedModelError, match="cubic"):
        GraphModule(model)


def test_registry_is_keyed_by_domain_and_opset() -> None:
    assert ("", "Conv") in OPS and ("", "QuantizeLinear") not in OPS  # Q/DQ: the executor's own
    assert not isinstance(lookup("", "Softmax", 11), str)
    assert lookup("", "Softmax", 11) is not lookup("", "Softmax", 13)
    assert isinstance(lookup("com.microsoft", "Conv", 1), str)


def test_wrong_input_name_is_a_clear_error() -> None:
    text, arrays = GRAPHS["shape_arithmetic"]
    module = GraphModule(_sorted(model_from_text(text, **arrays)))
    with pytest.raises(ValueError, match="missing model input"):
        module({"not_x": torch.zeros(1, 4, 6)})
