"""CrossLayerEqualization (CLE): equalize per-channel weight ranges of consecutive layers.

For layer 1 → links → layer 2 (see :mod:`onnxq.passes._chains` for the links crossed) and a
positive per-channel scale ``s``::

    W1'[c] = W1[c] / s_c,   b1'[c] = b1[c] / s_c,   W2'[:, c] = W2[:, c] · s_c

is exact because every link commutes with the scale: ``f(x / s) = f(x) / s``. Bounded links move
their bounds with the scale — ``clip(x/s, lo/s, hi/s) = clip(x, lo, hi)/s`` — so a ``Clip(0, 6)``
(ReLU6) becomes ``Relu`` → ``Min(·, 6/s)`` with a per-channel constant, and the float model's
outputs do not change (no "replace ReLU6 by ReLU"). With ranges ``r1_c = max|W1[c]|`` and
``r2_c = max|W2[:, c]|``, ``s_c = sqrt(r1_c / r2_c)`` makes both ``sqrt(r1_c·r2_c)`` (Nagel et
al., *Data-Free Quantization*, 2019). Chains (Conv → depthwise → Conv triplets, longer chains) are
equalized pair by pair, repeatedly, until no scale moves by more than ``tolerance`` (bounded by
``max_iterations``); for a triplet this converges to the closed form
``r1/s1 = r2·s1/s2 = r3·s2 = (r1·r2·r3)^(1/3)``.

Dead channels (range below ``dead_threshold`` × the layer's largest range on either side) are
left unscaled: scaling them keeps the float model exact but drives biases towards 1e7 and breaks
every later quantization. BN statistics kept by fold-bn (``Node.meta["onnxq.bn_stats"]``) are
scaled with layer 1's outputs so high-bias fold can use them.
"""

from __future__ import annotations

__all__ = ["CrossLayerEqualization"]

import numpy as np
import onnx_ir as ir

from onnxq.passes._chains import Pair, channel_range_in, channel_range_out, find_pair, rebound
from onnxq.passes._graph import BN_STATS_KEY, opset_version, weight_problem
from onnxq.passes._layers import WeightLayer, as_layer
from onnxq.passes.base import OnnxqPass


class CrossLayerEqualization(OnnxqPass):
    name = "cle"
    verb = "pairs equalized"

    def __init__(
        self, max_iterations: int = 100, tolerance: float = 1e-4, dead_threshold: float = 1e-5
    ) -> None:
        super().__init__()
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.dead_threshold = dead_threshold

    def run_on_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        pairs = self._pairs(graph, opset_version(model))
        if not pairs:
            return False
        layers: dict[int, WeightLayer] = {}
        for pair in pairs:
            layers.setdefault(id(pair.first.node), pair.first)
            layers.setdefault(id(pair.second.node), pair.second)
        weights = {
            k: np.array(layer.canonical(), dtype=np.float64, order="C") for k, layer in layers.items()
        }
        biases = {id(p.first.node): p.first.bias().astype(np.float64) for p in pairs}
        totals = [np.ones(p.channels) for p in pairs]

        for _ in range(self.max_iterations):
            moved = 0.0
            for k, pair in enumerate(pairs):
                s = self._scale(pair, weights)
                if s is None:
                    continue
                k1, k2 = id(pair.first.node), id(pair.second.node)
                w1 = weights[k1]
                w1 /= s.reshape((-1,) + (1,) * (w1.ndim - 1))
                biases[k1] /= s
                pair.second.scale_inputs_(weights[k2], np.repeat(s, pair.repeat))
                totals[k] *= s
                moved = max(moved, float(np.max(np.abs(np.log(s)))))
            if moved < self.tolerance:
                break

        touched = [k for k, s in enumerate(totals) if np.max(np.abs(np.log(s))) > self.tolerance]
        if not touched:
            for pair in pairs:
                self.skip(pair.first.node, "ranges already equal")
            return False
        for k, layer in layers.items():
            layer.set_canonical(weights[k])
        for k in touched:
            pair, s = pairs[k], totals[k]
            pair.first.set_bias(graph, biases[id(pair.first.node)])
            stats = pair.first.node.meta.get(BN_STATS_KEY)
            if stats is not None:
                pair.first.node.meta[BN_STATS_KEY] = {
                    "gamma": stats["gamma"] / s,
                    "beta": stats["beta"] / s,
                }
            s_flat = np.repeat(s, pair.repeat)
            for link in pair.links:
                if link.kind != "bound":
                    continue
                vec = s_flat if link.flat else s
                rebound(graph, link, vec.size, lambda lo, v=vec: lo / v, lambda hi, v=vec: hi / v)
            self.changed()
        return True

    def _pairs(self, graph: ir.Graph, opset: int) -> list[Pair]:
        pairs = []
        for node in graph:
            layer = as_layer(node)
            if isinstance(layer, str):
                continue
            pair = find_pair(layer)
            if isinstance(pair, str):
                self.skip(node, pair)
                continue
            problem = (
                weight_problem(layer.weight, [layer.node])
                or layer.bias_problem()
                or weight_problem(pair.second.weight, [pair.second.node])
            )
            if not problem and opset < 8 and any(link.kind == "bound" for link in pair.links):
                problem = "per-channel bounds need Min/Max with broadcasting (opset >= 8)"
            if problem:
                self.skip(node, problem)
                continue
            pairs.append(pair)
        return pairs

    def _scale(self, pair: Pair, weights: dict[int, np.ndarray]) -> np.ndarray | None:
        r1 = channel_range_out(weights[id(pair.first.node)])
        r2 = channel_range_in(pair.second, weights[id(pair.second.node)], pair.repeat)
        live = (r1 > self.dead_threshold * r1.max()) & (r2 > self.dead_threshold * r2.max())
        if not live.any():
            return None
        s = np.ones_like(r1)
        s[live] = np.sqrt(r1[live] / r2[live])
        return s
