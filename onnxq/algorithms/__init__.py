"""Data-driven post-training quantization: AdaRound, sequential MSE, bias correction.

Each algorithm takes a :class:`~onnxq.quant.sim.QuantSim` and calibration data and returns a new
one: the float model carries the optimized weights / biases, optimized weight encodings are
frozen, activations are recalibrated.
"""

from onnxq.algorithms.adaround import AdaRoundConfig, adaround
from onnxq.algorithms.bias_correction import BiasCorrectionConfig, bias_correction
from onnxq.algorithms.seq_mse import SeqMseConfig, seq_mse

__all__ = [
    "AdaRoundConfig", "adaround", "SeqMseConfig", "seq_mse", "BiasCorrectionConfig", "bias_correction",
]
