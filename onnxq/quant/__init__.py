"""Quantization: range maths (numpy only) and weight rounding; Q/DQ simulation builds on these."""

from onnxq.quant.qparams import QRange, fake_quantize, qrange, symmetric_scale
from onnxq.quant.weight_only import round_weights

__all__ = ["QRange", "fake_quantize", "qrange", "round_weights", "symmetric_scale"]
