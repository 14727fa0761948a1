"""HighBiasFold (high-bias absorption): move the always-active part of a bias into the next layer.

After BN folding (and usually CLE), layer 1's output channel c is ~ N(β_c, γ_c²) before its
activation, with β and γ kept by fold-bn in ``Node.meta["onnxq.bn_stats"]``. The part
``h_c = max(0, β_c − k·|γ_c|)`` is active for almost every input, so for
x ≥ h::

    relu(x)          = relu(x − h) + h
    clip(x, 0, u)    = clip(x − h, 0, u − h) + h      (the upper bound moves by h per channel)
    W2 · (a + h) + b2 = W2 · a + (b2 + W2 · h)

giving ``b1' = b1 − h`` and ``b2' = b2 + Σ W2[:, c]·h_c``. With no activation between the layers
``h = β``. Zero padding between the layers (a ``Pad`` link, or layer 2 padding its input) would
see 0 where the shifted activation means ``h``, so such pairs are skipped unless
``padded=True`` (AIMET's behaviour): on EfficientNet-Lite0, whose depthwise 3×3 convolutions run
on maps as small as 7×7, absorbing across padding cost 1.4 pt of FP32 top-1 (measured), while
the padding-free pairs (depthwise → 1×1 projection) stay within rounding. Approximate by
design otherwise (inputs below ``h``): the effect is measured in benchmarks/dfq.py.

``k`` (``sigmas``) defaults to 4, not the DFQ paper's 3: real pre-activations have heavier tails
than the Gaussian the BN statistics describe. Measured on EfficientNet-Lite0 (500 ImageNet
images, after fold-bn + cle): k = 3 changes FP32 top-1 by −0.6 pt (agreement with FP32 0.986),
k = 4 by 0.0 pt (agreement 0.998), k = 5 and 6 by +0.2 pt (agreement 0.998).
The purpose is smaller activation ranges after CLE has scaled channels up, which quantization
of the activation needs.

Skipped with a reason: no BN statistics (run fold-bn first), links other than ReLU / bounded clip
with a zero lower bound / pooling / reshape (e.g. LeakyRelu, PRelu: part of their negative side
matters), shared weights or biases.
"""

from __future__ import annotations

__all__ = ["HighBiasFold"]

import numpy as np
import onnx_ir as ir

from onnxq.passes._chains import Pair, find_pair, rebound
from onnxq.passes._graph import BN_STATS_KEY, attr, clip_bounds, constant, weight_problem
from onnxq.passes._layers import as_layer
from onnxq.passes.base import OnnxqPass

_LINEAR = {"Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
           "GlobalMaxPool", "Flatten", "Squeeze", "Reshape", "Pad"}


class HighBiasFold(OnnxqPass):
    name = "high-bias-fold"
    verb = "biases absorbed"

    def __init__(self, sigmas: float = 4.0, padded: bool = False) -> None:
        super().__init__()
        self.sigmas = sigmas
        self.padded = padded

    def run_on_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        modified = False
        for node in list(graph):
            layer = as_layer(node)
            if isinstance(layer, str):
                continue
            stats = node.meta.get(BN_STATS_KEY)
            if stats is None:
                self.skip(node, "no BN statistics (run fold-bn first)")
                continue
            pair = find_pair(layer)
            if isinstance(pair, str):
                self.skip(node, pair)
                continue
            problem = (
                layer.bias_problem()
                or pair.second.bias_problem()
                or weight_problem(pair.second.weight, [pair.second.node])
                or _links_problem(pair)
                or (None if self.padded else _padding_problem(pair))
            )
            if problem:
                self.skip(node, problem)
                continue
            beta = np.asarray(stats["beta"], dtype=np.float64)
            gamma = np.asarray(stats["gamma"], dtype=np.float64)
            if _rectified(pair):
                h = np.maximum(0.0, beta - self.sigmas * np.abs(gamma))
            else:
                h = beta
            if not np.any(h):
                self.skip(node, "no always-active bias")
                continue
            self._absorb(graph, pair, h)
            node.meta[BN_STATS_KEY] = {"gamma": gamma, "beta": beta - h}
            self.changed()
            modified = True
        return modified

    @staticmethod
    def _absorb(graph: ir.Graph, pair: Pair, h: np.ndarray) -> None:
        first, second = pair.first, pair.second
        first.set_bias(graph, first.bias().astype(np.float64) - h)
        h_flat = np.repeat(h, pair.repeat)
        shift = second.input_dot(second.canonical().astype(np.float64), h_flat)
        second.set_bias(graph, second.bias().astype(np.float64) + shift)
        for link in pair.links:
            if link.kind == "bound":
                vec = h_flat if link.flat else h
                rebound(graph, link, vec.size, lambda lo: lo, lambda hi, v=vec: hi - v)


def _padding_problem(pair: Pair) -> str | None:
    """Zero padding between the layers sees 0 where the shifted activation means h: skip it."""
    for link in pair.links:
        node = link.node
        if node.op_type == "Pad" and attr(node, "mode", "constant") in ("constant", b"constant"):
            return f"Pad '{node.name}' zero-pads the activation (borders would change)"
        if node.op_type == "AveragePool" and attr(node, "count_include_pad", 0) and any(
            attr(node, "pads", [0])
        ):
            return f"AveragePool '{node.name}' counts zero padding"
    second = pair.second
    if second.op_type in ("Conv", "ConvTranspose"):
        kernel = second.canonical_shape[2:]
        if any(int(k) > 1 for k in kernel):
            pads = attr(second.node, "pads", None)
            auto = attr(second.node, "auto_pad", "NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else auto
            if second.op_type == "ConvTranspose" or any(pads or []) or auto.startswith("SAME"):
                return f"{second.op_type} '{second.node.name}' pads its input (borders would change)"
    return None


def _links_problem(pair: Pair) -> str | None:
    for link in pair.links:
        op = link.node.op_type
        if op in _LINEAR or op == "Relu" or op == "Min":
            continue
        if op in ("Add", "Mul"):
            return f"{op} '{link.node.name}' with a constant (high-bias fold does not cross it)"
        if op in ("Clip", "Max") and _lower_bound(link.node) in (None, 0.0):
            continue
        if op in ("Clip", "Max"):
            return f"{op} '{link.node.name}' has a non-zero lower bound"
        return f"{op} '{link.node.name}' is not a rectifier high-bias fold can cross"
    return None


def _lower_bound(node: ir.Node) -> float | None | str:
    """The lower bound of a Clip or Max link: None (none), 0.0, or "other"."""
    if node.op_type == "Clip":
        lo = clip_bounds(node)[0]
        return None if lo is None else (0.0 if lo == 0 else "other")
    arr = constant(node.inputs[1])
    arr = constant(node.inputs[0]) if arr is None else arr
    return 0.0 if not np.any(arr) else "other"


def _rectified(pair: Pair) -> bool:
    """Whether a link clips below at 0 (then only the part beyond k·σ is always active)."""
    return any(
        link.node.op_type == "Relu"
        or (link.node.op_type in ("Clip", "Max") and _lower_bound(link.node) == 0.0)
        for link in pair.links
    )
