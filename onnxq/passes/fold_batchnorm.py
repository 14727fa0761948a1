"""FoldBatchNorm: fold inference-mode BatchNormalization into a neighbouring weight layer.

Inference BatchNormalization is a per-channel affine map on axis 1:
``BN(y)_o = a_o·(y_o − μ_o) + β_o`` with ``σ = sqrt(var + ε)`` and ``a = γ/σ``.

**Backward fold** (a layer ``y = W·x + b`` followed by BN), in the canonical weight layout
``(C_out, C_in/g, k…)`` of :mod:`onnxq.passes._layers`::

    W'[o] = W[o]·γ_o/σ_o          b' = (b − μ)·γ/σ + β

Exact for Conv, ConvTranspose (grouped and depthwise too), Gemm and MatMul with a constant
2-D weight, for MatMul → Add(bias) → BN, and for a bias-free Conv/ConvTranspose → Add of a
constant ``(1, C, 1, …)`` bias → BN (as Paddle2ONNX exports ConvTranspose). BN's channel axis is axis 1, so for Gemm/MatMul the
fold is only right when axis 1 is the layer's output-feature axis, i.e. the activation is rank 2
(a MatMul whose activation rank is unknown or not 2 is skipped).

**Forward fold** (BN followed by a Conv that reads it): ``BN(x)_c = a_c·x_c + s_c`` with
``s = β − μ·a``, hence with ``c = c(o, j)`` the input channel read by ``W[o, j]``::

    W'[o,j,k] = W[o,j,k]·a_c      b'_o = b_o + Σ_{j,k} W[o,j,k]·s_c

This is exact only when the Conv has no padding: the Conv pads ``BN(x)`` with zeros, which is
not ``BN`` of the zero-padded ``x`` (the border would see ``s_c`` instead of 0). Padded Convs,
ConvTranspose (its border outputs sum fewer inputs) and Gemm/MatMul are not forward-folded.

A BN is skipped, with a reason, when: it is in training form (``training_mode=1`` or more than
one output) or per-activation (``spatial=0``); a parameter is not a constant (e.g. a graph
input); the BN's input is read by another node or is a graph output (a backward fold would
change what that reader sees); the layer's weight or bias is not a constant or is shared with
another node; the channel counts disagree; or the folded weights would not be finite in the
weight's dtype. Weights keep their dtype (the arithmetic is done in float64).

After a backward fold the BN's output uses move to the layer's output (which takes the BN
output's name when that is a graph output) and the BN node is removed; its now-orphan
parameters are left for :class:`onnxq.passes.cleanup.Cleanup`. The folded statistics stay on the
layer node as ``node.meta[BN_STATS_KEY] = {"gamma": γ, "beta": β}`` (float64): under the BN
assumption the layer's pre-activation output has per-channel mean ``β`` and standard deviation
``|γ|``, which high-bias fold and analytic bias correction use.
"""

from __future__ import annotations

__all__ = ["BN_STATS_KEY", "FoldBatchNorm"]

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxq.passes._graph import (
    BN_STATS_KEY,  # re-exported: ``Node.meta`` key of the folded BN's {"gamma": γ, "beta": β}
    attr,
    constant,
    is_op,
    sole_consumer,
    weight_problem,
)
from onnxq.passes._layers import WeightLayer, as_layer
from onnxq.passes.base import OnnxqPass

_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)


@dataclasses.dataclass
class _BatchNorm:
    """The float64 parameters of an inference BatchNormalization."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    @property
    def channels(self) -> int:
        return int(self.gamma.size)

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, s) with BN(x) = a·x + s per channel."""
        with np.errstate(all="ignore"):
            a = self.gamma / np.sqrt(self.var + self.eps)
            return a, self.beta - self.mean * a


@dataclasses.dataclass
class _Miss:
    """Why a fold direction did not apply; ``matched`` when the neighbour had the right shape."""

    reason: str
    matched: bool


class FoldBatchNorm(OnnxqPass):
    """Fold each inference BatchNormalization into the layer before it (or the Conv after it)."""

    name = "fold-bn"
    verb = "folded"

    def run_on_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        modified = False
        for node in list(graph):
            if not is_op(node, "BatchNormalization") or node.graph is not graph:
                continue
            reason = self._fold(graph, node)
            if reason is None:
                self.changed()
                modified = True
            else:
                self.skip(node, reason)
        return modified

    def _fold(self, graph: ir.Graph, bn: ir.Node) -> str | None:
        params = _read_batchnorm(bn)
        if isinstance(params, str):
            return params
        backward = _match_backward(graph, bn, params)
        if isinstance(backward, WeightLayer):
            return _fold_backward(graph, bn, backward, params)
        forward = _match_forward(graph, bn, params)
        if isinstance(forward, WeightLayer):
            return _fold_forward(graph, bn, forward, params)
        if backward.matched:
            return backward.reason
        if forward.matched:
            return forward.reason
        return "not preceded by Conv/ConvTranspose/Gemm/MatMul nor followed by a Conv"


# ---- BatchNormalization ---------------------------------------------------------------------


def _read_batchnorm(bn: ir.Node) -> _BatchNorm | str:
    """The BN's parameters in float64, or why it cannot be folded."""
    if len(bn.outputs) > 1:
        return f"BatchNormalization has {len(bn.outputs)} outputs (training form)"
    if attr(bn, "training_mode", 0):
        return "BatchNormalization has training_mode=1 (batch statistics)"
    if not attr(bn, "spatial", 1):
        return "BatchNormalization has spatial=0 (per-activation statistics)"
    if len(bn.inputs) != 5 or any(v is None for v in bn.inputs):
        return "BatchNormalization does not have its five inputs"
    arrays = []
    for value in bn.inputs[1:]:
        arr = constant(value)
        if arr is None:
            if value.is_graph_input():
                return f"'{value.name}' is a graph input (the user may feed it)"
            return f"BN parameter '{value.name}' is not a constant"
        if value.const_value.dtype not in _FLOAT_TYPES:
            return f"BN parameter '{value.name}' has dtype {value.const_value.dtype}"
        arrays.append(arr.astype(np.float64))
    gamma, beta, mean, var = arrays
    if gamma.ndim != 1 or any(a.shape != gamma.shape for a in arrays):
        shapes = ", ".join(str(a.shape) for a in arrays)
        return f"BN parameters are not per-channel vectors of one size ({shapes})"
    return _BatchNorm(gamma, beta, mean, var, float(attr(bn, "epsilon", 1e-5)))


# ---- backward fold: layer -> BN -------------------------------------------------------------


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def _axis1_any(layer: WeightLayer, bn_input: ir.Value) -> str | None:
    return None  # Conv/ConvTranspose: axis 1 is the output channel; Gemm: always rank 2


def _axis1_rank2(layer: WeightLayer, bn_input: ir.Value) -> str | None:
    rank = _rank(bn_input)
    if rank is None:
        ranks = [_rank(layer.node.inputs[0])]
        if layer.bias_value is not None:
            ranks.append(_rank(layer.bias_value))
        rank = None if None in ranks else max(ranks)
    if rank is None:
        return f"{layer.op_type} activation rank is unknown (BN's axis 1 may not be its features)"
    if rank != 2:
        return (
            f"{layer.op_type} activation has rank {rank}: BN's channel axis 1 is not the "
            "output feature axis"
        )
    return None


#: per layer op: does BN's channel axis (1) index the layer's output channels?
_CHANNEL_AXIS_CHECK: dict[str, Callable[[WeightLayer, ir.Value], str | None]] = {
    "Conv": _axis1_any,
    "ConvTranspose": _axis1_any,
    "Gemm": _axis1_any,
    "MatMul": _axis1_rank2,
}


def _producing_layer(value: ir.Value) -> WeightLayer | _Miss:
    """The weight layer whose output (after its bias) is ``value``."""
    producer = value.producer()
    if producer is None:
        return _Miss("input is not produced by a node", False)
    if is_op(producer, "Add"):
        return _add_bias_layer(producer)
    if not is_op(producer, tuple(_CHANNEL_AXIS_CHECK)):
        return _Miss(f"input is produced by {producer.op_type}", False)
    layer = as_layer(producer)
    if isinstance(layer, str):
        return _Miss(f"{producer.op_type} '{producer.name}': {layer}", True)
    return layer


def _add_bias_layer(add: ir.Node) -> WeightLayer | _Miss:
    """The layer whose bias is this Add: MatMul → Add(b), or Conv/ConvTranspose → Add(b).

    Exporters such as Paddle2ONNX emit a bias-free ConvTranspose (or Conv) followed by an Add of
    a constant ``(1, C, 1, 1)``; ``as_layer`` attaches a trailing Add to MatMul only.
    """
    for index, inp in enumerate(add.inputs):
        prev = inp.producer() if inp is not None else None
        if is_op(prev, "MatMul"):
            layer = as_layer(prev)
            if isinstance(layer, WeightLayer) and layer.bias_node is add:
                return layer
        elif is_op(prev, ("Conv", "ConvTranspose")) and prev.outputs[0] is inp:
            other = 1 - index
            operand = add.inputs[other] if len(add.inputs) > other else None
            if constant(operand) is None:  # e.g. a residual Add: not a bias
                return _Miss("input is produced by an Add of a Conv and a non-constant", False)
            layer = as_layer(prev)
            if isinstance(layer, str):
                return _Miss(f"{prev.op_type} '{prev.name}': {layer}", True)
            miss = _conv_add_problem(layer, add, operand)
            if miss is not None:
                return miss
            return WeightLayer(prev, layer.weight, layer.groups, add, other)
    return _Miss("input is produced by an Add that is not a layer's bias", False)


def _conv_add_problem(layer: WeightLayer, add: ir.Node, operand: ir.Value) -> _Miss | None:
    """Why ``Add(conv_output, operand)`` is not a per-output-channel bias of the Conv."""
    conv, arr = layer.node, constant(operand)
    rank = len(layer.weight.const_value.shape)  # the Conv's output rank
    shape = (1,) * (rank - arr.ndim) + tuple(arr.shape)
    if arr.ndim > rank or shape != _channel_shape(layer.out_channels, rank):
        return _Miss(f"Add operand '{operand.name}' of shape {arr.shape} is not per channel", True)
    if conv.inputs[2:] and conv.inputs[2] is not None:
        return _Miss(f"{conv.op_type} '{conv.name}' has a bias and a trailing Add", True)
    if sole_consumer(conv.outputs[0]) is not add:
        return _Miss(f"{conv.op_type} '{conv.name}' output is also read by another node", True)
    problem = weight_problem(operand, [add])
    return _Miss(problem, True) if problem else None


def _match_backward(graph: ir.Graph, bn: ir.Node, params: _BatchNorm) -> WeightLayer | _Miss:
    x = bn.inputs[0]
    layer = _producing_layer(x)
    if isinstance(layer, _Miss):
        return layer
    if layer.node.graph is not graph:
        return _Miss(f"{layer.op_type} '{layer.node.name}' is in another graph", True)
    if sole_consumer(x) is not bn:
        return _Miss(f"BN input '{x.name}' is also read by another node or is a graph output", True)
    problem = (
        _CHANNEL_AXIS_CHECK[layer.op_type](layer, x)
        or _layer_problem(layer)
        or _channel_problem(layer.out_channels, params.channels, "output")
    )
    if problem:
        return _Miss(problem, True)
    return layer


def _fold_backward(
    graph: ir.Graph, bn: ir.Node, layer: WeightLayer, params: _BatchNorm
) -> str | None:
    a, _ = params.scale_shift()
    wc = layer.canonical().astype(np.float64)
    w_new = wc * a.reshape((-1,) + (1,) * (wc.ndim - 1))
    with np.errstate(all="ignore"):
        b_new = (layer.bias().astype(np.float64) - params.mean) * a + params.beta
    problem = _finite_problem(layer, w_new, b_new)
    if problem:
        return problem

    _write(graph, layer, w_new, b_new)
    layer.node.meta[BN_STATS_KEY] = {"gamma": params.gamma.copy(), "beta": params.beta.copy()}

    y, out = bn.outputs[0], layer.output
    name = y.name if y.is_graph_output() else None
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    if name is not None:  # keep the graph output's name stable
        y.name = None
        out.name = name
    return None


# ---- forward fold: BN -> Conv ---------------------------------------------------------------


def _match_forward(graph: ir.Graph, bn: ir.Node, params: _BatchNorm) -> WeightLayer | _Miss:
    y = bn.outputs[0]
    conv = sole_consumer(y)
    if not is_op(conv, "Conv") or conv.inputs[0] is not y:
        return _Miss("output is not read by a Conv alone", False)
    if conv.graph is not graph:
        return _Miss(f"Conv '{conv.name}' is in another graph", True)
    layer = as_layer(conv)
    if isinstance(layer, str):
        return _Miss(f"Conv '{conv.name}': {layer}", True)
    problem = (
        _padding_problem(layer)
        or _layer_problem(layer)
        or _channel_problem(layer.in_channels, params.channels, "input")
    )
    if problem:
        return _Miss(problem, True)
    return layer


def _padding_problem(layer: WeightLayer) -> str | None:
    node = layer.node
    pads = attr(node, "pads") or ()
    why = "zero padding of BN(x) is not BN of padded x"
    if any(int(p) for p in pads):
        return f"Conv '{node.name}' pads its input ({why})"
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    kernel = layer.canonical_shape[2:]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and any(int(k) > 1 for k in kernel):
        return f"Conv '{node.name}' pads its input: auto_pad={auto_pad} ({why})"
    return None


def _fold_forward(
    graph: ir.Graph, bn: ir.Node, layer: WeightLayer, params: _BatchNorm
) -> str | None:
    a, s = params.scale_shift()
    wc = layer.canonical().astype(np.float64)
    c = layer.in_channel_index()  # (C_out, C_in/g): the input channel each Wc[o, j] reads
    expand = (slice(None), slice(None)) + (None,) * (wc.ndim - 2)
    with np.errstate(all="ignore"):
        w_new = wc * a[c][expand]
        shift = (wc * s[c][expand]).reshape(wc.shape[0], -1).sum(axis=1)
        b_new = layer.bias().astype(np.float64) + shift
    problem = _finite_problem(layer, w_new, b_new)
    if problem:
        return problem

    _write(graph, layer, w_new, b_new)
    layer.node.replace_input_with(0, bn.inputs[0])
    graph.remove(bn, safe=True)
    return None


# ---- shared checks and writes ---------------------------------------------------------------


def _layer_problem(layer: WeightLayer) -> str | None:
    weight = layer.weight
    problem = weight_problem(weight, [layer.node])
    if not _has_trailing_add(layer):  # a Conv's trailing Add is checked by _conv_add_problem
        problem = problem or layer.bias_problem()
    if problem:
        return problem
    if weight.const_value.dtype not in _FLOAT_TYPES:
        return f"weight '{weight.name}' has dtype {weight.const_value.dtype}"
    if layer.op_type == "Gemm" and float(attr(layer.node, "beta", 1.0)) == 0.0:
        return f"Gemm '{layer.node.name}' has beta=0 (its bias cannot be rescaled)"
    return None


def _channel_shape(channels: int, rank: int) -> tuple[int, ...]:
    return (1, channels) + (1,) * (rank - 2)


def _has_trailing_add(layer: WeightLayer) -> bool:
    """A Conv/ConvTranspose whose bias is a following Add of a (1, C, 1, …) constant."""
    return layer.op_type in ("Conv", "ConvTranspose") and layer.bias_node not in (None, layer.node)


def _channel_problem(layer_channels: int, bn_channels: int, side: str) -> str | None:
    if layer_channels != bn_channels:
        return f"BN has {bn_channels} channels, the layer {layer_channels} {side} channels"
    return None


def _finite_problem(layer: WeightLayer, w: np.ndarray, b: np.ndarray) -> str | None:
    dtype = layer.weight.const_value.dtype.numpy()
    bias = layer.bias_value
    bias_dtype = bias.const_value.dtype.numpy() if bias is not None else dtype
    with np.errstate(all="ignore"):
        finite = (
            np.isfinite(w.astype(dtype).astype(np.float64)).all()
            and np.isfinite(b.astype(np.float32).astype(bias_dtype).astype(np.float64)).all()
        )
    if not finite:
        return "folded weights would not be finite"
    return None


def _write(graph: ir.Graph, layer: WeightLayer, wc: np.ndarray, b: np.ndarray) -> None:
    """Store the new canonical weight and bias; a created bias gets the weight's dtype."""
    created = layer.bias_value is None
    layer.set_canonical(wc)
    layer.set_bias(graph, b)
    value = layer.bias_value
    dtype = layer.weight.const_value.dtype
    if created and value is not None and value.const_value.dtype != dtype:
        # WeightLayer.set_bias creates float32 biases; a float16 layer needs a float16 one
        arr = np.asarray(b, dtype=dtype.numpy()).reshape(value.const_value.shape)
        value.const_value = ir.Tensor(arr, name=value.name)
        value.dtype = dtype
