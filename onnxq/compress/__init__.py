"""Model compression on the IR: weight SVD, spatial SVD, channel pruning, per-layer ratio selection.

Each technique is a pass (:class:`WeightSVD`, :class:`SpatialSVD`, :class:`ChannelPruning`) whose
module docstring states its algebra; :func:`count_macs` and :func:`measure_latency` measure
the cost; :func:`compress` chooses per-layer ratios to reach a MAC target.
"""

from __future__ import annotations

__all__ = ["WeightSVD", "SpatialSVD", "count_macs", "measure_latency", "ModelCost"]

from onnxq.compress.macs import ModelCost, count_macs, measure_latency
from onnxq.compress.spatial_svd import SpatialSVD
from onnxq.compress.weight_svd import WeightSVD
