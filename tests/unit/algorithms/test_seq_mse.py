"""Sequential MSE: the chosen ranges never do worse than the calibrated ones on the layer output."""

import numpy as np

import onnxq
from onnxq.algorithms import adaround, seq_mse
from onnxq.algorithms._layers import Activation
from onnxq.algorithms.adaround import reconstruction_loss
from onnxq.algorithms.seq_mse import SeqMseConfig, search_layer
from onnxq.quant.config import QuantConfig, QuantSpec
from onnxq.runtime import run
from tests.unit.algorithms.test_adaround import MODEL, _job
from tests.conftest import model_from_text


def test_search_picks_clipped_ranges_for_heavy_tailed_weights():
    job = _job(Activation("relu"), shape=(1, 8, 64), rows=2000, bits=4)
    job.weight[:, :, 0] *= 8  # one outlier per channel: min-max wastes the grid on it
    job.scale[...] = np.abs(job.weight).max(axis=2, keepdims=True) / job.grid.qmax
    before = reconstruction_loss(job, np.clip(np.rint(job.weight / job.scale), -8, 7) * job.scale.astype(np.float32))
    sol = search_layer(job, SeqMseConfig(candidates=20))
    after = reconstruction_loss(job, ((sol.codes - sol.zero) * sol.scale).astype(np.float32))
    assert after <= before
    assert np.all(sol.scale <= job.scale + 1e-12)


def test_seq_mse_then_adaround_end_to_end():
    model = model_from_text(MODEL)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    config = QuantConfig(weights=QuantSpec(bits=4, symmetric=True, per_channel=True))
    sim = onnxq.quantize(model, data, config)
    s1 = seq_mse(sim, data, rows_per_layer=512)
    s2 = adaround(s1, data, iterations=300, batch_rows=128, rows_per_layer=1024)
    scales = lambda s: {e.name: e.scale for e in s.encodings if e.kind == "param" and e.bits == 4}  # noqa: E731
    assert scales(s2) == scales(s1)  # AdaRound keeps the grid SeqMSE chose
    assert all(e.frozen for e in s1.encodings if e.kind == "param" and e.bits == 4)
    test = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    (ref,) = run(sim.float_model, {"x": test})
    err = lambda m: float(np.mean((run(m, {"x": test})[0] - ref) ** 2))  # noqa: E731
    assert err(s1.model) <= err(sim.model) * 1.05
    # AdaRound after SeqMSE still optimizes against the FP32 weights, not SeqMSE's rounded ones
    assert err(s2.model) < err(s1.model)
    assert s2.fp32_model is s1.fp32_model is sim.float_model
