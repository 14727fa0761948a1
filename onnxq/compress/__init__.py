"""Model compression on the IR: weight SVD, spatial SVD, channel pruning, per-layer ratio selection.

Each technique is a pass (:class:`WeightSVD`, :class:`SpatialSVD`, :class:`ChannelPruning`) whose
module docstring states its algebra; :func:`count_macs` and :func:`measure_latency` measure the
cost; :func:`compress` chooses per-layer ratios by a sweep to reach a MAC target::

    result = onnxq.compress.compress("model.onnx", calib_batches,
                                     config=CompressConfig(target_macs=0.5, scheme="ssvd+cp"))
    result.save("model.small.onnx")        # + model.small.json: ratios, MACs, latency, curves
"""

from __future__ import annotations

__all__ = [
    "ChannelPruning",
    "CompressConfig",
    "CompressResult",
    "ModelCost",
    "SpatialSVD",
    "WeightSVD",
    "compress",
    "count_macs",
    "measure_latency",
]

from onnxq.compress.api import CompressConfig, CompressResult, compress
from onnxq.compress.channel_pruning import ChannelPruning
from onnxq.compress.macs import ModelCost, count_macs, measure_latency
from onnxq.compress.spatial_svd import SpatialSVD
from onnxq.compress.weight_svd import WeightSVD
