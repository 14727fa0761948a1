"""The public surface is pinned: changing it is a deliberate act."""

import subprocess
import sys

import onnxq


def test_public_api_is_pinned():
    assert sorted(onnxq.__all__) == sorted([
        "__version__", "load", "save", "optimize", "inspect", "quantize", "analyze", "QuantConfig", "QuantSpec",
        "Recipe", "PassSpec",
        "OnnxqError", "ModelLoadError", "ModelSaveError", "UnsupportedModelError", "ConfigError",
    ])
    for name in onnxq.__all__:
        assert hasattr(onnxq, name)


def test_import_is_light():
    code = (
        "import sys, onnxq; heavy = [m for m in ('torch', 'matplotlib', 'ray', 'onnxruntime')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
