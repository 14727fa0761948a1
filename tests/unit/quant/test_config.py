"""Configs: frozen, round-trip through dicts, AIMET runtime-config import, overrides."""

import dataclasses
import json

import pytest

from onnxq.errors import ConfigError
from onnxq.quant.config import PRESETS, QuantConfig, QuantSpec

AIMET_DEFAULT = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "False"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "strict_symmetric": "False",
        "unsigned_symmetric": "True",
        "per_channel_quantization": "True",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {
        "Squeeze": {"is_output_quantized": "False"},
        "Gemm": {"per_channel_quantization": "False"},
    },
    "supergroups": [{"op_list": ["Conv", "Relu"]}, {"op_list": ["Gemm", "Relu"]}],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    config = PRESETS[name]
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().quantize_bias = False  # type: ignore[misc]


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="bit-width"):
        QuantSpec(bits=7)
    with pytest.raises(ConfigError, match="range method"):
        QuantSpec(range_method="magic")
    with pytest.raises(ConfigError, match="unknown config key"):
        QuantConfig.from_dict({"weigths": {}})


def test_aimet_runtime_config(tmp_path):
    path = tmp_path / "aimet.json"
    path.write_text(json.dumps(AIMET_DEFAULT))
    config = QuantConfig.load(path)
    assert config.weights.per_channel and config.weights.symmetric
    assert not config.activations.symmetric
    assert not config.quantize_bias
    assert config.supergroups == (("Conv", "Relu"), ("Gemm", "Relu"))
    assert config.model_inputs and not config.model_outputs
    assert config.activation_spec("sq", "Squeeze") is None
    assert config.weight_spec("fc", "Gemm").per_channel is False
    assert config.weight_spec("c", "Conv").per_channel is True


def test_node_override_beats_op_override():
    config = QuantConfig(
        node_overrides={"conv1": {"activations": {"bits": 16}}},
        op_overrides={"Conv": {"skip": True}},
    )
    assert config.activation_spec("conv1", "Conv").bits == 16
    assert config.activation_spec("conv2", "Conv") is None
