"""The analyzer's builder (calibrate once, build many configs) equals onnxq.quantize."""

from __future__ import annotations

import pytest
from tiny_models import batches, chain_model

import onnxq
from onnxq.analysis._build import Builder
from onnxq.quant.config import QuantConfig, QuantSpec


@pytest.mark.parametrize("config", [
    "default",
    QuantConfig(weights=QuantSpec(bits=8, symmetric=True, per_channel=True, range_method="mse"),
                activations=QuantSpec(range_method="percentile")),
    QuantConfig(node_overrides={"relu_3": {"activations": {"bits": 16}},
                                "conv_2": {"weights": {"per_channel": True}}}),
])
def test_builder_matches_quantize(config):
    data = batches(3)
    builder = Builder(chain_model(), data)
    cfg = config if isinstance(config, QuantConfig) else QuantConfig()
    built = builder.build(cfg, ("fold-bn",))
    ref = onnxq.quantize(chain_model(), data, config=config, passes="fold-bn")
    assert built.encodings == ref.encodings
    assert [n.op_type for n in built.model.graph] == [n.op_type for n in ref.model.graph]


def test_builder_calibrates_once_per_float_model():
    builder = Builder(chain_model(), batches(2))
    builder.build(QuantConfig(), ())
    builder.build(QuantConfig(activations=QuantSpec(range_method="mse")), ())
    builder.build(QuantConfig(weights=QuantSpec(bits=8, symmetric=True, per_channel=True)), ())
    assert builder.calibrations == 1
    builder.build(QuantConfig(), ("fold-bn", "cle"))
    assert builder.calibrations == 2
