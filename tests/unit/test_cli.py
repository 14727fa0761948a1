"""The CLI end to end: outputs written only on success, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
from conftest import max_rel_diff, model_from_text, random_feeds

from onnxq.cli import main

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,5,8,8] y)
  <float[6,3,3,3] w1, float[6] b1, float[5,6,1,1] w2, float[5] b2, float lo, float hi> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  c = Clip(a, lo, hi)
  y = Conv(c, w2, b2)
}"""


def make(tmp_path, name="in.onnx"):
    w1 = np.random.default_rng(0).standard_normal((6, 3, 3, 3)).astype(np.float32)
    w1 *= np.array([0.01, 0.1, 1, 5, 20, 0.5], np.float32).reshape(6, 1, 1, 1)
    model = model_from_text(TEXT, w1=w1, lo=np.float32(0), hi=np.float32(6))
    path = tmp_path / name
    ir.save(model, path)
    return path, model


def test_optimize_writes_an_equivalent_model(tmp_path, capsys):
    src, ref = make(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--passes", "cle"]) == 0
    text = capsys.readouterr().out
    assert "cle: 1 pairs equalized" in text and "wrote" in text
    assert max_rel_diff(ref, ir.load(out), random_feeds(ref)) <= 1e-5


def test_recipe_file(tmp_path):
    src, ref = make(tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text('version = 1\npasses = ["fold-bn", {name = "cle", max_iterations = 5}]\n')
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--recipe", str(recipe)]) == 0
    assert out.exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["optimize", "{src}", "-o", "{src}"], "refusing to overwrite the input"),
        (["optimize", "{missing}", "-o", "{out}"], "no such file"),
        (["optimize", "{src}", "-o", "{out}", "--passes", "fold-bn,nope"], "unknown pass"),
        (["optimize", "{src}", "-o", "{out}", "--passes", "cle:bogus=1"], "bad options"),
        (["optimize", "{junk}", "-o", "{out}"], "not a valid ONNX model"),
    ],
)
def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, words):
    src, _ = make(tmp_path)
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    before = src.read_bytes()
    names = dict(src=src, missing=tmp_path / "missing.onnx", out=tmp_path / "out.onnx", junk=junk)
    code = main([a.format(**names) for a in args])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("onnxq: error: ") and words in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()
    assert src.read_bytes() == before


def test_inspect_reports_spread_and_cle_effect(tmp_path, capsys):
    src, _ = make(tmp_path)
    js = tmp_path / "s.json"
    assert main(["inspect", str(src), "--passes", "cle", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "Conv 2" in out and "spread" in out and "before" in out
    data = json.loads(js.read_text())
    before = max(layer["spread"] for layer in data["before"]["layers"])
    after = max(layer["spread"] for layer in data["after"]["layers"])
    assert after < before


def test_python_m_entry_point(tmp_path):
    src, _ = make(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxq", "inspect", str(src)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "layers have a per-channel range spread" in proc.stdout


@pytest.mark.parametrize("method", ["mse", "sqnr", "batch-median"])
def test_quantize_from_npy_folder(tmp_path, capsys, method):
    src, ref = make(tmp_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    for i, batch in enumerate(batches):
        np.save(calib / f"{i:03d}.npy", batch)
    out = tmp_path / "q"
    code = main(["quantize", str(src), "--calib", str(calib), "--per-channel", "--range", method,
                 "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "in.qdq.onnx").exists() and (out / "in.encodings.json").exists()
    ops = [n.op_type for n in ir.load(out / "in.qdq.onnx").graph]
    assert "QuantizeLinear" in ops
    if method == "batch-median":  # the model input's grid spans the median batch's extremes
        data = json.loads((out / "in.encodings.json").read_text())
        enc = next(e for e in data["activation_encodings"] if e["name"] == "x")
        lo = enc["offset"][0] * enc["scale"][0]
        hi = lo + 255 * enc["scale"][0]
        step = enc["scale"][0]
        assert abs(lo - np.median([b.min() for b in batches])) <= step
        assert abs(hi - np.median([b.max() for b in batches])) <= step


def test_quantize_with_adaround_seq_mse_and_bias_correction(tmp_path, capsys):
    src, _ = make(tmp_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(calib / f"{i:03d}.npy", rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q"
    code = main(["quantize", str(src), "--calib", str(calib), "--per-channel", "--w-bits", "4",
                 "--seq-mse", "--adaround-iterations", "50", "--bias-correction", "empirical",
                 "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "in.encodings.json").read_text())
    frozen = [e for e in data["param_encodings"] if e.get("is_frozen")]
    assert frozen and all(e["bw"] == 4 for e in frozen)
    # a data step in a plain optimize recipe is refused with a reason
    assert main(["optimize", str(src), "--passes", "adaround", "-o", str(tmp_path / "o.onnx")]) == 1
    assert "needs calibration data" in capsys.readouterr().err


def test_quantize_with_asymmetric_weights(tmp_path, capsys):
    src, _ = make(tmp_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "0.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    for flag, out in (([], tmp_path / "sym"), (["--w-asymmetric"], tmp_path / "asym")):
        code = main(["quantize", str(src), "--calib", str(calib), "--per-channel", "--w-bits", "4",
                     *flag, "-o", str(out)])
        assert code == 0, capsys.readouterr().err
    params = lambda out: json.loads((out / "in.encodings.json").read_text())["param_encodings"]
    sym, asym = params(tmp_path / "sym"), params(tmp_path / "asym")
    assert all(e["is_sym"] for e in sym) and not any(any(e["offset"]) for e in sym if e["bw"] == 4)
    weights = [e for e in asym if e["bw"] == 4]
    assert weights and not any(e["is_sym"] for e in weights)
    assert len({o for e in weights for o in e["offset"]}) > 1  # channels with their own zero points
    # MSE weight ranges clip: a channel's grid is no wider than its min-max one, some narrower
    code = main(["quantize", str(src), "--calib", str(calib), "--per-channel", "--w-bits", "4",
                 "--w-asymmetric", "--w-range", "mse", "-o", str(tmp_path / "mse")])
    assert code == 0, capsys.readouterr().err
    mse = {e["name"]: e for e in params(tmp_path / "mse") if e["bw"] == 4}
    pairs = [(a, b) for e in weights for a, b in zip(mse[e["name"]]["scale"], e["scale"])]
    assert all(a <= b * (1 + 1e-6) for a, b in pairs) and any(a < b * 0.999 for a, b in pairs)


def test_quantize_with_bad_calibration_data(tmp_path, capsys):
    src, _ = make(tmp_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "0.npy", np.full((2, 3, 8, 8), np.nan, np.float32))
    code = main(["quantize", str(src), "--calib", str(calib), "-o", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 1 and "NaN" in err and "'x'" in err
    assert not (tmp_path / "q").exists()
