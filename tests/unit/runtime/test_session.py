"""Sessions built from an IR model: large weights are shared with onnxruntime, not serialized."""

import gc

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxq
from onnxq.runtime.session import create_session, session_from_model
from tests.conftest import model_from_text

CONV = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8,6,6] x) => (float[N,16,6,6] y) <float[16,8,3,3] w, float[16] b> {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Relu (c)
    }"""


def _serialized(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)


def test_shared_weights_give_the_serialized_models_outputs_and_leave_the_model_as_it_was():
    model = model_from_text(CONV)
    tensors = {n: v.const_value for n, v in model.graph.initializers.items()}
    session = session_from_model(model, ort.SessionOptions())
    assert len(session._onnxq_shared) == 1  # w (4.6 kB) is shared, b (64 bytes) serialized
    assert {n: v.const_value for n, v in model.graph.initializers.items()} == tensors
    want = _serialized(model).run(None, {"x": _x()})[0]
    np.testing.assert_array_equal(session.run(None, {"x": _x()})[0], want)


def test_the_session_outlives_the_model():
    # an element-wise constant is read from the shared buffer as it is (a Conv weight would be
    # repacked into onnxruntime's own memory): the buffer must live as long as the session
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,65536] x) => (float[N,65536] y) <float[65536] k> {
            y = Mul (x, k)
        }""")
    x = np.random.default_rng(1).standard_normal((2, 65536)).astype(np.float32)
    want = x * model.graph.initializers["k"].const_value.numpy()
    session = create_session(model)
    del model
    gc.collect()
    junk = [np.full(65536, 7.0, np.float32) for _ in range(64)]  # reuse the freed memory, if any
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], want)
    assert len(junk) == 64


def test_a_model_with_external_data_is_read_from_its_file(tmp_path):
    model = model_from_text(CONV)
    want = _serialized(model).run(None, {"x": _x()})[0]
    ir.save(model, tmp_path / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    loaded = onnxq.load(tmp_path / "m.onnx")
    assert isinstance(loaded.graph.initializers["w"].const_value, ir.ExternalTensor)
    got = session_from_model(loaded, ort.SessionOptions()).run(None, {"x": _x()})[0]
    np.testing.assert_array_equal(got, want)
    assert isinstance(loaded.graph.initializers["w"].const_value, ir.ExternalTensor)


def test_a_model_onnxruntime_refuses_is_restored_too():
    model = model_from_text(CONV.replace("Relu (c)", "Relu <bogus = 1> (c)"))
    tensors = {n: v.const_value for n, v in model.graph.initializers.items()}
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error types
        create_session(model)
    assert {n: v.const_value for n, v in model.graph.initializers.items()} == tensors
