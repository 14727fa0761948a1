"""Weight layers as linear maps on sampled rows: what AdaRound, SeqMSE and bias correction share.

A quantized weight layer is, at each output position, ``y = W·p + b`` followed by its activation
``f``: ``p`` is the input patch (the receptive field) read by that output position, ``W`` the
canonical weight ``(C_out, C_in/g · kernel)`` of each group. The algorithms optimize ``W``'s
quantization on a **sample of output positions**, so only ``rows × patch`` numbers per layer are
kept, never whole activations:

* Conv: output position ``o`` (per spatial axis) reads input ``i = o·stride − pad_begin +
  k·dilation`` for kernel index ``k`` (zero outside the input);
* ConvTranspose: ``y[o] = Σ x[i]·W[c_in, c_out, k]`` over ``o = i·stride − pad_begin + k·dilation``,
  i.e. ``i = (o + pad_begin − k·dilation) / stride`` when that is an integer inside the input;
* Gemm: rows of ``α·A`` (``Aᵀ`` when ``transA``); MatMul: the rows of the flattened leading axes.

The activation that follows the layer is modelled with its real parameters (:class:`Activation`):
Relu, Clip with its bounds, LeakyRelu, PRelu with its slopes, HardSigmoid, HardSwish, Sigmoid,
and the Swish / hard-swish spelled ``Mul(x, Sigmoid(x))`` / ``Mul(x, HardSigmoid(x))``.
"""

from __future__ import annotations

__all__ = ["Activation", "Layer", "find_layers", "quantized_layer_map"]

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from onnxq.passes._graph import attr, clip_bounds, constant, is_op, sole_consumer
from onnxq.passes._layers import WeightLayer, as_layer

log = logging.getLogger(__name__)


# ---- activations ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Activation:
    """``f`` and its derivative on (rows, C_out) arrays; ``kind`` names it in logs."""

    kind: str
    params: tuple = ()

    def __call__(self, y: np.ndarray) -> np.ndarray:
        k, p = self.kind, self.params
        if k == "identity":
            return y
        if k == "relu":
            return np.maximum(y, 0)
        if k == "clip":
            lo, hi = p
            return np.clip(y, -np.inf if lo is None else lo, np.inf if hi is None else hi)
        if k == "leaky_relu":
            return np.where(y >= 0, y, y * p[0])
        if k == "prelu":
            return np.where(y >= 0, y, y * p[0])
        if k == "hard_sigmoid":
            return np.clip(p[0] * y + p[1], 0, 1)
        if k == "hard_swish":
            return y * np.clip(p[0] * y + p[1], 0, 1)
        if k == "sigmoid":
            return _sigmoid(y)
        if k == "swish":
            return y * _sigmoid(y)
        raise AssertionError(k)

    def grad(self, y: np.ndarray) -> np.ndarray:
        """``f'(y)`` elementwise."""
        k, p = self.kind, self.params
        one = np.ones_like(y)
        if k == "identity":
            return one
        if k == "relu":
            return (y > 0).astype(y.dtype)
        if k == "clip":
            lo, hi = p
            inside = np.ones(y.shape, bool)
            if lo is not None:
                inside &= y > lo
            if hi is not None:
                inside &= y < hi
            return inside.astype(y.dtype)
        if k in ("leaky_relu", "prelu"):
            return np.where(y >= 0, one, one * p[0])
        if k == "hard_sigmoid":
            t = p[0] * y + p[1]
            return ((t > 0) & (t < 1)) * np.asarray(p[0], y.dtype)
        if k == "hard_swish":
            t = p[0] * y + p[1]
            inside = (t > 0) & (t < 1)
            return np.where(inside, t + p[0] * y, (t >= 1).astype(y.dtype))
        if k == "sigmoid":
            s = _sigmoid(y)
            return s * (1 - s)
        if k == "swish":
            s = _sigmoid(y)
            return s + y * s * (1 - s)
        raise AssertionError(k)


def _sigmoid(y: np.ndarray) -> np.ndarray:
    return (0.5 * (1 + np.tanh(0.5 * y))).astype(y.dtype, copy=False)


def _channel_vector(arr: np.ndarray, channels: int, channel_axis_last: bool) -> np.ndarray | None:
    """A per-channel vector from a PRelu slope that broadcasts per channel, else None."""
    arr = np.asarray(arr, np.float32)
    if arr.size == 1:
        return np.full(channels, float(arr.reshape(())), np.float32)
    if arr.size != channels:
        return None
    if channel_axis_last:
        return arr.reshape(-1) if arr.shape[-1] == channels else None
    squeezed = [d for d in arr.shape if d != 1]
    return arr.reshape(-1) if squeezed == [channels] else None


def _activation_after(value: ir.Value, channels: int, channel_last: bool) -> Activation:
    users = [u.node for u in value.uses()]
    if value.is_graph_output() or not users:
        return Activation("identity")
    if len(users) == 2:  # Mul(x, Sigmoid(x)) / Mul(x, HardSigmoid(x))
        gate = next((n for n in users if is_op(n, ("Sigmoid", "HardSigmoid"))), None)
        mul = next((n for n in users if is_op(n, "Mul")), None)
        if gate is not None and mul is not None and gate.outputs[0] in mul.inputs and value in mul.inputs:
            if gate.op_type == "Sigmoid":
                return Activation("swish")
            return Activation("hard_swish", (float(attr(gate, "alpha", 0.2)), float(attr(gate, "beta", 0.5))))
        return Activation("identity")
    node = users[0]
    if len(users) != 1 or node.inputs[0] is not value:
        return Activation("identity")
    op = node.op_type if node.domain in ("", "ai.onnx") else ""
    if op == "Relu":
        return Activation("relu")
    if op == "Clip":
        bounds = clip_bounds(node)
        if isinstance(bounds, str):
            return Activation("identity")
        return Activation("clip", bounds)
    if op == "LeakyRelu":
        return Activation("leaky_relu", (float(attr(node, "alpha", 0.01)),))
    if op == "PRelu":
        slope = constant(node.inputs[1])
        vec = None if slope is None else _channel_vector(slope, channels, channel_last)
        return Activation("prelu", (vec,)) if vec is not None else Activation("identity")
    if op == "HardSigmoid":
        return Activation("hard_sigmoid", (float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5))))
    if op == "HardSwish":
        return Activation("hard_swish", (1 / 6, 0.5))
    if op == "Sigmoid":
        return Activation("sigmoid")
    return Activation("identity")


# ---- layers -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Layer:
    """A weight layer of the float model, in the form the row-based algorithms use."""

    node: ir.Node
    weight_layer: WeightLayer
    activation: Activation
    #: kernel geometry (Conv / ConvTranspose): spatial rank, strides, pads (begin), dilations
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    alpha: float = 1.0
    trans_a: bool = False

    @property
    def name(self) -> str:
        return self.node.name or self.weight_layer.weight.name or "?"

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def groups(self) -> int:
        return self.weight_layer.groups

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        """The layer's value after its bias (a MatMul's trailing Add included)."""
        return self.weight_layer.output

    def weight_matrix(self) -> np.ndarray:
        """Canonical weight as ``(groups, C_out/g, C_in/g · kernel)`` float32."""
        wc = self.weight_layer.canonical().astype(np.float32)
        g = self.groups
        return wc.reshape(g, wc.shape[0] // g, -1)

    def bias(self) -> np.ndarray:
        return self.weight_layer.bias().astype(np.float32)

    # -- rows -----------------------------------------------------------------------------
    def positions(self, out_shape: tuple[int, ...], count: int, rng: np.random.Generator,
                  valid: np.ndarray | None = None) -> np.ndarray:
        """``count`` distinct output positions (flat indices over all but the channel axis),
        drawn among the flat indices ``valid`` when given (e.g. the tokens that are not padding)."""
        if valid is None:
            valid_count = self.n_positions(out_shape)
            if count >= valid_count:
                return np.arange(valid_count)
            return np.sort(rng.choice(valid_count, size=count, replace=False))
        if count >= len(valid):
            return np.asarray(valid, np.int64)
        return np.sort(np.asarray(valid, np.int64)[rng.choice(len(valid), size=count, replace=False)])

    def valid_positions(self, out_shape: tuple[int, ...], mask: np.ndarray) -> np.ndarray | None:
        """The flat output positions whose leading indices ``mask`` (e.g. an attention mask
        ``[N, L]``) marks non-zero; ``None`` when this layer's rows are not laid out that way
        (a Conv, or an output whose leading axes are not the mask's)."""
        if self.op_type != "MatMul" or len(out_shape) != mask.ndim + 1 or \
                tuple(out_shape[:-1]) != tuple(mask.shape):
            return None
        return np.flatnonzero(mask.reshape(-1))

    def n_positions(self, out_shape: tuple[int, ...]) -> int:
        if self.op_type in ("Conv", "ConvTranspose"):
            return int(out_shape[0] * math.prod(out_shape[2:]))
        return int(math.prod(out_shape[:-1]))

    def output_rows(self, y: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Output values at ``positions``: ``(rows, C_out)`` float32."""
        if self.op_type in ("Conv", "ConvTranspose"):
            moved = np.moveaxis(y, 1, -1)
            flat = moved.reshape(-1, y.shape[1])
        else:
            flat = y.reshape(-1, y.shape[-1])
        return np.ascontiguousarray(flat[positions], dtype=np.float32)

    def input_rows(self, x: np.ndarray, out_shape: tuple[int, ...], positions: np.ndarray) -> np.ndarray:
        """Input patches at output ``positions``: ``(rows, groups, C_in/g · kernel)`` float32."""
        if self.op_type == "Gemm":
            a = x.T if self.trans_a else x
            rows = a[positions] * np.float32(self.alpha)
            return np.ascontiguousarray(rows, np.float32)[:, None, :]
        if self.op_type == "MatMul":
            flat = x.reshape(-1, x.shape[-1])
            return np.ascontiguousarray(flat[positions], np.float32)[:, None, :]
        spatial = out_shape[2:]
        n_idx, *o_idx = np.unravel_index(positions, (out_shape[0], *spatial))
        xc = np.moveaxis(x, 1, -1)  # (N, *S, C)
        in_spatial = x.shape[2:]
        index: list[np.ndarray] = []
        valid = np.ones((len(positions),) + tuple(self.kernel), bool)
        d = len(spatial)
        for j in range(d):
            k = np.arange(self.kernel[j]) * self.dilations[j]
            o = o_idx[j][:, None]
            if self.op_type == "Conv":
                i = o * self.strides[j] - self.pads[j] + k[None, :]
                ok = (i >= 0) & (i < in_spatial[j])
            else:
                num = o + self.pads[j] - k[None, :]
                i = num // self.strides[j]
                ok = (num % self.strides[j] == 0) & (i >= 0) & (i < in_spatial[j])
            shape = [len(positions)] + [1] * d
            shape[1 + j] = self.kernel[j]
            index.append(np.clip(i, 0, in_spatial[j] - 1).reshape(shape))
            valid &= ok.reshape(shape)
        n_b = n_idx.reshape([len(positions)] + [1] * d)
        patches = xc[(n_b, *index)]  # (P, *k, C)
        patches = patches * valid[..., None]
        patches = np.moveaxis(patches, -1, 1)  # (P, C, *k)
        p, c = patches.shape[0], patches.shape[1]
        g = self.groups
        return np.ascontiguousarray(patches.reshape(p, g, (c // g) * math.prod(self.kernel)), np.float32)


def _conv_geometry(node: ir.Node, w_shape: tuple[int, ...]) -> tuple | str:
    kernel = tuple(int(k) for k in w_shape[2:])
    d = len(kernel)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad={auto_pad} is not supported"
    if node.op_type == "ConvTranspose" and attr(node, "output_shape") is not None:
        return "ConvTranspose with output_shape is not supported"
    strides = tuple(int(s) for s in (attr(node, "strides") or [1] * d))
    dilations = tuple(int(s) for s in (attr(node, "dilations") or [1] * d))
    pads = tuple(int(s) for s in (attr(node, "pads") or [0] * (2 * d)))[:d]
    if auto_pad == "VALID":
        pads = (0,) * d
    return kernel, strides, pads, dilations


def find_layers(model: ir.Model, names: set[str] | None = None) -> tuple[list[Layer], list[tuple[str, str]]]:
    """The main graph's weight layers in topological order, and (node, reason) for the others."""
    layers: list[Layer] = []
    skipped: list[tuple[str, str]] = []
    for node in model.graph:
        if names is not None and (node.name or "") not in names:
            continue
        wl = as_layer(node)
        if isinstance(wl, str):
            if names is not None:
                skipped.append((node.name or "", wl))
            continue
        op = node.op_type
        channels = wl.out_channels
        if op in ("Conv", "ConvTranspose"):
            geo = _conv_geometry(node, tuple(wl.weight.const_value.shape))
            if isinstance(geo, str):
                skipped.append((node.name or "", geo))
                continue
            act = _activation_after(wl.output, channels, channel_last=False)
            layers.append(Layer(node, wl, act, *geo))
        else:
            trans_a = bool(attr(node, "transA", 0)) if op == "Gemm" else False
            alpha = float(attr(node, "alpha", 1.0)) if op == "Gemm" else 1.0
            act = _activation_after(wl.output, channels, channel_last=True)
            layers.append(Layer(node, wl, act, alpha=alpha, trans_a=trans_a))
    return layers, skipped


def quantized_layer_map(qdq: ir.Model) -> dict[str, tuple[ir.Node, ir.Node]]:
    """For each weight layer of a QDQ model: name → (layer node, its weight DequantizeLinear)."""
    found: dict[str, tuple[ir.Node, ir.Node]] = {}
    for node in qdq.graph:
        if not is_op(node, ("Conv", "ConvTranspose", "Gemm", "MatMul")) or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        dq = w.producer() if w is not None else None
        if is_op(dq, "DequantizeLinear") and dq.inputs[0] is not None and dq.inputs[0].const_value is not None:
            found[node.name or ""] = (node, dq)
    return found


def trailing_add(node: ir.Node) -> ir.Node | None:
    add = sole_consumer(node.outputs[0])
    return add if is_op(add, "Add") else None
