"""prepare → train → export: the trained QDQ model is the torch simulation, in onnxruntime."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import model_from_text

torch = pytest.importorskip("torch")

import onnxq
from onnxq.errors import ConfigError, UnsupportedModelError
from onnxq.quant.config import QuantConfig, QuantSpec
from onnxq.runtime import run
from onnxq.train import TrainConfig, fit, prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] image) => (float[N,10] logits)
  <float[8,3,3,3] w1, float[8] b1, float[8,8,3,3] w2, float[8] b2, float[10,8] fc, float[10] fcb> {
    c1 = Conv <pads=[1,1,1,1]> (image, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
    a = Add (c2, r1)
    r2 = Relu (a)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    logits = Gemm <transB=1> (f, fc, fcb)
}"""
W4A4 = QuantConfig(weights=QuantSpec(bits=4, symmetric=True, per_channel=True),
                   activations=QuantSpec(bits=4))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((96, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def sim(data):
    model = model_from_text(TINY, seed=1)
    return onnxq.quantize(model, [{"image": data[i:i + 32]} for i in range(0, 96, 32)], W4A4)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) /
                               max(np.sum((ref.astype(np.float64) - got) ** 2), 1e-30)))


def test_untrained_module_is_the_qdq_model(sim, data) -> None:
    qat = prepare(sim, learn_ranges=True)
    want = run(sim.model, {"image": data})[0]
    got = qat.graph.run_numpy({"image": data})[0]
    assert (want.argmax(1) == got.argmax(1)).mean() >= 0.99
    assert sqnr_db(want, got) > 40


def test_export_without_training_rebuilds_the_same_model(sim, tmp_path) -> None:
    qat = prepare(sim, learn_ranges=True)
    again = qat.to_sim()
    a, b = sim.model.graph.initializers, again.model.graph.initializers
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name].const_value.numpy(), b[name].const_value.numpy()), name
    assert [(e.name, e.scale, e.zero_point) for e in sim.encodings] == \
        [(e.name, e.scale, e.zero_point) for e in again.encodings]


def test_training_then_export_agrees_with_onnxruntime(sim, data, tmp_path) -> None:
    qat = prepare(sim, learn_ranges=True)
    before = {q.name: q.scale().detach().clone() for q in qat.quantizers()}
    fit(qat, {"image": data}, None, TrainConfig(epochs=2, batch_size=16, lr=1e-3, range_lr=2e-2,
                                                 progress=False))
    moved = [n for n, s in before.items()
             if not torch.equal(s, qat.graph.quantizers[n.replace(".", "·")].scale().detach())
             if n.replace(".", "·") in qat.graph.quantizers]
    assert moved, "range learning changed no scale"
    paths = qat.export(tmp_path, "tiny")
    assert {"qdq", "float", "encodings", "encodings_v2"} <= set(paths)
    exported = onnxq.load(paths["qdq"])
    want = qat.graph.run_numpy({"image": data})[0]
    got = run(exported, {"image": data})[0]
    assert (want.argmax(1) == got.argmax(1)).mean() >= 0.995
    assert sqnr_db(want, got) > 35
    enc = json.loads(paths["encodings"].read_text())
    by_name = {e["name"]: e for e in enc["activation_encodings"]}
    scales = {n.name: n for n in exported.graph if n.op_type == "QuantizeLinear"}
    for name, node in scales.items():
        written = float(node.inputs[1].const_value.numpy())
        encoded = name[: -len("_QuantizeLinear")]  # onnxq names Q nodes after their tensor
        assert by_name[encoded]["scale"][0] == pytest.approx(written, rel=1e-6)
    # the float model carries the trained weights
    f = onnxq.load(paths["float"]).graph.initializers
    assert np.array_equal(f["fc"].const_value.numpy(), qat.graph.parameter("fc").detach().cpu().numpy())


def test_fixed_ranges_do_not_move_and_frozen_encodings_stay_frozen(sim, data) -> None:
    fixed = prepare(sim, learn_ranges=False)
    assert fixed.range_parameters() == []
    frozen_name = next(e.name for e in sim.encodings if e.kind == "param" and e.bits == 4)
    frozen_sim = dataclasses.replace(sim, encodings=[
        dataclasses.replace(e, frozen=True) if e.name == frozen_name else e for e in sim.encodings])
    qat = prepare(frozen_sim, learn_ranges=True)
    q = qat.graph.quantizers[frozen_name.replace(".", "·")]
    assert q.frozen and not q.log_scale.requires_grad
    start = q.scale().detach().clone()
    fit(qat, {"image": data[:32]}, None, TrainConfig(epochs=1, batch_size=16, range_lr=0.1,
                                                      progress=False))
    assert torch.equal(q.scale().detach(), start)
    out = {e.name: e for e in qat.to_sim().encodings}
    assert out[frozen_name].frozen


def test_checkpoint_resume_and_seed_give_the_same_weights(sim, data, tmp_path) -> None:
    def train(folder: str, resume: bool = False, interrupt_at: int | None = None) -> np.ndarray:
        qat = prepare(sim, learn_ranges=True)
        cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, seed=3, progress=False,
                          checkpoint_dir=str(tmp_path / folder), resume=resume)

        def stop(epoch: int, entry: dict) -> None:
            if epoch == interrupt_at:
                raise KeyboardInterrupt

        try:
            fit(qat, {"image": data}, None, cfg, callback=stop)
        except KeyboardInterrupt:
            pass
        return qat.graph.parameter("w2").detach().cpu().numpy().copy()

    straight = train("a")
    train("b", interrupt_at=2)  # epoch 1 checkpointed, epoch 2 lost
    resumed = train("b", resume=True)
    assert np.array_equal(straight, resumed)
    assert (tmp_path / "b" / "last.pt").exists() and (tmp_path / "b" / "epoch2.pt").exists()


def test_validation_keeps_the_weights_of_the_best_epoch(sim, data, monkeypatch) -> None:
    # held-out losses scripted so that epoch 2 is the best: the weights that come back are the
    # ones of epoch 2, not the last ones
    import onnxq.train.loop as loop

    scripted = iter([5.0, 3.0, 1.0, 2.0, 4.0])  # start, then epochs 1..4
    real = loop._validation

    def fake(qat, val, run_teacher, config, n_outputs, device):
        measured = real(qat, val, run_teacher, config, n_outputs, device)
        held.append(len(next(iter(val.values()))))
        return lambda: (measured(), next(scripted))[1]

    held: list[int] = []
    monkeypatch.setattr(loop, "_validation", fake)
    qat = prepare(sim, learn_ranges=True)
    snapshots = {}

    def snap(epoch: int, entry: dict) -> None:
        snapshots[epoch] = qat.graph.parameter("w2").detach().cpu().numpy().copy()

    cfg = TrainConfig(epochs=4, batch_size=16, lr=3e-2, seed=1, validation=0.25, progress=False)
    history = fit(qat, {"image": data}, None, cfg, callback=snap)
    assert [h["val_loss"] for h in history] == [3.0, 1.0, 2.0, 4.0]
    assert held == [24] and history[-1]["steps"] == 4 * 5  # 72 training samples: 5 steps of 16
    assert not np.array_equal(snapshots[2], snapshots[4])
    assert np.array_equal(qat.graph.parameter("w2").detach().cpu().numpy(), snapshots[2])
    with pytest.raises(ConfigError, match="validation"):
        TrainConfig(validation=1.0)


def test_feature_distillation_adds_the_layer_outputs_to_the_loss(sim, data, tmp_path) -> None:
    from onnxq.train.loop import _with_outputs

    qat = prepare(sim, features=True)
    assert qat.anchors == ["c1", "c2"] and qat.n_outputs == 1
    out = qat.graph.run_numpy({"image": data[:8]})
    want = run(_with_outputs(sim.model, ["c1", "c2"]), {"image": data[:8]})
    assert len(out) == 3 and all(sqnr_db(w, g) > 40 for w, g in zip(want, out))

    def first_loss(weight: float) -> float:  # lr 0: the logged loss is the loss at the start
        q = prepare(sim, features=["c2"], feature_weight=weight)
        cfg = TrainConfig(epochs=1, batch_size=32, lr=0.0, range_lr=0.0, seed=3, progress=False)
        return fit(q, {"image": data}, None, cfg)[0]["loss"]

    base, one, two = first_loss(0.0), first_loss(1.0), first_loss(2.0)
    assert one > base and two - base == pytest.approx(2 * (one - base), rel=1e-4)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-2, seed=0, progress=False)
    fit(qat, {"image": data}, None, cfg)
    exported = onnxq.load(qat.export(tmp_path, "feat")["qdq"])
    assert [v.name for v in exported.graph.outputs] == ["logits"]
    assert sqnr_db(qat.graph.run_numpy({"image": data})[0], run(exported, {"image": data})[0]) > 40
    with pytest.raises(ConfigError, match="features"):
        prepare(sim, features=["nowhere"])


def test_labels_and_wrong_data_are_checked(sim, data) -> None:
    qat = prepare(sim)
    with pytest.raises(ConfigError):
        fit(qat, {"not_an_input": data}, None, TrainConfig(progress=False))
    with pytest.raises(ConfigError):
        fit(qat, {"image": data[:, :2]}, None, TrainConfig(progress=False))
    with pytest.raises(ConfigError, match="labels"):
        fit(qat, {"image": data}, np.zeros(5), TrainConfig(progress=False))
    history = fit(qat, {"image": data[:32]}, np.arange(32) % 10,
                  TrainConfig(epochs=1, batch_size=16, progress=False))
    assert len(history) == 1 and np.isfinite(history[0]["loss"])


def test_a_model_without_quantizers_is_refused(sim) -> None:
    plain = dataclasses.replace(sim, model=sim.float_model)
    with pytest.raises(UnsupportedModelError, match="no QuantizeLinear"):
        prepare(plain)
    with pytest.raises(TypeError):
        prepare(sim.model)  # type: ignore[arg-type]


def test_import_onnxq_train_needs_no_change_to_onnxq() -> None:
    assert "train" not in onnxq.__all__ and isinstance(ir.Model, type)


def test_a_device_torch_cannot_use_is_a_clear_error(sim, data) -> None:
    from onnxq.train.loop import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            fit(prepare(sim), {"image": data[:16]}, None, TrainConfig(device="cuda", progress=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: QAT on a GPU is checked on a machine with one")
def test_qat_on_a_gpu_matches_the_cpu_and_exports_the_same_way(sim, data, tmp_path) -> None:
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-3, range_lr=2e-2, progress=False, augment="none")
    runs = {}
    for device in ("cpu", "cuda"):
        qat = prepare(sim, learn_ranges=True)
        fit(qat, {"image": data}, np.arange(len(data)) % 10, dataclasses.replace(config, device=device))
        assert next(qat.parameters()).device.type == "cpu"  # back on the CPU for export
        paths = qat.export(tmp_path / device, "tiny")
        runs[device] = (qat.graph.run_numpy({"image": data})[0], run(onnxq.load(paths["qdq"]), {"image": data})[0])
    (_, cpu_ort), (gpu_torch, gpu_ort) = runs["cpu"], runs["cuda"]
    assert sqnr_db(gpu_torch, gpu_ort) > 35  # the exported model is the trained one
    # the same training on another device: the same model up to float rounding of the steps
    assert (cpu_ort.argmax(1) == gpu_ort.argmax(1)).mean() >= 0.95
    assert sqnr_db(cpu_ort, gpu_ort) > 20
