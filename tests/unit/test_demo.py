"""`onnxq demo` runs offline on the bundled model and writes a quantized model."""

import onnxq
from onnxq.demo import bundled_model, bundled_test_set, run_demo


def test_bundled_assets_are_packaged():
    images, labels = bundled_test_set()
    assert images.shape[1:] == (1, 28, 28) and len(images) == len(labels) >= 1000
    model = onnxq.load(bundled_model())
    assert onnxq.inspect(model).op_counts["BatchNormalization"] > 0


def test_demo_end_to_end(tmp_path):
    lines = []
    results = run_demo(tmp_path, echo=lines.append)
    assert results["FP32"] > 0.85
    assert results["INT8 per-channel (BN folded)"] > results["FP32"] - 0.02
    assert (tmp_path / "fashion_mnv2.dfq.qdq.onnx").exists()
    assert any("cle:" in line for line in lines)
