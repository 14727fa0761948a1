"""``onnxq qat``: flags → quantize → distill → export; bad data fails with one line, no output."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import model_from_text

torch = pytest.importorskip("torch")

import onnxq
from onnxq.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] image) => (float[N,10] logits)
  <float[8,3,3,3] w1, float[8] b1, float[10,8] fc, float[10] fcb> {
    c1 = Conv <pads=[1,1,1,1]> (image, w1, b1)
    r1 = Relu (c1)
    p = GlobalAveragePool (r1)
    f = Flatten (p)
    logits = Gemm <transB=1> (f, fc, fcb)
}"""


@pytest.fixture()
def files(tmp_path):
    model = tmp_path / "tiny.onnx"
    onnxq.save(model_from_text(TINY, seed=2), model)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(data / f"batch{i}.npy", rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    labels = tmp_path / "labels.npy"
    np.save(labels, rng.integers(0, 10, 32))
    return model, data, labels, tmp_path / "out"


def test_qat_command_writes_the_trained_model(files, capsys) -> None:
    model, data, labels, out = files
    code = main(["qat", str(model), "--data", str(data), "--labels", str(labels), "--epochs", "2",
                 "--batch-size", "8", "--per-channel", "--w-bits", "4", "--a-bits", "8",
                 "--validation", "0.25", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "tiny.qdq.onnx").is_file() and (out / "tiny.encodings.json").is_file()
    assert (out / "checkpoints" / "last.pt").is_file()
    history = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["history"]
    assert len(history) == 2 and all(np.isfinite(h["val_loss"]) for h in history)
    qdq = onnxq.load(out / "tiny.qdq.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in qdq.graph)
    assert "trained" in capsys.readouterr().out


def test_qat_command_with_wrong_data_fails_in_one_line(files, capsys, tmp_path) -> None:
    model, _, _, out = files
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "b.npy", np.zeros((4, 1, 8, 8), np.float32))  # one channel, not three
    code = main(["qat", str(model), "--data", str(bad), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("onnxq: error:") and "\n" not in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a CUDA GPU")
def test_qat_command_on_a_missing_gpu_fails_in_one_line_and_writes_nothing(files, capsys) -> None:
    model, data, _, out = files
    code = main(["qat", str(model), "--data", str(data), "--device", "cuda", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("onnxq: error:") and "\n" not in err
    assert "'cuda'" in err and "no CUDA GPU" in err
    assert not out.exists()


def test_held_out_samples_stay_out_of_calibration(files, monkeypatch) -> None:
    from onnxq.train import TrainConfig, run_qat
    from onnxq.train.loop import validation_split

    model, data, _, out = files
    arrays = np.concatenate([np.load(data / f"batch{i}.npy") for i in range(2)])
    seen = []
    real = onnxq.quantize

    def spy(float_model, calib, *args, **kwargs):
        seen.extend(b["image"] for b in calib)
        return real(float_model, calib, *args, **kwargs)

    monkeypatch.setattr(onnxq, "quantize", spy)
    cfg = TrainConfig(epochs=1, batch_size=8, validation=0.25, seed=5, progress=False)
    run_qat(str(model), {"image": arrays}, out, train=cfg)
    held, keep = validation_split(len(arrays), cfg)
    calibrated = np.concatenate(seen)
    np.testing.assert_array_equal(calibrated, arrays[keep])
    assert not any(np.array_equal(arrays[i], c) for i in held for c in calibrated)


def test_features_flag_adds_the_layer_outputs_to_the_loss(files, capsys) -> None:
    model, data, _, out = files

    def first_loss(*extra: str) -> float:  # lr 0: the logged loss is the loss of the start
        target = out.parent / f"out{len(extra)}"
        code = main(["qat", str(model), "--data", str(data), "--epochs", "1", "--batch-size", "16",
                     "--lr", "0", "--range-lr", "0", "--no-augment", "-o", str(target), *extra])
        assert code == 0, capsys.readouterr().err
        assert [v.name for v in onnxq.load(target / "tiny.qdq.onnx").graph.outputs] == ["logits"]
        return torch.load(target / "checkpoints" / "last.pt", weights_only=False)["history"][0]["loss"]

    assert first_loss("--features", "2") > first_loss() > 0
