"""SplitIdentity: take a folded identity branch out of a square convolution's weight.

Re-parameterized blocks (RepVGG, PP-LCNetV3's learnable rep layers in PP-OCRv4) fold an identity
branch into a ``Cin = Cout`` convolution: the branch adds ``d_c`` to the centre tap of
``W[c, c]``. Those diagonal entries can dwarf the rest of the weight (PP-OCRv4 rec: 22.5 against
3.2 for everything else in a 480×480 1x1 conv), so one per-tensor scale leaves the other entries
a handful of levels. The identity is linear and commutes with nothing to undo, so::

    Conv(x, W, b) = Conv(x, W − D, b) + x ⊙ d,     D[c, c, centre] = d_c

is exact (up to float32 summation order) for a convolution whose output has the input's shape
at every position the centre tap reads: ``group = 1``, ``Cin = Cout``, stride 1, odd kernels with
``pads = dilation·(k − 1)/2`` on both sides (the centre tap then reads ``x`` at the output
position; zero padding never reaches it). ``d`` keeps only the diagonal entries larger in
magnitude than every other entry of ``W`` (the rest stay in the conv), so the conv's weight
range shrinks to the largest remaining entry; the split is made when that shrinks the range by
at least ``min_gain`` (default 2: a smaller gain does not pay for an extra Mul and Add).

The new nodes are ``Mul(x, d)`` (``d`` shaped ``[1, C, 1, …]``) and ``Add(conv, mul)``; the Add
takes the conv's output name, the conv writes ``<name>_conv``. Quantized, they run as
QLinearMul / QLinearAdd next to the QLinearConv. Skipped, with a reason: grouped, strided or
non-square convolutions, shapes that change, even kernels, weights that are not editable
constants, and layers without a dominant diagonal.
"""

from __future__ import annotations

__all__ = ["SplitIdentity"]

import numpy as np
import onnx_ir as ir

from onnxq.passes._graph import BN_STATS_KEY, add_initializer, attr, constant, is_op, weight_problem
from onnxq.passes.base import OnnxqPass


class SplitIdentity(OnnxqPass):
    name = "split-identity"
    verb = "identity branches split"

    def __init__(self, min_gain: float = 2.0) -> None:
        super().__init__()
        if not min_gain >= 1.0:
            raise ValueError(f"min_gain must be at least 1, got {min_gain}")
        self.min_gain = float(min_gain)

    def run_on_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        modified = False
        for node in list(graph):
            if not is_op(node, "Conv"):
                continue
            found = self._match(node)
            if isinstance(found, str):
                self.skip(node, found)
                continue
            _split(graph, node, *found)
            self.changed()
            modified = True
        return modified

    def _match(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
        if len(node.inputs) < 2 or node.inputs[0] is None:
            return "Conv has no weight"
        problem = weight_problem(node.inputs[1], [node])
        if problem:
            return problem
        w = constant(node.inputs[1])
        if w.ndim < 3 or w.dtype.kind != "f":
            return f"weight of rank {w.ndim} / dtype {w.dtype} is not a float conv weight"
        if attr(node, "group", 1) != 1:
            return "grouped convolution"
        if w.shape[0] != w.shape[1]:
            return f"not square ({w.shape[1]} inputs, {w.shape[0]} outputs)"
        kernel = w.shape[2:]
        spatial = len(kernel)
        if any(k % 2 == 0 for k in kernel):
            return f"even kernel {tuple(kernel)} has no centre tap"
        if any(s != 1 for s in attr(node, "strides", [1] * spatial)):
            return "strided convolution"
        auto_pad = attr(node, "auto_pad", "NOTSET") or "NOTSET"
        if auto_pad not in ("SAME_UPPER", "SAME_LOWER") and not (
            auto_pad == "NOTSET" and _same_pads(node, kernel)
        ):
            return "padding changes the spatial shape (the centre tap does not read x in place)"
        x = node.inputs[0]
        if x.shape is not None and len(x.shape) != spatial + 2:
            return f"input of rank {len(x.shape)} for a {spatial}-D kernel"
        centre = tuple(k // 2 for k in kernel)
        c = np.arange(w.shape[0])
        diag = w[(c, c) + tuple(np.full_like(c, i) for i in centre)].astype(np.float64)
        rest = np.array(w, np.float64)
        rest[(c, c) + tuple(np.full_like(c, i) for i in centre)] = 0.0
        bound = float(np.max(np.abs(rest))) if rest.size else 0.0
        moved = np.abs(diag) > bound
        full = float(np.max(np.abs(w)))
        remaining = max(bound, float(np.max(np.abs(np.where(moved, 0.0, diag)))))
        if not moved.any() or full < self.min_gain * remaining:
            return (f"no dominant identity (weight range {full:.3g}, {remaining:.3g} without "
                    f"the diagonal: gain below {self.min_gain:g})")
        return diag, moved


def _same_pads(node: ir.Node, kernel: tuple[int, ...]) -> bool:
    spatial = len(kernel)
    pads = list(attr(node, "pads", [0] * 2 * spatial))
    dilations = list(attr(node, "dilations", [1] * spatial))
    want = [d * (k - 1) // 2 for d, k in zip(dilations, kernel)]
    return pads[:spatial] == want and pads[spatial:] == want


def _split(graph: ir.Graph, node: ir.Node, diag: np.ndarray, moved: np.ndarray) -> None:
    weight = node.inputs[1]
    w = np.array(constant(weight))
    kernel = w.shape[2:]
    centre = tuple(k // 2 for k in kernel)
    c = np.flatnonzero(moved)
    w[(c, c) + tuple(np.full_like(c, i) for i in centre)] = 0
    weight.const_value = ir.Tensor(w, name=weight.name)

    out = node.outputs[0]
    name = out.name or node.name or "conv"
    d = np.where(moved, diag, 0.0).astype(w.dtype).reshape((1, -1) + (1,) * len(kernel))
    d_value = add_initializer(graph, d, f"{node.name or name}_identity_diagonal")
    readers = list(out.uses())
    is_output = out.is_graph_output()
    mul = ir.node("Mul", [node.inputs[0], d_value], name=f"{node.name or name}_identity_mul")
    add = ir.node("Add", [out, mul.outputs[0]], name=f"{node.name or name}_identity_add")
    for value in (mul.outputs[0], add.outputs[0]):
        value.shape, value.type = out.shape, out.type
    mul.outputs[0].name = f"{name}_identity"
    graph.insert_after(node, [mul, add])
    for usage in readers:
        usage.node.replace_input_with(usage.idx, add.outputs[0])
    if is_output:
        for i, o in enumerate(graph.outputs):
            if o is out:
                graph.outputs[i] = add.outputs[0]
    out.name = f"{name}_conv"
    add.outputs[0].name = name
    # the folded BN's N(β, γ²) describes the sum, no longer the conv's own output: analytic
    # bias correction must not read it there
    node.meta.pop(BN_STATS_KEY, None)
