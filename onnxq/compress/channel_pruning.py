"""ChannelPruning: remove input channels of a Conv, re-fit it, and remove them upstream too.

**The layer as a sum of channel contributions.** On sampled output positions ``n`` (see
:mod:`onnxq.algorithms._layers`), a Conv with canonical weight ``W (O, C, K)`` (``K = ∏ kernel``,
group = 1) computes ``y_n = Σ_c Z_c[n] + b`` with ``Z_c[n] = W[:, c, :]·x_n[c, :]`` (the
contribution of input channel ``c``). With ``G_cd = Σ_n ⟨Z_c[n], Z_d[n]⟩`` and
``h_c = Σ_n ⟨Z_c[n], t_n − b⟩`` (``t``: the reference model's output of this layer, before its
activation), both follow from second moments without forming ``Z``::

    G = Σ_{k,l} (XᵀX ∘ WᵀW)[(c,k),(d,l)],    h_c = Σ_{o,k} ((t − b)ᵀX ∘ W)[o,(c,k)]

**Selection** of the ``k`` channels to keep, on ``‖t − b − Σ_c β_c Z_c‖²``:

* ``greedy``: drop channels one by one with ``β = 1``, each time the one whose removal increases
  the error least: ``Δ(c | R) = G_cc + 2·(h̃_c + Σ_{d∈R} G_cd)``, ``h̃ = G·1 − h``
  (backward elimination, exact incremental update, ``O(C²)``);
* ``lasso`` (He et al., 2017): ``min_β ½βᵀGβ − hᵀβ + λ‖β‖₁`` by FISTA, ``λ`` bisected until at
  most ``k`` coefficients are non-zero; the ``k`` largest ``|β_c|·‖Z_c‖`` are kept.

**Re-fit** (He et al.; AIMET's weight reconstruction): the kept weights and the bias solve the
least-squares problem on the same samples, ``min_{W', b'} Σ_n ‖t_n − W'·x_n[S] − b'‖²`` (normal
equations, centred, with a tiny ridge ``10⁻⁶·tr/n`` for conditioning).

**Upstream.** Input channel ``c`` of the layer is output channel ``c`` of whatever computes it; the
set of values that carry the same channels is found by a search through the graph:

* producers whose **output channels** are removed: Conv/ConvTranspose (group = 1), Gemm (rank-2
  output), with their biases;
* ops the channels pass through, both ways (their per-channel constants sliced too):
  BatchNormalization (unfolded), depthwise Conv (its group shrinks), element-wise unary ops
  (Relu, Clip with scalar bounds, LeakyRelu, Sigmoid, HardSigmoid, HardSwish, Tanh, …),
  element-wise binary ops (Add, Sub, Mul, Div, Min, Max, PRelu: a non-constant operand with the
  same channels joins the set — e.g. both branches of a residual Add, a squeeze-excitation scale),
  Pad (not on the channel axis), pooling and spatial reductions, Flatten/Squeeze/Reshape of a
  ``(N, C, 1, 1)`` map to ``(N, C)``;
* other readers whose **input channels** are removed: Conv/ConvTranspose (group = 1) and Gemm.

The layer is pruned only when every branch can follow; otherwise it is skipped with the reason
(a channel that reaches a Concat, a graph output or input, a Reshape, a grouped Conv, a shared
weight, …). Other readers lose the input channels without a re-fit (their outputs change by the
removed channels' contribution); the layer itself is re-fit. Skipped also: grouped Convs, layers
whose own output carries the channels (a residual loop), ``keep ≥ C``.

**Several targets** are pruned in topological order; each one's inputs come from the model as
pruned so far and its targets from the reference model (AIMET's order). A target whose output
channels an earlier target's plan already removed is re-fit to the outputs it has left.
``multiple`` rounds kept counts (from ratios) to a multiple, e.g. 8: onnxruntime's CPU
convolutions work in blocks of 8 channels, and odd widths can run slower than the unpruned layer.
"""

from __future__ import annotations

__all__ = ["ChannelPruning", "LayerSamples", "capture_samples", "kept_count", "refit", "select_channels"]

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.compress._common import float_problem
from onnxq.compress.weight_svd import ORIGIN_KEY  # noqa: F401 - shared meta key
from onnxq.passes._graph import (
    add_initializer,
    attr,
    clip_bounds,
    constant,
    is_op,
    set_constant,
    weight_problem,
)
from onnxq.passes._layers import WeightLayer, as_layer
from onnxq.passes.base import OnnxqPass

log = logging.getLogger(__name__)

UNARY = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Identity", "Dropout", "Abs", "Neg", "Exp", "Log", "Sqrt", "Erf",
    "Reciprocal", "Mish", "Gelu", "Floor", "Ceil", "Round", "Sign", "Cast",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Min", "Max", "PRelu", "Pow", "Sum", "Mean"})
POOL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
                  "GlobalLpPool"})
REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1"})
FLATTEN = frozenset({"Flatten", "Squeeze", "Reshape"})


# ---- the plan: every value carrying the channels and every edit that removes them ---------------
@dataclasses.dataclass
class _Plan:
    channels: int
    values: dict[int, ir.Value] = dataclasses.field(default_factory=dict)
    #: layer edits: id(node) -> [layer, slice outputs?, slice inputs?, depthwise?]
    layers: dict[int, list] = dataclasses.field(default_factory=dict)
    #: per-channel constants to slice: (node, input index, channel axis of the array)
    constants: list[tuple[ir.Node, int, int]] = dataclasses.field(default_factory=list)
    #: rank-2 values in the set (after a Flatten): their shapes are (N, C)
    nodes_seen: set[int] = dataclasses.field(default_factory=set)

    def edit(self, layer: WeightLayer, out: bool = False, inp: bool = False, depthwise: bool = False) -> None:
        entry = self.layers.setdefault(id(layer.node), [layer, False, False, False])
        entry[1] |= out
        entry[2] |= inp
        entry[3] |= depthwise


class _Blocked(Exception):
    """The channels reach something that cannot follow (the message says what)."""


def _rank_of(value: ir.Value, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    shape = shapes.get(value.name or "")
    if shape is not None:
        return len(shape)
    if value.shape is not None:
        return len(value.shape)
    return None


def _channel_dim(value: ir.Value, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    shape = shapes.get(value.name or "")
    if shape is not None and len(shape) >= 2:
        return int(shape[1])
    if value.shape is not None and len(value.shape) >= 2 and isinstance(value.shape[1], int):
        return int(value.shape[1])
    return None


def plan_channels(target: ir.Node, shapes: Mapping[str, tuple[int, ...]]) -> _Plan:
    """Every value that carries the input channels of ``target`` and the edits that remove them;
    raises :class:`_Blocked` naming what cannot follow."""
    x = target.inputs[0]
    channels = _channel_dim(x, shapes)
    if channels is None:
        raise _Blocked(f"the channel count of '{x.name}' is unknown")
    plan = _Plan(channels)
    queue = [x]
    plan.values[id(x)] = x
    while queue:
        value = queue.pop()
        if value.is_graph_input():
            raise _Blocked(f"channels come from the graph input '{value.name}'")
        if value.is_graph_output():
            raise _Blocked(f"'{value.name}' is a graph output")
        dim = _channel_dim(value, shapes)
        if dim is not None and dim != channels:
            raise _Blocked(f"'{value.name}' has {dim} channels, not {channels}")
        producer = value.producer()
        if producer is None:
            raise _Blocked(f"'{value.name}' has no producer")
        if producer is target:
            raise _Blocked("the layer's own output carries its input channels (a residual loop)")
        _visit(producer, value, True, target, plan, queue, shapes)
        for use in value.uses():
            node, index = use.node, use.idx
            if node is target:
                if index != 0:
                    raise _Blocked(f"'{value.name}' is also the layer's weight or bias")
                continue
            _visit(node, value, False, target, plan, queue, shapes, index)
    return plan


def _join(value: ir.Value | None, plan: _Plan, queue: list) -> None:
    if value is not None and id(value) not in plan.values:
        plan.values[id(value)] = value
        queue.append(value)


def _layer(node: ir.Node) -> WeightLayer:
    layer = as_layer(node)
    if isinstance(layer, str):
        raise _Blocked(f"{node.op_type} '{node.name}': {layer}")
    problem = weight_problem(layer.weight, [node]) or float_problem(layer.weight)
    if problem is None and (layer.bias_node is not None and layer.bias_node is not node):
        problem = f"{node.op_type} '{node.name}' has its bias in a separate Add"
    problem = problem or layer.bias_problem()
    if problem:
        raise _Blocked(f"{node.op_type} '{node.name}': {problem}")
    return layer


def _visit(node: ir.Node, value: ir.Value, as_producer: bool, target: ir.Node, plan: _Plan,
           queue: list, shapes: Mapping[str, tuple[int, ...]], index: int = 0) -> None:
    """Add ``node``'s part of the plan; ``value`` (in the set) is its output (``as_producer``) or
    its input ``index``."""
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    where = f"{node.op_type} '{node.name}'"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]) and op not in ("Dropout",):
        raise _Blocked(f"{where} has extra outputs in use")
    if op in ("Conv", "ConvTranspose", "Gemm"):
        if not as_producer and index != 0:
            raise _Blocked(f"'{value.name}' is the weight or bias of {where}")
        if op == "Gemm" and int(attr(node, "transA", 0)):
            raise _Blocked(f"{where} has transA=1")
        layer = _layer(node)
        if layer.groups == 1:
            key = (id(node), as_producer)
            if key in plan.nodes_seen:
                return
            plan.nodes_seen.add(key)
            plan.edit(layer, out=as_producer, inp=not as_producer)
            return
        if op == "Conv" and layer.is_depthwise:
            if id(node) in plan.nodes_seen:
                return
            plan.nodes_seen.add(id(node))
            plan.edit(layer, depthwise=True)
            _join(node.inputs[0], plan, queue)
            _join(node.outputs[0], plan, queue)
            return
        raise _Blocked(f"grouped {where} (group={layer.groups}) cannot follow")
    if id(node) in plan.nodes_seen:
        return
    plan.nodes_seen.add(id(node))
    if op == "BatchNormalization":
        if len(node.outputs) > 1 or not node.inputs[0] is value and not as_producer:
            raise _Blocked(f"{where} in training form or read through a parameter")
        for i in range(1, 5):
            _const_channels(node, i, 1, plan, where, required=True)
        _join(node.inputs[0], plan, queue)
        _join(node.outputs[0], plan, queue)
        return
    if op in UNARY or op == "Clip":
        if not as_producer and index != 0:
            raise _Blocked(f"'{value.name}' is a parameter of {where}")
        if op == "Clip" and isinstance(clip_bounds(node), str):
            raise _Blocked(f"{where}: {clip_bounds(node)}")
        _join(node.inputs[0], plan, queue)
        _join(node.outputs[0], plan, queue)
        return
    if op in BINARY:
        rank = _rank_of(node.outputs[0], shapes) or _rank_of(value, shapes)
        if rank is None:
            raise _Blocked(f"{where}: the rank of its output is unknown")
        for i, inp in enumerate(node.inputs):
            if inp is None:
                continue
            if constant(inp) is not None:
                _const_channels(node, i, rank, plan, where)
                continue
            in_rank = _rank_of(inp, shapes)
            dim = _channel_dim(inp, shapes) if in_rank == rank else None
            if in_rank is not None and in_rank < rank - 1:
                continue  # broadcasts over the channel axis (e.g. a per-position scalar map)
            if in_rank == rank - 1:
                raise _Blocked(f"{where}: operand '{inp.name}' broadcasts channels from a lower rank")
            if dim == 1:
                continue  # broadcast over channels: unaffected
            if dim is None:
                raise _Blocked(f"{where}: the channels of operand '{inp.name}' are unknown")
            _join(inp, plan, queue)
        _join(node.outputs[0], plan, queue)
        return
    if op in POOL or op == "Pad" or op in REDUCE:
        if not as_producer and index != 0:
            raise _Blocked(f"'{value.name}' is a parameter of {where}")
        if op == "Pad":
            _pad_check(node, where)
        if op in REDUCE:
            _reduce_check(node, where, _rank_of(node.inputs[0], shapes))
        _join(node.inputs[0], plan, queue)
        _join(node.outputs[0], plan, queue)
        return
    if op in FLATTEN:
        x, y = node.inputs[0], node.outputs[0]
        xs, ys = shapes.get(x.name or ""), shapes.get(y.name or "")
        if not as_producer and index != 0:
            raise _Blocked(f"'{value.name}' is the shape operand of {where}")
        if xs is None or ys is None or len(ys) != 2 or math.prod(xs[2:]) != 1 or ys[1] != xs[1]:
            raise _Blocked(f"{where} reshapes the channels (only (N, C, 1, …) → (N, C) can follow)")
        _join(x, plan, queue)
        _join(y, plan, queue)
        return
    raise _Blocked(f"the channels reach {where}, which cannot follow")


def _const_channels(node: ir.Node, index: int, rank: int, plan: _Plan, where: str,
                    required: bool = False) -> None:
    inp = node.inputs[index] if len(node.inputs) > index else None
    arr = constant(inp)
    if arr is None:
        raise _Blocked(f"{where}: operand {index} is not a constant")
    if required:  # a 1-D per-channel parameter (BatchNormalization)
        if arr.shape != (plan.channels,):
            raise _Blocked(f"{where}: parameter '{inp.name}' of shape {arr.shape} is not per channel")
        plan.constants.append((node, index, 0))
        return
    axis = arr.ndim - (rank - 1)  # numpy broadcasting aligns the right ends
    if axis < 0 or arr.shape[axis] == 1:
        return  # constant over channels
    if arr.shape[axis] != plan.channels:
        raise _Blocked(f"{where}: constant '{inp.name}' of shape {arr.shape} does not match {plan.channels} channels")
    plan.constants.append((node, index, axis))


def _pad_check(node: ir.Node, where: str) -> None:
    if len(node.inputs) > 1:
        pads = constant(node.inputs[1])
        if pads is None:
            raise _Blocked(f"{where}: pads are not constant")
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            raise _Blocked(f"{where}: Pad with explicit axes")
    else:
        pads = np.asarray(attr(node, "pads", []))
    pads = np.asarray(pads).reshape(-1)
    half = len(pads) // 2
    if half < 2 or pads[1] or pads[half + 1]:
        raise _Blocked(f"{where} pads the channel axis")


def _reduce_check(node: ir.Node, where: str, rank: int | None) -> None:
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant(node.inputs[1])
    if axes is None or rank is None:
        raise _Blocked(f"{where}: reduction axes unknown")
    axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    if 0 in axes or 1 in axes:
        raise _Blocked(f"{where} reduces over the batch or channel axis")
    if not int(attr(node, "keepdims", 1)) and len(axes) != rank - 2:
        raise _Blocked(f"{where} drops only some spatial axes")


def apply_plan(graph: ir.Graph, plan: _Plan, keep: np.ndarray) -> None:
    """Remove every channel not in ``keep`` (sorted indices) from the planned layers and constants."""
    for layer, out, inp, depthwise in plan.layers.values():
        wc = layer.canonical()
        bias = layer.bias() if layer.bias_value is not None and (out or depthwise) else None
        if out or depthwise:
            wc = wc[keep]
            if bias is not None:
                bias = bias[keep]
        if inp:
            wc = wc[:, keep]
        layer.set_canonical(np.ascontiguousarray(wc))
        if depthwise:
            layer.groups = len(keep)
            layer.node.attributes["group"] = ir.AttrInt64("group", len(keep))
        if bias is not None:
            value = layer.bias_value
            b = bias / (float(attr(layer.node, "beta", 1.0)) if layer.op_type == "Gemm" else 1.0)
            set_constant(value, b.astype(value.const_value.dtype.numpy()))
    for node, index, axis in plan.constants:
        value = node.inputs[index]
        arr = np.take(constant(value), keep, axis=axis)
        new = add_initializer(graph, np.ascontiguousarray(arr), f"{value.name}_pruned")
        node.replace_input_with(index, new)
    for value in plan.values.values():  # channel counts of the intermediate values
        if value.shape is not None and len(value.shape) >= 2:
            dims = list(value.shape)
            dims[1] = len(keep)
            value.shape = ir.Shape(dims)


# ---- samples, selection, re-fit -----------------------------------------------------------------
@dataclasses.dataclass
class LayerSamples:
    """A Conv's input patches ``x (rows, C, K)`` and reference outputs ``t (rows, O)`` (pre-activation)."""

    x: np.ndarray
    t: np.ndarray


def _moments(samples: LayerSamples, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``G (C, C)`` and ``h (C,)`` of the module docstring."""
    rows, c, k = samples.x.shape
    o = w.shape[0]
    xf = samples.x.reshape(rows, c * k).astype(np.float64)
    wf = w.reshape(o, c * k).astype(np.float64)
    a = xf.T @ xf
    bw = wf.T @ wf
    g = (a * bw).reshape(c, k, c, k).sum(axis=(1, 3))
    resid = samples.t.astype(np.float64) - b[None, :]
    h = ((resid.T @ xf) * wf).reshape(o, c, k).sum(axis=(0, 2))
    return g, h


def _greedy(g: np.ndarray, h: np.ndarray, keep: int) -> np.ndarray:
    c = g.shape[0]
    removed = np.zeros(c, bool)
    # Δ(c | R) = G_cc + 2·(h̃_c + Σ_{d∈R} G_cd), h̃ = G·1 − h (β = 1)
    acc = g.sum(axis=1) - h
    diag = np.diag(g).copy()
    for _ in range(c - keep):
        delta = diag + 2.0 * acc
        delta[removed] = np.inf
        j = int(np.argmin(delta))
        removed[j] = True
        acc += g[:, j]
    return np.flatnonzero(~removed)


def _lasso(g: np.ndarray, h: np.ndarray, keep: int, iterations: int = 300) -> np.ndarray:
    c = g.shape[0]
    lipschitz = float(np.linalg.eigvalsh(g)[-1]) or 1.0

    def solve(lam: float, beta0: np.ndarray) -> np.ndarray:
        beta, z, tk = beta0.copy(), beta0.copy(), 1.0
        for _ in range(iterations):
            grad = g @ z - h
            step = z - grad / lipschitz
            new = np.sign(step) * np.maximum(np.abs(step) - lam / lipschitz, 0.0)
            t_next = (1 + math.sqrt(1 + 4 * tk * tk)) / 2
            z = new + ((tk - 1) / t_next) * (new - beta)
            beta, tk = new, t_next
        return beta

    lo, hi = 0.0, float(np.max(np.abs(h))) or 1.0
    best = solve(lo, np.ones(c))
    beta = best
    for _ in range(25):
        lam = 0.5 * (lo + hi)
        beta = solve(lam, beta)
        nnz = int(np.count_nonzero(beta))
        if nnz > keep:
            lo = lam
        else:
            hi = lam
            best = beta
            if nnz == keep:
                break
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    score = np.abs(best) * norms
    order = np.argsort(-score, kind="stable")
    return np.sort(order[:keep])


def select_channels(samples: LayerSamples, w: np.ndarray, b: np.ndarray, keep: int,
                    method: str = "greedy") -> np.ndarray:
    """The sorted indices of the ``keep`` input channels to keep (module docstring)."""
    g, h = _moments(samples, w, b)
    if method == "greedy":
        return _greedy(g, h, keep)
    if method == "lasso":
        return _lasso(g, h, keep)
    raise ValueError(f"unknown channel selection method '{method}' (greedy, lasso)")


def refit(samples: LayerSamples, kept: np.ndarray, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``(W' (O, k, K), b' (O,))`` on the kept channels (module docstring).

    Solved centred (``W'`` from the covariances, ``b' = t̄ − W'·x̄``), which keeps the normal
    equations well conditioned when the inputs have a large common offset (e.g. after ReLU6).
    """
    rows, _, k = samples.x.shape
    xs = samples.x[:, kept, :].reshape(rows, -1).astype(np.float64)
    t = samples.t.astype(np.float64)
    x_mean, t_mean = xs.mean(axis=0), t.mean(axis=0)
    xs -= x_mean
    lhs = xs.T @ xs
    lhs[np.diag_indices_from(lhs)] += ridge * (np.trace(lhs) / max(lhs.shape[0], 1)) + 1e-30
    w = np.linalg.solve(lhs, xs.T @ (t - t_mean)).T  # (O, k·K)
    b = t_mean - w @ x_mean
    return w.reshape(t.shape[1], len(kept), k), b


def capture_samples(reference: ir.Model, current: ir.Model, names: Sequence[str],
                    batches: Sequence[Mapping[str, np.ndarray]], rows: int = 4096,
                    seed: int = 0) -> dict[str, LayerSamples]:
    """Input patches of each named Conv in ``current`` and its pre-activation output in
    ``reference`` at the same sampled positions (one float pass for all targets, one pruned
    session per layer input)."""
    from onnxq.algorithms._capture import RowStore, capture_inputs, capture_targets, input_session
    from onnxq.algorithms._layers import Activation, find_layers

    ref_layers, _ = find_layers(reference, set(names))
    ref_layers = [dataclasses.replace(layer, activation=Activation("identity")) for layer in ref_layers]
    cur_layers = {layer.name: layer for layer in find_layers(current, set(names))[0]}
    out: dict[str, LayerSamples] = {}
    if not ref_layers:
        return out
    with RowStore(1 << 30) as store:
        samples = capture_targets(reference, ref_layers, list(batches), rows, store, seed)
        for layer in ref_layers:
            cur = cur_layers.get(layer.name)
            if cur is None:
                continue
            session = input_session(current, cur.input.name)
            x = capture_inputs(session, cur, samples[layer.name], list(batches))
            c = cur.weight_layer.in_channels
            out[layer.name] = LayerSamples(
                np.asarray(x).reshape(x.shape[0], c, -1), np.array(store.get(f"{layer.name}/target"))
            )
    return out


def kept_count(keep: int | None, ratio: float | None, channels: int, multiple: int = 1) -> int:
    """Channels kept: ``keep``, else ``round(ratio·C)``, rounded to a multiple of ``multiple``
    (SIMD-friendly widths run faster: onnxruntime's CPU convolutions work in blocks of 8)."""
    count = int(keep) if keep is not None else int(round(float(ratio) * channels))
    if multiple > 1 and keep is None:
        count = int(round(count / multiple)) * multiple
        count = max(multiple, count)
    return max(1, count)


# ---- the pass -----------------------------------------------------------------------------------
class ChannelPruning(OnnxqPass):
    """Prune the input channels of the named Convs (``ratios``: fraction of input channels kept,
    rounded to a multiple of ``multiple``, or ``keep``: exact counts) on calibration ``data``.

    ``reference``: the model whose layer outputs are the targets (default: the model as it is
    when the pass starts). ``samples``: precomputed :class:`LayerSamples` by layer name (skips
    the capture; used by the ratio sweep).
    """

    name = "channel-pruning"
    verb = "pruned"

    def __init__(self, ratios: Mapping[str, float] | None = None, keep: Mapping[str, int] | None = None,
                 data: Any = None, *, reference: ir.Model | None = None, method: str = "greedy",
                 rows: int = 4096, max_samples: int | None = 64, seed: int = 0,
                 samples: Mapping[str, LayerSamples] | None = None, multiple: int = 1) -> None:
        super().__init__()
        if method not in ("greedy", "lasso"):
            raise ValueError(f"unknown channel selection method '{method}' (greedy, lasso)")
        self.ratios = dict(ratios or {})
        self.keep = dict(keep or {})
        self.data = data
        self.reference = reference
        self.method = method
        self.rows = rows
        self.max_samples = max_samples
        self.seed = seed
        self.samples = dict(samples or {})
        self.multiple = max(1, int(multiple))
        #: kept input-channel indices per pruned layer in the last run
        self.kept: dict[str, list[int]] = {}

    def run_on_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        if graph is not model.graph:
            return False
        from onnxq.compress.macs import value_shapes

        self.kept = {}
        wanted = set(self.keep) | set(self.ratios)
        targets = []
        for node in graph:
            if (node.name or "") in wanted:
                wanted.discard(node.name)
                reason = self._target_problem(node)
                if reason:
                    self.skip(node, reason)
                else:
                    targets.append(node)
        for name in sorted(wanted):
            self.skip(None, f"no node named '{name}'")
        if not targets:
            return False
        reference = self.reference
        if reference is None and any(node.name not in self.samples for node in targets):
            reference = model.clone()  # the targets: this model's outputs before any pruning
        batches = None
        modified = False
        #: original output channels still present, for layers whose outputs an earlier pruning cut
        out_kept: dict[int, np.ndarray] = {}
        for node in targets:
            shapes = value_shapes(model)
            layer = as_layer(node)
            channels = layer.in_channels
            count = self._count(node.name, channels)
            if count >= channels:
                self.skip(node, f"keeps {count} of {channels} channels (nothing to prune)")
                continue
            try:
                plan = plan_channels(node, shapes)
            except _Blocked as exc:
                self.skip(node, str(exc))
                continue
            samples = self.samples.get(node.name)
            if samples is None:
                if self.data is None:
                    raise ValueError("ChannelPruning needs calibration data (data=...)")
                if batches is None:
                    from onnxq.algorithms._capture import materialize

                    batches = materialize(self.data, model, self.max_samples)
                samples = capture_samples(reference, model, [node.name], batches, self._rows(layer), self.seed).get(node.name)
                if samples is None:
                    self.skip(node, "its samples could not be captured")
                    continue
            if id(node) in out_kept:  # an earlier target's plan removed some of its outputs
                samples = LayerSamples(samples.x, samples.t[:, out_kept[id(node)]])
            wc = layer.canonical().astype(np.float64)
            w3 = wc.reshape(wc.shape[0], channels, -1)
            kept = select_channels(samples, w3, layer.bias(), count, self.method)
            w_new, b_new = refit(samples, kept)
            apply_plan(graph, plan, kept)
            for other, out, _, depthwise in plan.layers.values():
                if out or depthwise:
                    before = out_kept.get(id(other.node), np.arange(channels))
                    out_kept[id(other.node)] = before[kept]
            set_constant(layer.weight, w_new.reshape((wc.shape[0], len(kept)) + wc.shape[2:]))
            layer.set_bias(graph, b_new)
            self.kept[node.name] = [int(i) for i in kept]
            log.debug("%s: keeps %d of %d input channels (%d layers, %d constants follow)",
                      node.name, len(kept), channels, len(plan.layers), len(plan.constants))
            self.changed()
            modified = True
        return modified

    def _rows(self, layer: WeightLayer) -> int:
        patch = int(math.prod(layer.canonical_shape[1:]))
        return int(min(max(self.rows, 3 * patch), 20000))

    def _count(self, name: str, channels: int) -> int:
        return kept_count(self.keep.get(name), self.ratios.get(name), channels, self.multiple)

    def _target_problem(self, node: ir.Node) -> str | None:
        if not is_op(node, "Conv"):
            return f"{node.op_type} is not a Conv"
        layer = as_layer(node)
        if isinstance(layer, str):
            return layer
        if layer.groups != 1:
            return f"grouped Conv (group={layer.groups}): its input channels are tied to its groups"
        return weight_problem(layer.weight, [node]) or float_problem(layer.weight) or layer.bias_problem()
