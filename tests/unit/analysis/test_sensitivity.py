"""Step 3: the sensitivity sweeps rank a planted bad quantizer first."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from tiny_models import batches, chain_model

import onnxq
from onnxq.analysis import AnalysisConfig, analyze
from onnxq.analysis.quantizers import find_quantizers
from onnxq.analysis.sensitivity import layer_errors, sensitivity_sweep
from onnxq.quant.config import QuantConfig


def _coarsen(model: ir.Model, tensor: str, factor: float) -> None:
    """Multiply the scale of ``tensor``'s Q/DQ pair by ``factor`` (both sides: a consistent but
    far too coarse encoding)."""
    q = next(n for n in model.graph if n.name == f"{tensor}_QuantizeLinear")
    scale = q.inputs[1]
    scale.const_value = ir.Tensor(scale.const_value.numpy() * np.float32(factor), name=scale.name)


def test_a_planted_coarse_quantizer_ranks_first_in_both_sweeps():
    sim = onnxq.quantize(chain_model(), batches(3), config="default")
    _coarsen(sim.model, "r2", 40.0)
    rows = sensitivity_sweep(sim.model, sim.float_model, batches(2, seed=9))
    assert rows[0]["id"] == "a:r2"
    en = {r["id"]: r["enabled"]["proxy"]["sqnr_db"] for r in rows}
    dis = {r["id"]: r["disabled"]["proxy"]["sqnr_db"] for r in rows}
    assert en["a:r2"] == min(en.values())  # alone it adds the most noise
    assert dis["a:r2"] == max(dis.values())  # removing it helps the most
    assert en["a:r2"] < sorted(en.values())[1] - 6


def test_per_layer_sqnr_drops_at_the_planted_quantizer():
    sim = onnxq.quantize(chain_model(), batches(3), config="default")
    _coarsen(sim.model, "r2", 40.0)
    qmap = find_quantizers(sim.model, sim.float_model)
    layers = layer_errors(sim.float_model, sim.model, qmap, batches(2), max_samples=8, chunk=4)
    assert layers["a:r2"]["sqnr_db"] < layers["a:r"]["sqnr_db"] - 15
    assert layers["a:r2"]["mse"] > layers["a:r"]["mse"]


def test_analyze_ranks_a_quantizer_made_bad_by_the_config_first(tmp_path):
    config = QuantConfig(node_overrides={"conv_4": {"weights": {"bits": 4}}})
    result = analyze(chain_model(), batches(4), config=config, eval_data=batches(2, seed=9),
                     options=AnalysisConfig(workers=1, fixes=()), output_dir=None)
    assert result.data["sensitivity"][0]["id"] == "w:conv_4"
    assert result.data["sensitivity"][0]["bits"] == 4
