"""The quantizers of a QDQ model, and variants of it with some of them bypassed (no recalibration).

A QDQ model as :func:`onnxq.quantize` writes it has two kinds of quantizer:

* an **activation** quantizer: ``QuantizeLinear(x, s, z)`` read by one ``DequantizeLinear`` per
  reader; its id is ``a:<tensor>`` where ``<tensor>`` is the float model's name of the quantized
  value. When the value was a Relu/Clip output whose bounds contain the grid (onnxq drops that
  Relu/Clip because ``Q(clip(x)) = Q(x)``), ``x`` is the Relu/Clip's *input*: bypassing such a
  quantizer puts the Relu/Clip back, so the bypassed model computes exactly the float model;
* a **weight** quantizer: integer weights read through ``DequantizeLinear`` by a
  Conv/ConvTranspose/Gemm/MatMul; its id is ``w:<node>``. Its int32 bias (if any) belongs to it:
  bypassing the weight restores the float weight and the float bias;
* a **constant** quantizer: any other integer constant read through ``DequantizeLinear`` (e.g. the
  constant operand of an integer Add / Mul); its id is ``c:<node>:<input index>``.

:func:`bypass` returns a copy in which the chosen quantizers are replaced by the float tensors
they approximate. Bypassing all of them gives the float model (same nodes, same weights: outputs
identical under onnxruntime with optimizations off). :func:`lossless` is the FP32 sanity variant:
every activation pair becomes the affine map it computes without rounding or clamping,
``y = (x / s_q + z_q − z_dq) · s_dq`` (the identity when the Q and DQ parameters agree, and
``x`` shifted by ``(z_q − z_dq) · s_dq`` when they do not), so bugs in the parameters show up
as a difference to the float model while legitimate rounding does not.

Variants share the weights of the model they are cut from (``Model.clone`` copies no tensor).
"""

from __future__ import annotations

__all__ = ["Quantizer", "QuantizerMap", "bypass", "find_quantizers", "lossless"]

import dataclasses
import logging
import re
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxq.passes._graph import add_initializer, constant, is_op

log = logging.getLogger(__name__)

_Q_SUFFIX = "_QuantizeLinear"
_DQ_SUFFIX = "_DequantizeLinear"
_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """One quantizer of a QDQ model (see the module docstring for ``id``)."""

    id: str
    kind: str  # "activation" | "weight" | "constant" (a constant operand of another op)
    #: activation: the float model's value name; weight: the float weight's initializer name
    tensor: str
    #: the node an override names: the producer of the activation ("" for a graph input), or
    #: the layer that reads the weight
    node: str
    op_type: str  # the node's op type; "<input>" for a graph input
    bits: int
    signed: bool
    per_channel: bool
    #: the grid's range in float units, [(qmin − z)·s, (qmax − z)·s] (weights: widest channel)
    grid_range: tuple[float, float]
    #: float ops the QDQ layout folded into this quantizer (e.g. "Clip": a Relu/Clip whose bounds
    #: contain the grid), comma-separated; "" when none
    absorbed: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _View:
    """One DequantizeLinear of an activation quantizer and the float value it stands for."""

    dq: ir.Node
    value: str  # the float model's value the DQ's readers see
    #: the float nodes from the quantizer's input to ``value`` that the QDQ layout folded away
    #: (a Relu/Clip the grid makes redundant, a Mul/Div by a constant done by rescaling the DQ)
    path: list[ir.Node]


@dataclasses.dataclass
class _ActPair:
    q: ir.Node
    views: list[_View]
    name: str

    @property
    def dqs(self) -> list[ir.Node]:
        return [v.dq for v in self.views]


@dataclasses.dataclass
class _WeightSite:
    dq: ir.Node
    layer: ir.Node
    index: int
    name: str
    bias_dq: ir.Node | None


@dataclasses.dataclass
class QuantizerMap:
    """Where every quantizer sits in one QDQ model (found by :func:`find_quantizers`)."""

    quantizers: list[Quantizer]
    acts: dict[str, _ActPair]
    weights: dict[str, _WeightSite]

    def by_id(self) -> dict[str, Quantizer]:
        return {q.id: q for q in self.quantizers}


def _strip(name: str | None, suffix: str) -> str | None:
    if name and name.endswith(suffix):
        return name[: -len(suffix)]
    return None


def _scalar(value: ir.Value | None, default: float = 0.0) -> np.ndarray:
    arr = constant(value) if value is not None else None
    if arr is None:
        return np.asarray(default)
    return np.asarray(arr)


def _grid(zero: ir.Value | None) -> tuple[int, int, int, bool]:
    """(bits, qmin, qmax, signed) of a zero-point tensor's type."""
    dtype = zero.dtype if zero is not None else ir.DataType.UINT8
    bits = {ir.DataType.INT8: 8, ir.DataType.UINT8: 8, ir.DataType.INT16: 16,
            ir.DataType.UINT16: 16, ir.DataType.INT4: 4, ir.DataType.UINT4: 4,
            ir.DataType.INT32: 32}.get(dtype, 8)
    signed = dtype in (ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT4, ir.DataType.INT32)
    if signed:
        return bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, True
    return bits, 0, 2**bits - 1, False


def _grid_range(scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int) -> tuple[float, float]:
    s = np.asarray(scale, np.float64).reshape(-1)
    z = np.asarray(zero, np.float64).reshape(-1)
    lo, hi = (qmin - z) * s, (qmax - z) * s
    return float(lo.min()), float(hi.max())


def _float_name(dq: ir.Node) -> str:
    """The float constant a constant DequantizeLinear stands for: its integer initializer is
    ``<name>_quantized`` (``_quantized_<k>`` when the name was taken), else the DQ is
    ``<name>_DequantizeLinear``."""
    q = dq.inputs[0].name or ""
    match = re.fullmatch(r"(.+)_quantized(?:_\d+)?", q)
    if match:
        return match.group(1)
    return _strip(dq.name, _DQ_SUFFIX) or _strip(dq.outputs[0].name, "_dq") or q


def _float_values(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs if v.name}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def find_quantizers(qdq: ir.Model, float_model: ir.Model) -> QuantizerMap:
    """Every activation and weight quantizer of ``qdq`` (main graph), in graph order.

    ``float_model`` is the model ``qdq`` was made from (``QuantSim.float_model``): it names the
    owners of activations and holds the float weights and the Relu/Clip nodes onnxq dropped.
    """
    fvalues = _float_values(float_model)
    acts: dict[str, _ActPair] = {}
    weights: dict[str, _WeightSite] = {}
    quantizers: list[Quantizer] = []
    for node in qdq.graph:
        if is_op(node, "QuantizeLinear"):
            dqs = [c for c in node.outputs[0].consumers() if is_op(c, "DequantizeLinear")]
            if not dqs:
                continue
            x = node.inputs[0]
            name = _strip(node.name, _Q_SUFFIX) or (x.name if x is not None else "") or ""
            fv = fvalues.get(name)
            if fv is not None and fv.producer() is not None:
                owner, op = fv.producer().name or "", fv.producer().op_type
            else:
                owner, op = "", "<input>"
            views = [_view(dq, node, name, fvalues) for dq in dqs]
            bits, qmin, qmax, signed = _grid(node.inputs[2] if len(node.inputs) > 2 else None)
            scale = _scalar(node.inputs[1], 1.0)
            zero = _scalar(node.inputs[2] if len(node.inputs) > 2 else None)
            qid = f"a:{name}"
            acts[qid] = _ActPair(node, views, name)
            base = next((v for v in views if v.value == name), views[0])
            quantizers.append(Quantizer(
                qid, "activation", name, owner, op, bits, signed, scale.size > 1,
                _grid_range(scale, zero, qmin, qmax), ",".join(n.op_type for n in base.path),
            ))
        elif is_op(node, "DequantizeLinear") and constant(node.inputs[0]) is not None:
            out = node.outputs[0]
            name = _float_name(node)
            bits, qmin, qmax, signed = _grid(node.inputs[2] if len(node.inputs) > 2 else None)
            scale = _scalar(node.inputs[1], 1.0)
            zero = _scalar(node.inputs[2] if len(node.inputs) > 2 else None)
            grid = _grid_range(scale, zero, qmin, qmax)
            for use in out.uses():
                layer, index = use.node, use.idx
                if is_op(layer, _LAYER_OPS) and index == 2:
                    continue  # a bias: belongs to the layer's weight quantizer
                bias_dq = None
                if is_op(layer, _LAYER_OPS) and index == 1:
                    if len(layer.inputs) > 2 and layer.inputs[2] is not None:
                        b = layer.inputs[2].producer()
                        if is_op(b, "DequantizeLinear") and constant(b.inputs[0]) is not None:
                            bias_dq = b
                    qid, kind = f"w:{layer.name}", "weight"
                else:  # a constant operand (e.g. of an integer Add / Mul)
                    qid, kind = f"c:{layer.name}:{index}", "constant"
                weights[qid] = _WeightSite(node, layer, index, name, bias_dq)
                quantizers.append(Quantizer(
                    qid, kind, name, layer.name or "", layer.op_type, bits, signed,
                    scale.size > 1, grid,
                ))
    return QuantizerMap(quantizers, acts, weights)


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------


def _float_const(graph: ir.Graph, fvalue: ir.Value) -> ir.Value:
    """``fvalue`` (a float-model constant) as an initializer of ``graph`` (data shared)."""
    existing = graph.initializers.get(fvalue.name or "")
    if existing is not None and existing.const_value is fvalue.const_value:
        return existing
    value = ir.Value(
        name=fvalue.name, shape=fvalue.shape, type=fvalue.type, const_value=fvalue.const_value
    )
    base, k = value.name or "const", 1
    while value.name in graph.initializers:
        value.name, k = f"{base}_{k}", k + 1
    graph.register_initializer(value)
    return value


def _float_initializers(float_model: ir.Model) -> dict[str, ir.Value]:
    return {name: v for name, v in float_model.graph.initializers.items()}


def _redirect(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every reader of ``old`` (graph outputs included) reads ``new``."""
    for use in list(old.uses()):
        use.node.replace_input_with(use.idx, new)
    for i, out in enumerate(graph.outputs):
        if out is old:
            name = old.name
            old.name = f"{name}_replaced"
            graph.outputs[i] = new
            new.name = name


def _restore(graph: ir.Graph, src: ir.Value, path: list[ir.Node], inits: dict[str, ir.Value]) -> ir.Value:
    """Copies of the float nodes ``path`` applied to ``src`` in ``graph``; returns the last output."""
    after = src.producer()
    for fnode in path:
        inputs: list[ir.Value | None] = []
        for i, inp in enumerate(fnode.inputs):
            if i == _data_index(fnode):
                inputs.append(src)
            elif inp is None:
                inputs.append(None)
            else:
                inputs.append(_float_const(graph, inits.get(inp.name, inp)))
        node = ir.node(fnode.op_type, inputs, {k: a for k, a in fnode.attributes.items()},
                       domain=fnode.domain, name=f"{fnode.name}_restored")
        node.outputs[0].name = f"{fnode.outputs[0].name}_restored"
        node.outputs[0].shape, node.outputs[0].type = fnode.outputs[0].shape, fnode.outputs[0].type
        if after is not None:
            graph.insert_after(after, node)
        else:
            graph.insert_before(graph.node(0), node)
        after, src = node, node.outputs[0]
    return src


def _data_index(node: ir.Node) -> int:
    """The one input of ``node`` that is not a constant (0 when all are)."""
    for i, inp in enumerate(node.inputs):
        if inp is not None and inp.const_value is None:
            return i
    return 0


def _float_path(fvalues: dict[str, ir.Value], source: str, target: str, limit: int = 8) -> list[ir.Node] | None:
    """The chain of float nodes from value ``source`` to value ``target``, each with exactly one
    non-constant input; None when there is none."""
    path: list[ir.Node] = []
    value = fvalues.get(target)
    while value is not None and value.name != source:
        node = value.producer()
        if node is None or len(path) >= limit or len(node.outputs) != 1:
            return None
        data = [i for i in node.inputs if i is not None and i.const_value is None]
        if len(data) != 1:
            return None
        path.append(node)
        value = data[0]
    return list(reversed(path)) if value is not None else None


def _view(dq: ir.Node, q: ir.Node, name: str, fvalues: dict[str, ir.Value]) -> _View:
    """Which float value a DQ of quantizer ``name`` stands for, and how to compute it in float."""
    x = q.inputs[0]
    same = _params(dq) == _params(q)
    value = name
    if not same:  # a rescaled view of the same integers: it is named after the value it gives
        own = _strip(dq.name, _DQ_SUFFIX) or ""
        candidates = [own] + ([re.sub(r"_\d+$", "", own)] if re.search(r"_\d+$", own) else [])
        value = next((c for c in candidates if c in fvalues and c != name), name)
    path = []
    if x is not None and x.name != value:
        found = _float_path(fvalues, x.name or "", value)
        if found is None and value != name:
            base = _float_path(fvalues, x.name or "", name) or []
            rest = _float_path(fvalues, name, value)
            found = base + rest if rest is not None else None
        if found is None and value in fvalues and x.name != f"{value}_float":
            log.debug("no float path from '%s' to '%s'", x.name, value)
        path = found or []
    return _View(dq, value, path)


def _linear_factor(path: list[ir.Node]) -> float | None:
    """The factor of a chain of Mul/Div by scalar constants (None if it is anything else)."""
    factor = 1.0
    for node in path:
        if not is_op(node, ("Mul", "Div")) or len(node.inputs) != 2:
            return None
        k = _data_index(node)
        c = constant(node.inputs[1 - k]) if node.inputs[1 - k] is not None else None
        if c is None or c.size != 1 or (node.op_type == "Div" and k != 0):
            return None
        factor = factor * float(c.reshape(())) if node.op_type == "Mul" else factor / float(c.reshape(()))
    return factor


def _params(node: ir.Node) -> tuple:
    scale = _scalar(node.inputs[1], 1.0)
    zero = _scalar(node.inputs[2] if len(node.inputs) > 2 else None)
    return (scale.astype(np.float64).tobytes(), zero.astype(np.int64).tobytes())


def _cut(model: ir.Model) -> ir.Model:
    from onnxq.passes.cleanup import Cleanup

    Cleanup()(model)
    return model


def bypass(qdq: ir.Model, float_model: ir.Model, ids: Iterable[str]) -> ir.Model:
    """A copy of ``qdq`` with the quantizers ``ids`` replaced by the float tensors they quantize.

    Unknown ids raise ``KeyError``. The copy shares weights with ``qdq`` and ``float_model``.
    """
    ids = set(ids)
    work = qdq.clone()
    qmap = find_quantizers(work, float_model)
    unknown = ids - set(qmap.by_id())
    if unknown:
        raise KeyError(f"no quantizer {min(unknown)!r} in the model")
    inits = _float_initializers(float_model)
    graph = work.graph
    for qid in ids:
        if qid in qmap.acts:
            pair = qmap.acts[qid]
            restored: dict[str, ir.Value] = {}
            for view in pair.views:
                if view.value not in restored:
                    restored[view.value] = _restore(graph, pair.q.inputs[0], view.path, inits)
                _redirect(graph, view.dq.outputs[0], restored[view.value])
        else:
            site = qmap.weights[qid]
            fw = inits.get(site.name)
            if fw is None:
                raise KeyError(f"float weight '{site.name}' of {qid} is not in the float model")
            site.layer.replace_input_with(site.index, _float_const(graph, fw))
            if site.bias_dq is not None:
                fb = inits.get(_float_name(site.bias_dq))
                if fb is not None:
                    site.layer.replace_input_with(2, _float_const(graph, fb))
    return _cut(work)


def lossless(qdq: ir.Model, float_model: ir.Model) -> tuple[ir.Model, list[dict]]:
    """The FP32 sanity variant of ``qdq`` and the parameter problems found on the way.

    Activation pairs become ``(x / s_q + z_q − z_dq) · s_dq`` (no rounding, no clamping; the
    identity when Q and DQ agree); weights and biases become their float originals, and each
    integer weight is checked instead: ``|(q − z)·s − w| ≤ s/2`` wherever ``w`` lies inside the
    grid (outside, the clamp is a range choice, not a bug), and each int32 bias against its float
    bias and against ``s_bias = s_input · s_weight``. Problems: ``{"quantizer", "problem"}``.
    """
    work = qdq.clone()
    qmap = find_quantizers(work, float_model)
    inits = _float_initializers(float_model)
    graph = work.graph
    problems: list[dict] = []
    for qid, pair in qmap.acts.items():
        x = pair.q.inputs[0]
        s_q = _scalar(pair.q.inputs[1], 1.0).astype(np.float64)
        z_q = _scalar(pair.q.inputs[2] if len(pair.q.inputs) > 2 else None).astype(np.float64)
        base = next((v for v in pair.views if v.value == pair.name), None)
        # the value the quantizer rounds, in float: the input through a dropped Relu/Clip (the
        # grid clamps at least as much); rescaled views apply their factor to the same value
        src = _restore(graph, x, base.path, inits) if base is not None else x
        for view in pair.views:
            dq = view.dq
            s_d = _scalar(dq.inputs[1], 1.0).astype(np.float64)
            z_d = _scalar(dq.inputs[2] if len(dq.inputs) > 2 else None).astype(np.float64)
            if np.array_equal(s_q, s_d) and np.array_equal(z_q, z_d):
                _redirect(graph, dq.outputs[0], src)
                continue
            is_view = view.value != pair.name
            factor = _linear_factor(view.path[len(base.path) if base is not None and
                                                  view.path[: len(base.path)] == base.path else 0:])
            if is_view and np.array_equal(z_q, z_d) and factor is not None and \
                    np.allclose(s_d / s_q, factor, rtol=1e-6, atol=0):
                # a rescaled view whose scale is the folded ops' factor: exact in float
                rest = view.path[len(base.path):] if base is not None else view.path
                _redirect(graph, dq.outputs[0], _restore(graph, src, rest, inits))
                continue
            if not is_view or not np.array_equal(z_q, z_d) or factor is not None:
                problems.append({
                    "quantizer": qid,
                    "problem": f"QuantizeLinear (scale {s_q.tolist()}, zero point {z_q.tolist()}) and "
                    f"'{dq.name}' (scale {s_d.tolist()}, zero point {z_d.tolist()}) disagree",
                })
            gain = add_initializer(graph, np.asarray(s_d / s_q, np.float32), f"{pair.name}_sanity_gain")
            shift = add_initializer(
                graph, np.asarray((z_q - z_d) * s_d, np.float32), f"{pair.name}_sanity_shift"
            )
            mul = ir.node("Mul", [src, gain], name=f"{dq.name}_sanity_mul")
            add = ir.node("Add", [mul.outputs[0], shift], name=f"{dq.name}_sanity_add")
            for n in (mul, add):
                n.outputs[0].shape, n.outputs[0].type = src.shape, src.type
            graph.insert_before(dq, [mul, add])
            _redirect(graph, dq.outputs[0], add.outputs[0])
    for qid, site in qmap.weights.items():
        fw = inits.get(site.name)
        if fw is None:
            problems.append({"quantizer": qid, "problem": f"float weight '{site.name}' not found"})
            continue
        problem = _weight_problem(site.dq, fw.const_value.numpy())
        if problem:
            problems.append({"quantizer": qid, "problem": problem})
        site.layer.replace_input_with(site.index, _float_const(graph, fw))
        if site.bias_dq is not None:
            fb = inits.get(_float_name(site.bias_dq))
            if fb is None:
                continue
            problem = _bias_problem(site, fb.const_value.numpy(), qmap)
            if problem:
                problems.append({"quantizer": qid, "problem": problem})
            site.layer.replace_input_with(2, _float_const(graph, fb))
    return _cut(work), problems


def _dequantized(dq: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(dequantized array, scale, zero point broadcast, qmin, qmax) of a constant DQ."""
    q = constant(dq.inputs[0]).astype(np.float64)
    s = _scalar(dq.inputs[1], 1.0).astype(np.float64)
    z = _scalar(dq.inputs[2] if len(dq.inputs) > 2 else None).astype(np.float64)
    _, qmin, qmax, _ = _grid(dq.inputs[2] if len(dq.inputs) > 2 else None)
    if s.size > 1:
        axis = dq.attributes["axis"].value if "axis" in dq.attributes else 1
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return (q - z) * s, np.broadcast_to(s, q.shape), np.broadcast_to(z, q.shape), qmin, qmax


def _weight_problem(dq: ir.Node, w: np.ndarray) -> str | None:
    deq, s, z, qmin, qmax = _dequantized(dq)
    w = w.astype(np.float64)
    if deq.shape != w.shape:
        return f"integer weight shape {deq.shape} differs from the float weight {w.shape}"
    inside = (w >= (qmin - z) * s) & (w <= (qmax - z) * s)
    err = np.abs(deq - w) / np.maximum(s, 1e-30)
    worst = float(err[inside].max()) if inside.any() else 0.0
    if worst > 0.5 + 1e-3:
        return (f"dequantized weight is {worst:.2f} steps from the float weight inside the grid "
                "(rounding allows 0.5): wrong scale or zero point")
    return None


def _bias_problem(site: _WeightSite, b: np.ndarray, qmap: QuantizerMap) -> str | None:
    deq, s, _, _, _ = _dequantized(site.bias_dq)
    b = b.astype(np.float64).reshape(deq.shape)
    worst = float(np.max(np.abs(deq - b) / np.maximum(s, 1e-30)))
    if worst > 0.5 + 1e-3:
        return f"int32 bias is {worst:.2f} steps from the float bias (rounding allows 0.5)"
    x = site.layer.inputs[0]
    x_dq = x.producer() if x is not None else None
    if not is_op(x_dq, "DequantizeLinear"):
        return None
    s_in = float(_scalar(x_dq.inputs[1], 1.0).reshape(-1)[0])
    s_w = _scalar(site.dq.inputs[1], 1.0).astype(np.float64).reshape(-1)
    have = np.asarray(s, np.float64).reshape(-1)
    want = s_in * (s_w if s_w.size == have.size else np.full(have.size, s_w[0]))
    if not np.allclose(have, want, rtol=1e-5, atol=0):
        return "bias scale is not input scale × weight scale"
    return None
