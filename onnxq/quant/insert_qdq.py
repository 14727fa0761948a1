"""Carry out a :class:`~onnxq.quant.annotate.QuantPlan`: standard QuantizeLinear/DequantizeLinear.

* an activation ``x`` becomes ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)`` and every reader
  of ``x`` reads the dequantized value (one pair per tensor, shared by all readers);
* a weight is stored as integers (``<name>_quantized``) and read through ``DequantizeLinear``
  (with ``axis`` when per channel), so the file shrinks and onnxruntime fuses the pattern into
  integer kernels (QLinearConv, QLinearMatMul, …);
* a bias is stored as int32 with scale ``s_input · s_weight`` and zero point 0;
* a constant operand of an integer Add / Mul is stored on the activations' grid (per tensor, over
  its own range with 0 included: a scalar ``c`` is exact, ``c = (q − z)·s`` with ``q`` at an end of
  the grid) and read through its own ``DequantizeLinear``, so QLinearAdd / QLinearMul fuse;
* an integer clip (a ``Min`` / ``Max`` with a constant bound, see :mod:`~onnxq.quant.annotate`)
  reads the integers of its input's QuantizeLinear and the bound stored on the same grid,
  ``clamp(round(c / s) + z, qmin, qmax)`` (float32 division, round half to even, as
  QuantizeLinear computes it), and its integer output is read through one DequantizeLinear per
  reader: ``Q(y) → Min(·, Q(c)) → DQ`` equals ``Q(min(y, c))`` bit for bit, since rounding and
  clamping are monotone;
* a Mul / Div by a positive scalar ``k`` that the plan folds disappears: ``DQ(q; s·k, z) =
  k·DQ(q; s, z)``, so the readers of ``x·k`` get ``DequantizeLinear`` of ``x``'s integers with the
  scale ``s·k`` (exact up to the float32 rounding of ``s·k``; one rounding fewer than quantizing
  ``x·k`` again).

The QDQ model *is* the simulation: plain onnxruntime runs it. Per-channel weights need opset ≥ 13,
16- and 4-bit tensors opset ≥ 21 (:func:`required_opset`).
"""

from __future__ import annotations

__all__ = ["Encoding", "insert_qdq", "required_opset"]

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnxq.errors import ConfigError
from onnxq.passes._graph import add_initializer, clip_bounds, constant, is_op
from onnxq.quant.annotate import ActivationGroup, IntegerClip, QuantPlan
from onnxq.quant.qparams import QRange, affine_params, quantize, qrange

_INT_TYPES = {
    (8, True): ir.DataType.INT8, (8, False): ir.DataType.UINT8,
    (16, True): ir.DataType.INT16, (16, False): ir.DataType.UINT16,
    (4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4,
    (32, True): ir.DataType.INT32,
}


@dataclasses.dataclass(frozen=True)
class Encoding:
    """One tensor's quantization grid; ``offset`` follows AIMET (``offset = −zero_point``)."""

    name: str
    kind: str  # "activation" | "param"
    bits: int
    symmetric: bool
    signed: bool
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None
    frozen: bool = False

    @property
    def offset(self) -> tuple[int, ...]:
        return tuple(-z for z in self.zero_point)

    def grid(self) -> QRange:
        return qrange(self.bits, signed=self.signed)


def required_opset(plan: QuantPlan) -> int:
    need = 10
    for site in plan.weights:
        if site.axis is not None:
            need = max(need, 13)
        if site.spec.bits != 8:
            need = max(need, 21)
    for group in plan.groups:
        if group.spec.bits != 8:
            need = max(need, 21)
    return need


def _int_tensor(codes: np.ndarray, bits: int, signed: bool, name: str) -> ir.Tensor:
    dtype = _INT_TYPES[(bits, signed)]
    if bits == 4:
        import ml_dtypes  # installed with onnx

        arr = codes.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
        return ir.Tensor(arr, dtype=dtype, name=name)
    return ir.Tensor(codes.astype(dtype.numpy()), name=name)


def _initializer(graph: ir.Graph, tensor: ir.Tensor, name: str) -> ir.Value:
    base, k = name, 1
    while name in graph.initializers:
        name, k = f"{base}_{k}", k + 1
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _dq(inputs: list[ir.Value], axis: int | None, name: str, like: ir.Value | None) -> ir.Node:
    attrs = {"axis": axis} if axis is not None else {}
    node = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{name}_DequantizeLinear")
    out = node.outputs[0]
    out.name = f"{name}_dq"
    if like is not None:
        out.shape, out.type = like.shape, like.type
    else:
        out.dtype = ir.DataType.FLOAT
    return node


def _activation_encoding(value: ir.Value, group: ActivationGroup, lo: float, hi: float) -> Encoding:
    spec = group.spec
    scale, zero, _ = affine_params(lo, hi, spec.bits, spec.symmetric, spec.strict)
    return Encoding(value.name or "", "activation", spec.bits, spec.symmetric, spec.signed,
                    (float(scale),), (int(zero),))


def insert_qdq(
    model: ir.Model,
    plan: QuantPlan,
    ranges: dict[int, tuple[float, float]],
    weight_ranges: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    given: dict[str, Encoding] | None = None,
) -> list[Encoding]:
    """Edit ``model`` in place; ``ranges`` maps ``id(group)`` → (lo, hi). Returns encodings.

    ``given``: encodings by tensor name (read from a file) used as they are instead of being
    derived from ranges — this is how an encodings file rebuilds the same QDQ model.
    """
    graph = model.graph
    given = given or {}
    encodings: list[Encoding] = []
    act_enc: dict[int, Encoding] = {}
    for group in plan.groups:
        if group.source is not None:
            continue
        lo, hi = ranges.get(id(group), (0.0, 0.0))
        for value in group.quantized:
            enc = given.get(value.name or "") or _activation_encoding(value, group, lo, hi)
            act_enc[id(value)] = enc
            encodings.append(enc)
    for clip in plan.clips:
        a = act_enc[id(clip.node.inputs[clip.data])]
        b = act_enc[id(clip.node.outputs[0])]
        if (a.scale, a.zero_point, a.bits, a.signed) != (b.scale, b.zero_point, b.bits, b.signed):
            raise ConfigError(
                f"the encodings of '{a.name}' and '{b.name}' differ, but the config runs "
                f"'{clip.node.name}' ({clip.node.op_type}) on integers, which needs one grid: "
                "rebuild with the config's integer_clips=False"
            )
    derived = _derived_order(plan)
    for group in derived:  # a scaled copy of its source's grid
        base = act_enc[id(group.source)]
        for value in group.quantized:
            enc = dataclasses.replace(
                base, name=value.name or "", scale=(float(base.scale[0]) * group.factor,)
            )
            act_enc[id(value)] = enc
            encodings.append(enc)

    # weights and biases first (they read the activations' scales before any rewiring)
    w_scale: dict[int, np.ndarray] = {}
    for site in plan.weights:
        w = site.value.const_value.numpy().astype(np.float64)
        if site.value.name in given:
            lo = hi = None
        elif weight_ranges and id(site.value) in weight_ranges:
            lo, hi = weight_ranges[id(site.value)]
        elif site.axis is None:
            lo, hi = np.array(w.min()), np.array(w.max())
        else:
            moved = np.moveaxis(w, site.axis, 0).reshape(w.shape[site.axis], -1)
            lo, hi = moved.min(axis=1), moved.max(axis=1)
        spec = site.spec
        known = given.get(site.value.name or "")
        if known is not None:
            if (known.axis is None) != (site.axis is None):
                raise ValueError(f"encoding of '{known.name}' and the config disagree on per-channel")
            scale = np.asarray(known.scale, np.float64).reshape(() if site.axis is None else -1)
            zero = np.asarray(known.zero_point, np.int64).reshape(scale.shape)
            rng = known.grid()
            spec = dataclasses.replace(spec, bits=known.bits, symmetric=known.symmetric)
        else:
            scale, zero, rng = affine_params(lo, hi, spec.bits, spec.symmetric, spec.strict)
        shape = [1] * w.ndim
        if site.axis is not None:
            shape[site.axis] = -1
        codes = quantize(w, scale.reshape(shape), zero.reshape(shape), rng)
        name = site.value.name or "weight"
        q_init = _initializer(graph, _int_tensor(codes, spec.bits, spec.signed, ""), f"{name}_quantized")
        s_init = add_initializer(graph, scale.astype(np.float32).reshape(-1 if site.axis is not None else ()), f"{name}_scale")
        z_init = _initializer(graph, _int_tensor(zero.reshape(-1 if site.axis is not None else ()), spec.bits, spec.signed, ""), f"{name}_zero_point")
        dq = _dq([q_init, s_init, z_init], site.axis, name, site.value)
        graph.insert_before(site.node, dq)
        site.node.replace_input_with(1, dq.outputs[0])
        w_scale[id(site.node)] = scale
        encodings.append(Encoding(name, "param", spec.bits, spec.symmetric, spec.signed,
                                  tuple(np.atleast_1d(scale).astype(float).tolist()),
                                  tuple(np.atleast_1d(zero).astype(int).tolist()), site.axis))

    for bias in plan.biases:
        x_enc = act_enc.get(id(bias.node.inputs[0]))
        if x_enc is None or id(bias.node) not in w_scale:
            continue
        b = constant(bias.value).astype(np.float64)
        per_channel = bias.weight.axis is not None
        # per-tensor weights: one scalar bias scale (DequantizeLinear's axis needs opset 13)
        scale = np.asarray(x_enc.scale[0] * w_scale[id(bias.node)], np.float64)
        full = np.broadcast_to(scale, b.shape)
        codes = np.clip(np.rint(b / full), -(2**31), 2**31 - 1).astype(np.int32)
        name = bias.value.name or "bias"
        q_init = _initializer(graph, ir.Tensor(codes), f"{name}_quantized")
        s_init = add_initializer(graph, scale.astype(np.float32), f"{name}_scale")
        zeros = np.zeros(b.shape if per_channel else (), np.int32)
        z_init = _initializer(graph, ir.Tensor(zeros), f"{name}_zero_point")
        dq = _dq([q_init, s_init, z_init], 0 if per_channel else None, name, bias.value)
        graph.insert_before(bias.node, dq)
        bias.node.replace_input_with(2, dq.outputs[0])
        scale = full
        encodings.append(Encoding(name, "param", 32, True, True,
                                  tuple(scale.astype(float).tolist()), tuple([0] * b.size), 0))

    # constant operands of integer element-wise ops: one integer copy per constant, one DQ per node
    stored: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
    for site in plan.constants:
        c = constant(site.value)
        name = site.value.name or "constant"
        if id(site.value) not in stored:
            known = given.get(name)
            if known is not None and known.kind == "param" and known.axis is None:
                scale = np.asarray(known.scale[0], np.float64)
                zero = np.asarray(known.zero_point[0], np.int64)
                bits, symmetric, signed = known.bits, known.symmetric, known.signed
                rng = known.grid()
            else:
                spec = site.spec
                scale, zero, rng = affine_params(
                    min(float(c.min()), 0.0), max(float(c.max()), 0.0), spec.bits,
                    spec.symmetric, spec.strict,
                )
                bits, symmetric, signed = spec.bits, spec.symmetric, spec.signed
            codes = quantize(c.astype(np.float64), scale, zero, rng)
            q_init = _initializer(graph, _int_tensor(codes, bits, signed, ""), f"{name}_quantized")
            s_init = add_initializer(graph, np.asarray(scale, np.float32).reshape(()), f"{name}_scale")
            z_init = _initializer(
                graph, _int_tensor(np.asarray(zero).reshape(()), bits, signed, ""), f"{name}_zero_point"
            )
            stored[id(site.value)] = (q_init, s_init, z_init)
            encodings.append(Encoding(name, "param", bits, symmetric, signed,
                                      (float(scale),), (int(zero),)))
        dq = _dq(list(stored[id(site.value)]), None, f"{name}_{site.node.name or 'node'}", site.value)
        graph.insert_before(site.node, dq)
        site.node.replace_input_with(site.index, dq.outputs[0])

    # activations
    first = graph.node(0) if len(graph) else None
    views: dict[int, tuple[ir.Value, ir.Value]] = {}  # value → (its integers, their zero point)
    clipped = {id(c.node.outputs[0]) for c in plan.clips}
    clip_inputs = [c.node.inputs[c.data] for c in plan.clips]  # before any rewiring
    for group in plan.groups:
        if group.source is None:
            for value in group.quantized:
                if id(value) not in clipped:
                    views[id(value)] = _wrap_activation(graph, value, act_enc[id(value)], first)
    clip_nodes = {id(c.node) for c in plan.clips}
    for clip, x in zip(plan.clips, clip_inputs):  # graph order: a chain Max → Min reads
        out = clip.node.outputs[0]                  # the integers of its head
        views[id(out)] = _integer_clip(graph, clip, views[id(x)], act_enc[id(out)], clip_nodes)
    for group in derived:
        for value in group.quantized:
            if group.folded is not None and value is group.folded.outputs[0]:
                views[id(value)] = _fold_scaling(
                    graph, group.folded, value, views[id(group.source)], act_enc[id(value)]
                )
            else:
                views[id(value)] = _wrap_activation(graph, value, act_enc[id(value)], first)
    return encodings


def _integer_clip(
    graph: ir.Graph, clip: IntegerClip, view: tuple[ir.Value, ir.Value], enc: Encoding,
    clip_nodes: set[int],
) -> tuple[ir.Value, ir.Value]:
    """Make ``clip.node`` compute on the integers ``view`` of its input with its bound on the
    grid ``enc``; its readers (other than integer clips) get one DequantizeLinear each."""
    node = clip.node
    integers, zero = view
    out = node.outputs[0]
    name = out.name or "clip"
    bound = node.inputs[clip.bound]
    c = np.asarray(constant(bound), np.float32)
    grid = enc.grid()
    scale32 = np.float32(enc.scale[0])
    codes = np.clip(np.rint(c / scale32).astype(np.float64) + enc.zero_point[0], grid.qmin, grid.qmax)
    codes = _tile_last_axis(codes, node.inputs[clip.data].shape)
    q_bound = _initializer(
        graph, _int_tensor(codes.astype(np.int64), enc.bits, enc.signed, ""),
        f"{bound.name or 'bound'}_{node.name or 'clip'}_quantized",
    )
    old_input = node.inputs[clip.data]
    node.replace_input_with(clip.data, integers)
    node.replace_input_with(clip.bound, q_bound)
    feeder = old_input.producer() if old_input is not None else None
    if is_op(feeder, "DequantizeLinear") and not old_input.uses() and \
            not old_input.is_graph_output():
        graph.remove(feeder, safe=True)  # the DQ that fed only this node
    readers = [u for u in out.uses() if id(u.node) not in clip_nodes]
    out.type = ir.TensorType(integers.dtype)  # a new type: a clone may share the old one
    scale = add_initializer(graph, np.array(enc.scale[0], np.float32), f"{name}_scale")
    for i, usage in enumerate(readers):
        dq = _dq([out, scale, zero], None, name if i == 0 else f"{name}_{i}", None)
        dq.outputs[0].shape = out.shape
        graph.insert_before(usage.node, dq)
        usage.node.replace_input_with(usage.idx, dq.outputs[0])
    out.name = f"{name}_quantized"
    return out, zero


def _tile_last_axis(bound: np.ndarray, shape: ir.Shape | None) -> np.ndarray:
    """A per-channel bound repeated along the data's last axis when that axis has a static size.

    Same values (broadcasting does it anyway); only onnxruntime's speed changes: its layout pass
    runs the Min in NHWC next to QLinearConv, where a ``[C]`` bound makes its broadcast loop
    take one span of ``C`` bytes at a time (EfficientNet-Lite0's first Min, [32, 112, 112, 32]
    uint8: 4.0 ms), and a ``[W, C]`` bound spans of ``W·C`` (0.9 ms; NCHW with ``[C, 1, 1]``:
    0.7 ms)."""
    if shape is None or bound.size <= 1 or bound.ndim < 2 or len(shape) < bound.ndim:
        return bound
    width = shape[len(shape) - 1]
    if not isinstance(width, int) or width <= 1 or bound.shape[-1] != 1:
        return bound
    return np.ascontiguousarray(np.broadcast_to(bound, bound.shape[:-1] + (width,)))


def _derived_order(plan: QuantPlan) -> list[ActivationGroup]:
    """Groups that copy another's grid, each after the group of its source."""
    owner = {id(v): g for g in plan.groups for v in g.quantized}
    done: set[int] = set()
    order: list[ActivationGroup] = []

    def visit(group: ActivationGroup, depth: int = 0) -> None:
        if group.source is None or id(group) in done:
            return
        src = owner.get(id(group.source))
        if src is None or depth > len(plan.groups):
            raise ValueError(f"the source of '{group.quantized[0].name}' is not quantized")
        visit(src, depth + 1)
        done.add(id(group))
        order.append(group)

    for group in plan.groups:
        visit(group)
    return order


def _fold_scaling(
    graph: ir.Graph, node: ir.Node, value: ir.Value, view: tuple[ir.Value, ir.Value],
    enc: Encoding,
) -> tuple[ir.Value, ir.Value]:
    """Replace ``value = node(x)`` (``x·k``) by DequantizeLinear of ``x``'s integers with the
    scaled scale ``enc``, one per reader; ``node`` and the DQ that fed it go."""
    name = value.name or "act"
    integers, zero = view
    scale = add_initializer(graph, np.array(enc.scale[0], np.float32), f"{name}_scale")
    for i, usage in enumerate(list(value.uses())):
        dq = _dq([integers, scale, zero], None, name if i == 0 else f"{name}_{i}", value)
        graph.insert_before(usage.node, dq)
        usage.node.replace_input_with(usage.idx, dq.outputs[0])
    feeders = [v.producer() for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    for feeder in feeders:  # the DequantizeLinear that fed only the removed node
        if is_op(feeder, "DequantizeLinear") and not any(o.uses() for o in feeder.outputs) and \
                not any(o.is_graph_output() for o in feeder.outputs):
            graph.remove(feeder, safe=True)
    return integers, zero


def _wrap_activation(
    graph: ir.Graph, value: ir.Value, enc: Encoding, first: ir.Node | None
) -> tuple[ir.Value, ir.Value]:
    """One QuantizeLinear, and one DequantizeLinear per reader (onnxruntime's QDQ selectors fuse
    a DQ only into its sole reader: a shared DQ would keep e.g. a residual Add in float).
    Returns the quantized tensor and its zero point."""
    name = value.name or "act"
    readers = list(value.uses())  # before the Q node below becomes a reader too
    scale = add_initializer(graph, np.array(enc.scale[0], np.float32), f"{name}_scale")
    zero = _initializer(
        graph, _int_tensor(np.array(enc.zero_point[0]), enc.bits, enc.signed, ""), f"{name}_zero_point"
    )
    q = ir.node("QuantizeLinear", [value, scale, zero], name=f"{name}_QuantizeLinear")
    q.outputs[0].name = f"{name}_quantized"
    q.outputs[0].dtype = zero.dtype
    q.outputs[0].shape = value.shape
    n_dq = len(readers) + (1 if value.is_graph_output() else 0)
    dqs = [
        _dq([q.outputs[0], scale, zero], None, name if i == 0 else f"{name}_{i}", value)
        for i in range(max(n_dq, 1))
    ]
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [q, *dqs])
    elif first is not None:
        graph.insert_before(first, [q, *dqs])
    else:
        graph.extend([q, *dqs])
    for usage, dq in zip(readers, dqs):
        usage.node.replace_input_with(usage.idx, dq.outputs[0])
    _drop_redundant_clip(graph, value, q, enc)
    if value.is_graph_output():
        out = dqs[-1].outputs[0]
        for i, o in enumerate(graph.outputs):
            if o is value:
                graph.outputs[i] = out
        out.name, value.name = name, f"{name}_float"
    return q.outputs[0], zero


def _drop_redundant_clip(graph: ir.Graph, value: ir.Value, q: ir.Node, enc: Encoding) -> None:
    """Remove a Relu/Clip whose bounds contain the grid of the Q that follows it.

    Exact: quantization saturates at the grid's ends, so ``Q(clip(x, lo, hi)) = Q(x)`` whenever
    ``[lo, hi]`` contains the grid's range ``[(qmin − z)·s, (qmax − z)·s]``. Without the Relu/Clip
    between them, onnxruntime fuses DQ → Conv → Q into QLinearConv (with it, the Conv stays float).
    """
    act = value.producer()
    if act is None or not is_op(act, ("Relu", "Clip")) or value.is_graph_output():
        return
    if len(value.uses()) != 1 or act.inputs[0] is None:
        return
    if act.op_type == "Relu":
        lo, hi = 0.0, math.inf
    else:
        bounds = clip_bounds(act)
        if isinstance(bounds, str):
            return
        lo = -math.inf if bounds[0] is None else bounds[0]
        hi = math.inf if bounds[1] is None else bounds[1]
    grid = enc.grid()
    scale = float(np.float32(enc.scale[0]))
    q_lo = (grid.qmin - enc.zero_point[0]) * scale
    q_hi = (grid.qmax - enc.zero_point[0]) * scale
    slack = 1e-6 * max(abs(q_lo), abs(q_hi), 1e-12)  # float32 rounding of the stored scale
    if q_lo >= lo - slack and q_hi <= hi + slack:
        q.replace_input_with(0, act.inputs[0])
        graph.remove(act, safe=True)
