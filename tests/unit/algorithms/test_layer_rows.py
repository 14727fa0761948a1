"""Row view of weight layers: W·patch + b at sampled positions equals the op's output."""

import numpy as np
import pytest

from onnxq.algorithms._layers import Activation, find_layers
from onnxq.runtime import run
from tests.conftest import model_from_text, random_feeds

CASES = {
    "conv-stride-pad-dilation": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,11,9] x) => (float[N,6,5,4] y) <float[6,4,3,3] w, float[6] b> {
            y = Conv <strides = [2, 2], pads = [1, 0, 1, 1], dilations = [1, 2]> (x, w, b)
        }""",
    "conv-grouped": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,8,8] x) => (float[N,6,8,8] y) <float[6,2,3,3] w, float[6] b> {
            y = Conv <group = 2, pads = [1, 1, 1, 1]> (x, w, b)
        }""",
    "conv-depthwise-1d": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,5,13] x) => (float[N,5,7] y) <float[5,1,3] w, float[5] b> {
            y = Conv <group = 5, strides = [2], pads = [1, 1]> (x, w, b)
        }""",
    "conv-transpose": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,5,6] x) => (float[N,6,10,12] y) <float[4,3,3,3] w, float[6] b> {
            y = ConvTranspose <group = 2, strides = [2, 2], pads = [1, 1, 0, 0], output_padding = [1, 1]> (x, w, b)
        }""",
    "gemm-transA": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[7,N] x) => (float[N,5] y) <float[5,7] w, float[5] b> {
            y = Gemm <transA = 1, transB = 1, alpha = 0.5> (x, w, b)
        }""",
    "matmul-3d-add": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,6] x) => (float[N,3,4] y) <float[6,4] w, float[4] b> {
            t = MatMul (x, w)
            y = Add (t, b)
        }""",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_reproduce_the_op(case):
    model = model_from_text(CASES[case])
    (layer,), skipped = find_layers(model)
    assert not skipped
    feeds = random_feeds(model, batch=3)
    (y,) = run(model, feeds)
    x = next(iter(feeds.values()))
    rng = np.random.default_rng(0)
    pos = layer.positions(y.shape, 40, rng)
    rows = layer.input_rows(x, y.shape, pos)
    w = layer.weight_matrix()
    g, o, k = w.shape
    pred = np.einsum("rgk,gok->rgo", rows, w).reshape(len(pos), g * o) + layer.bias()
    np.testing.assert_allclose(pred, layer.output_rows(y, pos), rtol=1e-4, atol=1e-4)


def test_activation_found_with_its_parameters():
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2,4,4] x) => (float[N,3,4,4] y) <float[3,2,1,1] w, float[3] b, float[3,1,1] slope> {
            t = Conv (x, w, b)
            y = PRelu (t, slope)
        }""")
    (layer,), _ = find_layers(model)
    assert layer.activation.kind == "prelu"
    np.testing.assert_allclose(layer.activation.params[0], model.graph.initializers["slope"].const_value.numpy().reshape(-1))


def test_swish_pattern_and_clip_bounds():
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2,4,4] x) => (float[N,3,4,4] y) <float[3,2,1,1] w, float[3,3,1,1] w2, float lo, float hi> {
            t = Conv (x, w)
            s = Sigmoid (t)
            u = Mul (t, s)
            v = Conv (u, w2)
            y = Clip (v, lo, hi)
        }""", lo=np.float32(0.0), hi=np.float32(6.0))
    first, second = find_layers(model)[0]
    assert first.activation.kind == "swish"
    assert second.activation == Activation("clip", (0.0, 6.0))


@pytest.mark.parametrize("act", [
    Activation("relu"), Activation("clip", (-1.0, 2.0)), Activation("leaky_relu", (0.1,)),
    Activation("hard_sigmoid", (0.2, 0.5)), Activation("hard_swish", (1 / 6, 0.5)),
    Activation("sigmoid"), Activation("swish"), Activation("prelu", (np.array([0.1, -0.2, 0.3], np.float32),)),
])
def test_activation_gradients_match_finite_differences(act):
    rng = np.random.default_rng(0)
    y = rng.uniform(-8, 8, size=(200, 3))
    y = y[np.abs(y - np.round(y)) > 1e-3]  # away from kinks at integers/0 for piecewise ones
    y = y[: (len(y) // 3) * 3].reshape(-1, 3)
    eps = 1e-6
    numeric = (act(y + eps) - act(y - eps)) / (2 * eps)
    np.testing.assert_allclose(act.grad(y), numeric, atol=1e-5)


def test_targets_are_taken_after_the_activation():
    from onnxq.algorithms._capture import RowStore, capture_targets

    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2,5,5] x) => (float[N,3,5,5] y) <float[3,2,3,3] w, float[3] b> {
            t = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = Relu (t)
        }""")
    layers, _ = find_layers(model)
    feeds = random_feeds(model, batch=4)
    with RowStore(2**20) as store:
        samples = capture_targets(model, layers, [feeds], 30, store, seed=0)
        target = store.get(f"{layers[0].name}/target")
        (y,) = run(model, feeds)
        np.testing.assert_allclose(target, layers[0].output_rows(y, samples[layers[0].name].positions[0]), atol=1e-6)
        assert target.min() >= 0


MASKED = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,L,4] x, int64[N,L] attention_mask) => (float[N,L,3] y) <float[4,3] w> {
        y = MatMul (x, w)
    }"""


def test_rows_are_drawn_only_where_the_mask_marks_data():
    from onnxq.algorithms._capture import RowStore, capture_targets

    model = model_from_text(MASKED)
    layers, _ = find_layers(model)
    rng = np.random.default_rng(1)
    mask = np.zeros((3, 10), np.int64)
    for i, n in enumerate((10, 4, 7)):  # three texts of 10, 4 and 7 tokens, padded to 10
        mask[i, :n] = 1
    feeds = {"x": rng.standard_normal((3, 10, 4)).astype(np.float32), "attention_mask": mask}
    data = set(np.flatnonzero(mask.reshape(-1)).tolist())
    for rows, row_mask in ((15, "attention_mask"), (500, "attention_mask"), (30, None)):
        with RowStore(2**20) as store:
            samples = capture_targets(model, layers, [feeds], rows, store, seed=0, row_mask=row_mask)
        pos = samples[layers[0].name].positions[0]
        assert len(set(pos.tolist())) == len(pos)
        if row_mask is None:
            assert len(pos) == 30 and not set(pos.tolist()) <= data  # padding is drawn too
        else:
            assert set(pos.tolist()) <= data and len(pos) == min(rows, len(data))


def test_the_padding_mask_is_found_by_name_or_named():
    from onnxq.algorithms._capture import find_row_mask
    from onnxq.errors import ConfigError

    model = model_from_text(MASKED)
    assert find_row_mask(model, "auto") == "attention_mask"
    assert find_row_mask(model, None) is None
    assert find_row_mask(model, "attention_mask") == "attention_mask"
    with pytest.raises(ConfigError, match="not an input"):
        find_row_mask(model, "input_mask")
    plain = model_from_text(CASES["conv-grouped"])
    assert find_row_mask(plain, "auto") is None
