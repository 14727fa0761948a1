"""Weight layers in one canonical form: Conv, ConvTranspose, Gemm, MatMul with a constant weight.

Every pass that edits weights per channel (BN fold, CLE, high-bias fold) and the inspector work on
the *canonical* weight ``Wc`` of shape ``(C_out, C_in / groups, *kernel)``:

* Conv ``W (C_out, C_in/g, k…)`` is already canonical.
* ConvTranspose ``W (C_in, C_out/g, k…)``: output channel ``o = gi·(C_out/g) + j`` of group
  ``gi`` reads rows ``gi·(C_in/g) …``; the transpose per group gives the canonical layout.
* Gemm ``Y = α·A·B' + β·C``: ``B' = B`` (K, N) when ``transB = 0`` → ``Wc = Bᵀ``; ``B`` (N, K)
  when ``transB = 1`` → ``Wc = B``. The effective bias is ``β·C`` when C is constant of size N.
* MatMul ``Y = X·B`` with a constant 2-D ``B (K, N)``: ``Wc = Bᵀ``; its bias is the constant
  operand of a following ``Add`` of size N, if any.

In canonical form, scaling output channel ``o`` by ``s_o`` is ``Wc[o] *= s_o``, and scaling input
channel ``c`` is ``Wc[o, j] *= s_{c}`` with ``c = (o // (C_out/g))·(C_in/g) + j``.
"""

from __future__ import annotations

__all__ = ["WeightLayer", "as_layer", "WEIGHT_OPS"]

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.passes._graph import add_initializer, attr, constant, is_op, set_constant, sole_consumer

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class WeightLayer:
    node: ir.Node
    weight: ir.Value
    groups: int
    #: the node that holds the bias: the layer itself, or a MatMul's trailing Add
    bias_node: ir.Node | None
    bias_index: int | None

    # ---- weight -------------------------------------------------------------------------
    @property
    def op_type(self) -> str:
        return self.node.op_type

    def canonical(self) -> np.ndarray:
        w = self.weight.const_value.numpy()
        op, g = self.op_type, self.groups
        if op == "Conv":
            return w
        if op == "ConvTranspose":
            cin, cout_g = w.shape[0], w.shape[1]
            k = w.shape[2:]
            w = w.reshape(g, cin // g, cout_g, *k).swapaxes(1, 2)
            return w.reshape(g * cout_g, cin // g, *k)
        if op == "Gemm" and attr(self.node, "transB", 0):
            return w
        return w.T  # Gemm transB=0, MatMul

    def to_native(self, wc: np.ndarray) -> np.ndarray:
        op, g = self.op_type, self.groups
        if op == "Conv":
            return wc
        if op == "ConvTranspose":
            cout, cin_g = wc.shape[0], wc.shape[1]
            k = wc.shape[2:]
            w = wc.reshape(g, cout // g, cin_g, *k).swapaxes(1, 2)
            return w.reshape(g * cin_g, cout // g, *k)
        if op == "Gemm" and attr(self.node, "transB", 0):
            return wc
        return wc.T

    def set_canonical(self, wc: np.ndarray) -> None:
        set_constant(self.weight, self.to_native(wc))

    @property
    def out_channels(self) -> int:
        return int(self.canonical_shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.canonical_shape[1]) * self.groups

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        shape = tuple(self.weight.const_value.shape)
        op, g = self.op_type, self.groups
        if op == "Conv":
            return shape
        if op == "ConvTranspose":
            return (shape[1] * g, shape[0] // g, *shape[2:])
        if op == "Gemm" and attr(self.node, "transB", 0):
            return shape
        return (shape[1], shape[0])

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group and one output channel per group (multiplier 1)."""
        shape = self.canonical_shape
        return self.groups > 1 and shape[1] == 1 and shape[0] == self.groups

    def in_channel_index(self) -> np.ndarray:
        """For canonical ``Wc[o, j]``, the input channel it reads: shape (C_out, C_in/g)."""
        cout, cin_g = self.canonical_shape[:2]
        o = np.arange(cout)[:, None]
        j = np.arange(cin_g)[None, :]
        return (o // (cout // self.groups)) * cin_g + j

    def _grouped(self, wc: np.ndarray) -> np.ndarray:
        """A view of canonical ``wc`` as (groups, C_out/g, C_in/g, kernel elements)."""
        g = self.groups
        return wc.reshape(g, wc.shape[0] // g, wc.shape[1], -1)

    def in_ranges(self, wc: np.ndarray) -> np.ndarray:
        """max |w| per input channel of canonical ``wc``: shape (C_in,)."""
        view = self._grouped(wc)
        return np.maximum(view.max(axis=(1, 3)), -view.min(axis=(1, 3))).reshape(-1)

    def scale_inputs_(self, wc: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Multiply, in place, the weights reading input channel c by ``s[c]``; returns ``wc``."""
        view = self._grouped(wc)
        if not np.shares_memory(view, wc):
            raise ValueError("scale_inputs_ needs a C-contiguous canonical weight")
        view *= np.asarray(s, dtype=wc.dtype).reshape(self.groups, 1, view.shape[2], 1)
        return wc

    def input_dot(self, wc: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Per output channel o: Σ over inputs c and kernel of ``Wc[o, c, k]·v[c]``: (C_out,)."""
        view = self._grouped(wc)
        per_input = view.sum(axis=3)  # (g, C_out/g, C_in/g)
        return (per_input * np.asarray(v).reshape(self.groups, 1, view.shape[2])).sum(axis=2).reshape(-1)

    # ---- bias ---------------------------------------------------------------------------
    @property
    def bias_value(self) -> ir.Value | None:
        if self.bias_node is None or self.bias_index is None:
            return None
        inputs = self.bias_node.inputs
        return inputs[self.bias_index] if len(inputs) > self.bias_index else None

    def bias(self) -> np.ndarray:
        """The effective bias per output channel (zeros when the layer has none)."""
        value = self.bias_value
        n = self.out_channels
        if value is None:
            return np.zeros(n, dtype=np.float64)
        b = constant(value).astype(np.float64)
        if self.op_type == "Gemm":
            b = b * float(attr(self.node, "beta", 1.0))
        return np.broadcast_to(b.reshape(-1), (n,)).copy()

    def bias_problem(self) -> str | None:
        """Why the bias cannot be read/written as a per-channel vector; None when it can."""
        if self.op_type == "Gemm" and float(attr(self.node, "beta", 1.0)) == 0.0:
            return f"Gemm '{self.node.name}' has beta=0 (its bias input is ignored)"
        value = self.bias_value
        if value is None:
            return None  # a bias input (or a MatMul's Add) can be created
        arr = constant(value)
        if arr is None:
            return f"bias '{value.name}' is not a constant"
        if arr.size != 1 and (arr.size != self.out_channels or arr.shape[-1] != arr.size):
            return f"bias '{value.name}' of shape {arr.shape} is not per output channel"
        if value.is_graph_output() or any(n is not self.bias_node for n in value.consumers()):
            return f"bias '{value.name}' is shared with other nodes"
        return None

    def set_bias(self, graph: ir.Graph, b: np.ndarray) -> None:
        """Write the effective bias ``b`` (per output channel), creating the input if needed."""
        dtype = self.weight.const_value.dtype.numpy()
        b = np.asarray(b, dtype=np.float64).reshape(-1)
        value = self.bias_value
        if value is not None:
            old = constant(value)
            if self.op_type == "Gemm":
                b = b / float(attr(self.node, "beta", 1.0))
            shape = old.shape if old.size == b.size else (b.size,)
            set_constant(value, b.reshape(shape).astype(old.dtype))
            return
        name = f"{self.node.name or self.weight.name}_bias"
        if self.op_type in ("Conv", "ConvTranspose"):
            new = add_initializer(graph, b.astype(dtype), name)
            self.node.resize_inputs(3)
            self.node.replace_input_with(2, new)
            self.bias_node, self.bias_index = self.node, 2
        elif self.op_type == "Gemm":
            beta = float(attr(self.node, "beta", 1.0))
            new = add_initializer(graph, (b / beta).astype(dtype), name)
            self.node.resize_inputs(3)
            self.node.replace_input_with(2, new)
            self.bias_node, self.bias_index = self.node, 2
        else:  # MatMul: Y = X·B  →  Y' = X·B + b
            new = add_initializer(graph, b.astype(dtype), name)
            out = self.node.outputs[0]
            add = ir.node("Add", inputs=[out, new], name=f"{self.node.name or self.weight.name}_bias_add")
            add_out = add.outputs[0]
            add_out.shape, add_out.type = out.shape, out.type
            graph.insert_after(self.node, add)
            for usage in list(out.uses()):
                if usage.node is not add:
                    usage.node.replace_input_with(usage.idx, add_out)
            if out.is_graph_output():
                _swap_graph_output(graph, out, add_out)
            self.bias_node, self.bias_index = add, 1

    @property
    def output(self) -> ir.Value:
        """The value after the bias (the trailing Add of a MatMul when there is one)."""
        if self.bias_node is not None and self.bias_node is not self.node:
            return self.bias_node.outputs[0]
        return self.node.outputs[0]


def _swap_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    name = old.name
    for i, o in enumerate(graph.outputs):
        if o is old:
            graph.outputs[i] = new
    old.name = None
    new.name = name


def as_layer(node: ir.Node) -> WeightLayer | str:
    """The node as a :class:`WeightLayer`, or the reason it is not one."""
    if not is_op(node, WEIGHT_OPS):
        return f"{node.op_type} is not a weight layer"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "no weight input"
    weight = node.inputs[1]
    if weight.is_graph_input():
        return f"weight '{weight.name}' is a graph input"
    if constant(weight) is None:
        return f"weight '{weight.name}' is not a constant"
    w_shape = weight.const_value.shape
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        groups = int(attr(node, "group", 1))
        if len(w_shape) < 3:
            return f"weight '{weight.name}' has rank {len(w_shape)}"
        if op == "ConvTranspose" and w_shape[0] % groups:
            return f"weight '{weight.name}' does not split into {groups} groups"
        return WeightLayer(node, weight, groups, node, 2)
    if len(w_shape) != 2:
        return f"weight '{weight.name}' has rank {len(w_shape)} (only 2-D weights are layers)"
    if op == "Gemm":
        return WeightLayer(node, weight, 1, node, 2)
    # MatMul: the weight must be the second operand; a constant first operand is not a layer
    if constant(node.inputs[0]) is not None:
        return "both MatMul operands are constant"
    add = sole_consumer(node.outputs[0])
    if is_op(add, "Add"):
        other = 1 if add.inputs[0] is node.outputs[0] else 0
        b = constant(add.inputs[other])
        n = int(w_shape[1])
        if b is not None and b.size == n and b.shape[-1] == n:
            return WeightLayer(node, weight, 1, add, other)
    return WeightLayer(node, weight, 1, None, None)
