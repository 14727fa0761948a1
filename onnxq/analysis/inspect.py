"""``onnxq inspect``: op counts and, per weight layer, the per-channel weight-range spread.

The spread of a layer is ``max_c r_c / median_c r_c`` with ``r_c = max |W[c]|`` over output
channel c (canonical layout, see :mod:`onnxq.passes._layers`). Per-tensor quantization gives every
channel the step size of the widest one, so channels far below the maximum lose most of their
resolution: a spread above ~10 predicts a per-tensor failure. For each layer the inspector also
says whether cross-layer equalization can reach it (as the first layer of a pair, or as the
second) and, if not, what blocks it — the information a user needs before choosing CLE or
per-channel quantization.
"""

from __future__ import annotations

__all__ = ["LayerStats", "ModelSummary", "inspect_model"]

import dataclasses
from collections import Counter

import numpy as np
import onnx_ir as ir

from onnxq.passes._chains import channel_range_out, find_pair
from onnxq.passes._layers import WeightLayer, as_layer
from onnxq.passes.lift_constants import LiftConstants

SPREAD_WARNING = 10.0


@dataclasses.dataclass(frozen=True)
class LayerStats:
    node: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    groups: int
    #: max / median of per-output-channel max |w|
    spread: float
    max_range: float
    dead_channels: int
    #: "→ <next layer>" when CLE can pair this layer with the next one, else the reason
    cle_next: str
    #: "← <previous layer>" when a previous layer pairs with this one, else ""
    cle_prev: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    op_counts: dict[str, int]
    layers: list[LayerStats]
    nodes: int
    weight_bytes: int

    def worst(self, n: int = 10) -> list[LayerStats]:
        return sorted(self.layers, key=lambda s: -s.spread)[:n]

    def to_dict(self) -> dict:
        return {
            "op_counts": self.op_counts,
            "nodes": self.nodes,
            "weight_bytes": self.weight_bytes,
            "layers": [s.to_dict() for s in self.layers],
        }


def _spread(layer: WeightLayer) -> tuple[float, float, int]:
    r = channel_range_out(layer.canonical().astype(np.float64))
    top = float(r.max()) if r.size else 0.0
    dead = int(np.sum(r <= 1e-8 * max(top, 1e-30)))
    med = float(np.median(r)) if r.size else 0.0
    spread = top / med if med > 0 else float("inf") if top > 0 else 1.0
    return spread, top, dead


def inspect_model(model: ir.Model) -> ModelSummary:
    """Summarize ``model`` (the main graph and subgraphs) without changing it."""
    model = model.clone()
    LiftConstants()(model)  # weights held in Constant nodes count as weights
    ops: Counter[str] = Counter()
    layers: list[LayerStats] = []
    prev_of: dict[int, str] = {}
    found: list[tuple[ir.Node, WeightLayer, str]] = []
    nodes = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        nodes += 1
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        ops[key] += 1
        layer = as_layer(node)
        if isinstance(layer, str):
            continue
        pair = find_pair(layer)
        if isinstance(pair, str):
            nxt = pair
        else:
            nxt = f"-> {pair.second.node.name}"
            prev_of[id(pair.second.node)] = f"<- {node.name}"
        found.append((node, layer, nxt))
    for node, layer, nxt in found:
        spread, top, dead = _spread(layer)
        layers.append(
            LayerStats(
                node=node.name or "",
                op_type=node.op_type,
                weight=layer.weight.name or "",
                shape=tuple(int(d) for d in layer.weight.const_value.shape),
                groups=layer.groups,
                spread=spread,
                max_range=top,
                dead_channels=dead,
                cle_next=nxt,
                cle_prev=prev_of.get(id(node), ""),
            )
        )
    weight_bytes = sum(
        v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
        if v.const_value is not None
    )
    return ModelSummary(dict(ops.most_common()), layers, nodes, weight_bytes)
