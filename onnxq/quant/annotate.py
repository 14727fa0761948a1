"""Decide where quantizers go (no graph edits here): the *plan* Q/DQ insertion then carries out.

For every tensor the plan says whether and how it is quantized:

* **weights** of Conv / ConvTranspose / Gemm / MatMul (constant, float): per tensor or per
  output channel on the op's axis (Conv 0, ConvTranspose 1, Gemm 0 if transB else 1, MatMul 1);
* **biases** of Conv / ConvTranspose / Gemm: 32-bit with scale = input scale × weight scale,
  when both the input activation and the weight are quantized;
* **constant operands** of an element-wise Add / Mul that runs as an integer kernel: quantized
  per tensor on the activations' grid (as ``onnxruntime.quantization`` does), since
  QLinearAdd / QLinearMul need a DequantizeLinear on both inputs;
* **activations** (``placement``, see below): float model inputs (``model_inputs``) and node
  outputs, except inside a fusion supergroup (Conv→Relu: the quantizer goes after the Relu),
  constant sub-expressions, non-float tensors and graph outputs (unless ``model_outputs``);
* **tied encodings**: data-movement ops (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice,
  Gather, Identity, Pad, …) and MaxPool / Resize reuse their input's encoding, and Concat's inputs and
  output share one, so the runtime sees equal scales where it needs them;
* **fixed ranges**: Sigmoid, HardSigmoid and Softmax outputs are [0, 1], Tanh [−1, 1];
* **integer clips** (``QuantConfig.integer_clips``): a ``Min`` / ``Max`` with a constant operand
  whose data input and output are both quantized (CLE turns ReLU6 into ``Relu → Min(·, 6/s)``
  with a per-channel bound) runs on the integers. Rounding and clamping are monotone, so with one
  grid ``Q(min(y, c)) = min(Q(y), Q(c))`` exactly (and the same for ``max``); the input is tied to
  the output's encoding (calibrated on the output only) and Q/DQ insertion writes
  ``QuantizeLinear → Min(integers, Q(c)) → DequantizeLinear`` instead of
  ``Q → DQ → Min → Q → DQ``, so onnxruntime fuses the layers on both sides into QLinearConv
  with a uint8 ``Min`` between them. Applies when the input is read by the Min / Max only, is
  the only tensor of its group, and the constant does not broadcast the input to a larger shape.

**Placement.** ``"all"`` quantizes every op boundary (a fixed-point accelerator; AIMET).
``"runtime"`` (the default) quantizes a tensor only where an integer kernel of the runtime reads or
writes it (``QuantConfig.integer_ops``: onnxruntime CPU's QDQ fusions); elsewhere a Q/DQ pair only
adds two ops and a rounding error. Which ops run as integer kernels:

1. *anchors* — Conv / Gemm / MatMul whose weight is quantized, MatMul of two activations — always;
2. *light* integer ops (Add, Mul, Sigmoid, Softmax, pooling, Concat, …) by a vote that minimizes
   conversions: running one in integers costs a Q or DQ on each edge to a float neighbour and
   saves one on each edge to an integer neighbour (edges are followed through data-movement ops
   and Relu / Clip), so it runs in integers when its integer edges are at least its float edges
   (Conv → Mul(c) → Add(b) → Conv: integers; an Add between two float ops: float). Ops in
   ``QuantConfig.integer_neighbours`` count as integer neighbours although they run in float
   (LayerNormalization: see the config). A light op whose input lies inside a supergroup, or
   whose constant input cannot be quantized (±Inf), stays float;
3. Relu / Clip after an integer op is absorbed (an implicit supergroup): the quantizer goes after
   it, and Q/DQ insertion drops it when the grid lies inside its bounds.

**Sentinels.** A constant of magnitude ≥ ``QuantConfig.sentinel`` (1e4) is a stand-in for ±∞ —
an attention mask's −1e4 or float32's lowest value. Tensors computed from it by element-wise and
data-movement ops (``Where(mask, 0, −3.4e38)``, ``scores + mask``) are never quantized, and ops
reading them stay float: a grid spanning ±3.4e38 has no room left for the attention scores (this
alone takes MiniLM's retrieval R@1 from 0.39 to 0.04 under ``onnxruntime.quantization``).

A tied group of tensors is quantized when one of its tensors is written or read by an integer op.
``members`` of a group are the tensors whose statistics set its encoding: outputs of Reshape,
Transpose, Flatten, Squeeze, Unsqueeze, Identity, Dropout, DepthToSpace and SpaceToDepth hold the
same values as their input and are left out of them (still quantized when ``quantized`` lists them).

Facts are kept in the returned :class:`QuantPlan`; nothing in the model changes.
"""

from __future__ import annotations

__all__ = [
    "QuantPlan", "ActivationGroup", "WeightSite", "BiasSite", "ConstantSite", "IntegerClip",
    "annotate", "QUANTIZED_OPS",
]

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxq.errors import UnsupportedModelError
from onnxq.passes._graph import attr, clip_bounds, constant, is_op, sole_consumer, weight_problem
from onnxq.passes._layers import as_layer
from onnxq.quant.config import QuantConfig, QuantSpec

log = logging.getLogger(__name__)

#: ops whose presence means the model is already quantized
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QGemm",
})
#: ops whose output reuses the encoding of input 0
TIED_OPS = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Identity",
    "Dropout", "MaxPool", "GlobalMaxPool", "Resize", "Upsample", "DepthToSpace",
    "SpaceToDepth", "Split", "Expand", "Tile", "Pad",
})
#: tied ops whose output holds exactly the values of their input (same statistics)
SAME_VALUES_OPS = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout",
    "DepthToSpace", "SpaceToDepth",
})
FIXED_RANGES = {"Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Softmax": (0.0, 1.0),
                "Tanh": (-1.0, 1.0)}
#: weight layers that are integer kernels once their weight is quantized (ConvTranspose is not
#: one on onnxruntime's CPU provider)
_ANCHOR_OPS = frozenset({"Conv", "Gemm", "MatMul"})
#: element-wise ops whose one constant operand is quantized so that they run in integers
_CONSTANT_OPERAND_OPS = frozenset({"Add", "Mul"})
_ABSORBED = ("Relu", "Clip")
#: ops through which a sentinel (a stand-in for ±∞) reaches their output
_SENTINEL_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Where", "Max", "Min", "Cast", "Concat", "CastLike",
}) | TIED_OPS
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclasses.dataclass
class ActivationGroup:
    """Tensors that share one encoding; ``quantized`` are the ones that get a Q/DQ pair."""

    spec: QuantSpec
    members: list[ir.Value]
    quantized: list[ir.Value]
    fixed_range: tuple[float, float] | None = None
    #: a scaled copy of ``source``'s grid: scale × ``factor``, same zero point (no statistics of
    #: its own; ``members`` is empty). Its first quantized tensor is the output of ``folded``, a
    #: Mul / Div by a scalar constant that Q/DQ insertion removes.
    source: ir.Value | None = None
    factor: float = 1.0
    folded: ir.Node | None = None


@dataclasses.dataclass
class WeightSite:
    node: ir.Node
    value: ir.Value
    spec: QuantSpec
    #: axis of the native weight layout that holds output channels (None: per tensor)
    axis: int | None


@dataclasses.dataclass
class BiasSite:
    node: ir.Node
    value: ir.Value
    weight: WeightSite


@dataclasses.dataclass
class ConstantSite:
    """A constant operand of an integer element-wise op, quantized per tensor on ``spec``'s grid
    over its own range (0 included)."""

    node: ir.Node
    index: int
    value: ir.Value
    spec: QuantSpec


@dataclasses.dataclass
class IntegerClip:
    """A ``Min`` / ``Max`` with a constant bound that runs on the integers of its input's grid.

    ``node.inputs[data]`` and ``node.outputs[0]`` are quantized tensors of one group (the
    output's statistics set it); ``node.inputs[bound]`` is the float constant, stored as
    ``clamp(round(c / s) + z)`` on that grid by Q/DQ insertion."""

    node: ir.Node
    data: int
    bound: int


@dataclasses.dataclass
class QuantPlan:
    groups: list[ActivationGroup]
    weights: list[WeightSite]
    biases: list[BiasSite]
    skipped: list[tuple[str, str]]
    constants: list[ConstantSite] = dataclasses.field(default_factory=list)
    clips: list[IntegerClip] = dataclasses.field(default_factory=list)

    def group_of(self) -> dict[int, ActivationGroup]:
        return {id(v): g for g in self.groups for v in (*g.members, *g.quantized)}


def _ensure_types(model: ir.Model) -> None:
    """Fill in missing value types with ONNX shape inference (types only; no node changes)."""
    if all(o.dtype is not None for n in model.graph for o in n.outputs):
        return
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        ShapeInferencePass()(model)
    except Exception as exc:  # noqa: BLE001 - inference is best effort
        log.warning("shape inference failed (%s); tensors of unknown type stay float", exc)


def _check_not_quantized(model: ir.Model) -> None:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in QUANTIZED_OPS:
            raise UnsupportedModelError(
                f"node '{node.name}' ({node.op_type}): the model is already quantized; "
                "quantize its float original instead"
            )


def _weight_axis(node: ir.Node, spec: QuantSpec, groups: int) -> int | None:
    if not spec.per_channel:
        return None
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if groups == 1 else None
    if op == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return 1  # MatMul with a 2-D weight: output features are the last axis


def _is_float(value: ir.Value) -> bool:
    return value.dtype in _FLOATS


def _is_const(value: ir.Value) -> bool:
    """A constant (initializer or folded), without reading its data; a graph input is not."""
    return value.const_value is not None and not value.is_graph_input()


def _is_activation(value: ir.Value | None) -> bool:
    return value is not None and _is_float(value) and not _is_const(value)


def _is_standard(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


class _Ties:
    """Union-find over values."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.values: dict[int, ir.Value] = {}

    def add(self, v: ir.Value) -> None:
        self.parent.setdefault(id(v), id(v))
        self.values[id(v)] = v

    def find(self, k: int) -> int:
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def union(self, a: ir.Value, b: ir.Value) -> None:
        self.add(a)
        self.add(b)
        self.parent[self.find(id(a))] = self.find(id(b))


def _tied_input(node: ir.Node) -> ir.Value | None:
    """The input whose encoding a data-movement op's outputs reuse (None: not tied)."""
    if node.op_type not in TIED_OPS or not _is_standard(node) or not node.inputs:
        return None
    first = node.inputs[0]
    return first if _is_activation(first) else None


def _data_inputs(node: ir.Node) -> list[tuple[int, ir.Value]]:
    """(index, value) of the float activation inputs an integer kernel of ``node`` reads."""
    op = node.op_type
    if op in ("Conv", "Gemm"):
        indices: range | tuple[int, ...] = (0,)
    elif op == "Where":
        indices = (1, 2)
    else:
        indices = range(len(node.inputs))
    return [(i, node.inputs[i]) for i in indices
            if i < len(node.inputs) and _is_activation(node.inputs[i])]


def _sentinel_values(graph: ir.Graph, magnitude: float) -> set[int]:
    """ids of the float tensors that carry a sentinel constant (see the module docstring)."""
    carrying: set[int] = set()
    if magnitude <= 0:
        return carrying
    for node in graph:
        if not _is_standard(node) or node.op_type not in _SENTINEL_OPS:
            continue
        hit = False
        for value in node.inputs:
            if value is None:
                continue
            if id(value) in carrying:
                hit = True
            elif _is_float(value) and _is_const(value):
                array = constant(value)
                if array.size and float(np.max(np.abs(array))) >= magnitude:
                    hit = True
        if hit:
            carrying.update(id(o) for o in node.outputs if _is_float(o))
    return carrying


def _absorbable(node: ir.Node | None, config: QuantConfig) -> bool:
    """True for a Relu / Clip that Q/DQ insertion can drop after quantizing its output: its
    bounds contain 0 (an asymmetric grid from the calibrated range then lies inside them) and,
    for a symmetric grid, it has no lower bound."""
    if not is_op(node, _ABSORBED) or not node.inputs or node.inputs[0] is None:
        return False
    spec = config.activation_spec(node.name or "", node.op_type)
    if spec is None:
        return False
    if node.op_type == "Relu":
        return not spec.symmetric
    bounds = clip_bounds(node)
    if isinstance(bounds, str):
        return False
    lo, hi = bounds
    if spec.symmetric:
        return lo is None and (hi is None or hi >= 0)
    return (lo is None or lo <= 0) and (hi is None or hi >= 0)


def _scalar_factor(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(x, k) when ``node`` computes ``x·k`` for a positive finite scalar constant ``k``
    (``Mul(x, c)``, ``Mul(c, x)``, ``Div(x, c)``) without changing the shape of ``x``."""
    if not _is_standard(node) or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is None or b is None or not node.outputs:
        return None
    if node.op_type == "Div":
        pairs = [(a, b)]
    else:
        pairs = [(a, b), (b, a)]
    for x, c in pairs:
        if not _is_activation(x) or not _is_float(c) or not _is_const(c):
            continue
        if c.const_value.size != 1:
            continue
        if len(c.shape or ()) > 0 and (x.shape is None or len(x.shape) < len(c.shape)):
            continue
        k = float(constant(c).reshape(()))
        if not (np.isfinite(k) and k > 0.0):
            continue
        k = 1.0 / k if node.op_type == "Div" else k
        return (x, k) if np.isfinite(k) and k > 0.0 else None
    return None


class _Placement:
    """Which nodes run as integer kernels (placement "runtime"), see the module docstring."""

    def __init__(self, graph: ir.Graph, config: QuantConfig, weighted: set[int],
                 inside: set[int], sentinels: set[int]) -> None:
        self.config = config
        self.sentinels = sentinels
        self.integer_ops = frozenset(config.integer_ops)
        self.integer_neighbours = frozenset(config.integer_neighbours)
        #: outputs of supergroup heads (not quantized)
        self.inside = inside
        #: node id → True (integer kernel) / False (float) / None (undecided light op)
        self.state: dict[int, bool | None] = {}
        #: node id → (x, k) of a Mul / Div by a positive scalar that may become a change of scale
        self.scalings: dict[int, tuple[ir.Value, float]] = {}
        light: list[ir.Node] = []
        for node in graph:
            self.state[id(node)] = False
            if self._skipped(node):
                continue
            scaling = _scalar_factor(node) if config.fold_scalar_scales else None
            if scaling is not None and id(node.outputs[0]) not in inside:
                self.scalings[id(node)] = scaling
                continue
            if not _is_standard(node) or node.op_type not in self.integer_ops:
                continue
            if node.op_type in _ANCHOR_OPS:
                if id(node) in weighted or (
                    node.op_type == "MatMul" and len(_data_inputs(node)) == 2
                ):
                    self.state[id(node)] = True
                continue
            if self._can_be_light(node, inside | sentinels):
                self.state[id(node)] = None
                light.append(node)
        self._vote(light)

    def _skipped(self, node: ir.Node) -> bool:
        o = self.config.override(node.name or "", node.op_type)
        return bool(o.get("skip") or o.get("skip_activations"))

    @staticmethod
    def _can_be_light(node: ir.Node, unquantizable: set[int]) -> bool:
        if not node.outputs or not _is_float(node.outputs[0]):
            return False
        data = _data_inputs(node)
        if not data or any(id(v) in unquantizable for _, v in data):
            return False  # a constant expression, or an input inside a supergroup / a sentinel
        consts = [v for i, v in enumerate(node.inputs)
                  if v is not None and _is_float(v) and _is_const(v)
                  and (node.op_type != "Where" or i > 0)]
        if not consts:
            return True
        if node.op_type not in _CONSTANT_OPERAND_OPS or len(consts) != 1:
            return False
        return bool(np.isfinite(constant(consts[0])).all())

    # -- edges, through data-movement ops, Relu / Clip and float supergroup heads (Pad→Conv) ---
    def _transparent(self, node: ir.Node, value: ir.Value) -> bool:
        """True if ``node`` passes ``value`` on unchanged in placement terms."""
        if _tied_input(node) is value:
            return True
        scaling = self.scalings.get(id(node))
        if scaling is not None:
            return scaling[0] is value
        if not node.inputs or node.inputs[0] is not value:
            return False
        if sole_consumer(value) is node and _absorbable(node, self.config):
            return True
        # the float head of a supergroup (Pad of Pad→Conv): its tail reads the input
        return bool(node.outputs) and id(node.outputs[0]) in self.inside and \
            node.op_type not in self.integer_ops

    def _through(self, node: ir.Node) -> ir.Value | None:
        """The input a transparent ``node`` passes on (None: not transparent)."""
        scaling = self.scalings.get(id(node))
        if scaling is not None:
            return scaling[0]
        first = node.inputs[0] if node.inputs else None
        return first if first is not None and self._transparent(node, first) else None

    def _sources(self, value: ir.Value) -> Iterator[ir.Node | None]:
        """The node that effectively writes ``value`` (None: a graph input)."""
        node = value.producer()
        for _ in range(64):
            if node is None:
                break
            passed = self._through(node)
            if passed is None:
                break
            node = passed.producer()
        yield node

    def _sinks(
        self, value: ir.Value, depth: int = 0, activations: bool = True
    ) -> Iterator[tuple[ir.Node | None, ir.Value]]:
        """(node, the value it reads) for the nodes that effectively read ``value`` (None: a
        graph output); ``activations=False`` stops at a Relu / Clip."""
        if value.is_graph_output() and not self.config.model_outputs:
            yield None, value
        for use in value.uses():
            node = use.node
            if depth < 64 and self._transparent(node, value) and (
                activations or not is_op(node, _ABSORBED)
            ):
                for out in node.outputs:
                    yield from self._sinks(out, depth + 1, activations)
            else:
                yield node, value

    def _edges(self, node: ir.Node) -> list[ir.Node | None]:
        edges: list[ir.Node | None] = []
        for _, v in _data_inputs(node):
            edges.extend(self._sources(v))
        edges.extend(n for n, _ in self._sinks(node.outputs[0]))
        return edges

    def _count(self, node: ir.Node) -> tuple[int, int, int]:
        ints = floats = undecided = 0
        for other in self._edges(node):
            if other is not None and other.op_type in self.integer_neighbours:
                ints += 1
                continue
            state = False if other is None else self.state.get(id(other), False)
            if state is None:
                undecided += 1
            elif state:
                ints += 1
            else:
                floats += 1
        return ints, floats, undecided

    def _vote(self, light: list[ir.Node]) -> None:
        pending = list(light)
        changed = True
        while pending and changed:
            changed = False
            for node in list(pending):
                ints, floats, undecided = self._count(node)
                if ints > floats + undecided or (ints > floats and ints > 0 and not undecided):
                    self.state[id(node)] = True
                elif floats > ints + undecided or (floats > ints and not undecided):
                    self.state[id(node)] = False
                else:
                    continue
                pending.remove(node)
                changed = True
        # ties, and chains of light ops waiting on each other: integers spread from integer
        # neighbours (a tie costs nothing either way; integers move a quarter of the bytes)
        changed = True
        while pending and changed:
            changed = False
            for node in list(pending):
                ints, floats, _ = self._count(node)
                if ints > 0 and ints >= floats:
                    self.state[id(node)] = True
                    pending.remove(node)
                    changed = True
        for node in pending:
            self.state[id(node)] = False

    # -- queries -----------------------------------------------------------------------------------
    def integer(self, node: ir.Node | None) -> bool:
        return node is not None and bool(self.state.get(id(node)))

    def writes_integers(self, value: ir.Value) -> bool:
        """True if an integer kernel writes ``value`` (through an absorbed Relu / Clip or a
        change of scale)."""
        return any(self.integer(node) for node in self._sources(value))

    def reads_integers(self, value: ir.Value) -> bool:
        """True if an integer kernel reads ``value`` as one of its data inputs (directly or
        through a float supergroup head, as Conv reads the input of Pad→Conv, or a change of
        scale)."""
        for node, read in self._sinks(value, activations=False):
            if self.integer(node) and any(v is read for _, v in _data_inputs(node)):
                return True
        return False


def annotate(model: ir.Model, config: QuantConfig) -> QuantPlan:
    """Decide the quantizers of the main graph of ``model`` (subgraphs stay float)."""
    _check_not_quantized(model)
    _ensure_types(model)
    graph = model.graph
    skipped: list[tuple[str, str]] = []
    weights: list[WeightSite] = []
    biases: list[BiasSite] = []

    for node in graph:
        layer = as_layer(node)
        if isinstance(layer, str):
            continue
        if not _is_float(layer.weight):
            continue
        spec = config.weight_spec(node.name or "", node.op_type)
        if spec is None:
            skipped.append((node.name or "", "skipped by override"))
            continue
        problem = weight_problem(layer.weight, [node])
        if problem:
            skipped.append((node.name or "", problem))
            continue
        site = WeightSite(node, layer.weight, spec, _weight_axis(node, spec, layer.groups))
        weights.append(site)
        if config.quantize_bias and node.op_type != "MatMul" and len(node.inputs) > 2:
            bias = node.inputs[2]
            if bias is not None and constant(bias) is not None and _is_float(bias) and \
                    not weight_problem(bias, [node]) and constant(bias).ndim == 1:
                biases.append(BiasSite(node, bias, site))

    supergroup_pairs = {
        (g[i], g[i + 1]) for g in config.supergroups for i in range(len(g) - 1)
    }

    def in_supergroup(node: ir.Node) -> bool:
        nxt = sole_consumer(node.outputs[0]) if node.outputs else None
        return nxt is not None and (node.op_type, nxt.op_type) in supergroup_pairs

    sentinels = _sentinel_values(graph, config.sentinel)
    placement = None
    if config.placement == "runtime":
        inside = {id(n.outputs[0]) for n in graph if n.outputs and in_supergroup(n)}
        placement = _Placement(graph, config, {id(s.node) for s in weights}, inside, sentinels)

    # activations: candidates, then ties
    ties = _Ties()
    candidates: list[ir.Value] = []
    specs: dict[int, QuantSpec] = {}
    fixed: dict[int, tuple[float, float]] = {}

    def consider(value: ir.Value, owner: ir.Node | None) -> None:
        if not _is_float(value) or value.const_value is not None or not value.uses():
            return
        if id(value) in sentinels:
            skipped.append((value.name or "", "carries a sentinel (a stand-in for ±inf)"))
            return
        if value.is_graph_output() and not config.model_outputs:
            return
        name = owner.name if owner is not None else ""
        spec = config.activation_spec(name or "", owner.op_type if owner else "<input>")
        if spec is None:
            skipped.append((value.name or "", "skipped by override"))
            return
        candidates.append(value)
        specs[id(value)] = spec
        ties.add(value)

    if config.model_inputs:
        for inp in graph.inputs:
            consider(inp, None)
    for node in graph:
        if node.op_type in QUANTIZED_OPS or not _is_standard(node):
            continue
        if node.op_type in ("Constant", "Shape", "Size", "ConstantOfShape"):
            continue
        data_inputs = [i for i in node.inputs if i is not None and not _is_const(i)]
        if not data_inputs:
            continue  # a constant sub-expression
        out = node.outputs[0] if node.outputs else None
        if out is None:
            continue
        if in_supergroup(node):
            continue  # inside a fusion supergroup: quantize after its tail
        if placement is not None and placement.integer(node) and \
                _absorbable(sole_consumer(out), config):
            continue  # Relu / Clip after an integer op: quantize after it (it is then dropped)
        if node.op_type in FIXED_RANGES:
            fixed[id(out)] = FIXED_RANGES[node.op_type]
        consider(out, node)
        tied = _tied_input(node)
        if tied is not None:  # a Gather from an embedding table (a constant) is not tied
            ties.union(out, tied)
            for extra in node.outputs[1:]:
                if _is_float(extra) and extra.uses():
                    consider(extra, node)
                    ties.union(extra, tied)
        if is_op(node, "Concat"):
            for inp in node.inputs:
                if _is_activation(inp):
                    ties.union(out, inp)

    quantized_ids = {id(v) for v in candidates}
    by_root: dict[int, ActivationGroup] = {}
    needed: dict[int, bool] = {}
    for key in ties.parent:
        root = ties.find(key)
        value = ties.values[key]
        group = by_root.get(root)
        if group is None:
            spec = specs.get(key, config.activations)
            group = by_root[root] = ActivationGroup(spec, [], [])
        if not _same_values_as_member(value, ties, root):
            group.members.append(value)
        if key in quantized_ids:
            group.quantized.append(value)
            group.spec = specs[key]
        if key in fixed:
            group.fixed_range = fixed[key]
        if placement is not None and not needed.get(root):
            needed[root] = placement.writes_integers(value) or placement.reads_integers(value)
    groups = [
        g for root, g in by_root.items()
        if g.quantized and (placement is None or needed.get(root)
                            or any(v.is_graph_output() for v in g.quantized))
    ]
    for g in groups:
        if not g.members:  # cannot happen (a group's root value is a member), but stay safe
            g.members = list(g.quantized)
    clips = _integer_clips(graph, groups) if config.integer_clips else []
    if placement is not None:
        _fold_scalings(groups, placement)

    constants = _constant_sites(graph, config, groups, placement)
    if placement is not None:
        integer = sum(1 for state in placement.state.values() if state)
        log.info(
            "annotate: %d nodes run as integer kernels, %d Mul/Div by a scalar folded into a "
            "scale, %d tensors carry a sentinel", integer, sum(1 for g in groups if g.source),
            len(sentinels),
        )
    log.info(
        "annotate (%s): %d activation groups (%d tensors), %d weights, %d biases, "
        "%d constant operands, %d integer clips, %d skipped",
        config.placement, len(groups), sum(len(g.quantized) for g in groups), len(weights),
        len(biases), len(constants), len(clips), len(skipped),
    )
    return QuantPlan(groups, weights, biases, skipped, constants, clips)


def _bound_fits(bound: ir.Value, data: ir.Value) -> bool:
    """True if broadcasting the constant ``bound`` against ``data`` keeps ``data``'s shape."""
    c_shape = tuple(bound.const_value.shape)
    if int(np.prod(c_shape, dtype=np.int64)) == 1 and data.shape is not None and \
            len(c_shape) <= len(data.shape):
        return True
    if data.shape is None or len(c_shape) > len(data.shape):
        return False
    dims = list(data.shape)[len(data.shape) - len(c_shape):]
    return all(c == 1 or (isinstance(d, int) and d == c) for c, d in zip(c_shape, dims))


def _integer_clips(graph: ir.Graph, groups: list[ActivationGroup]) -> list[IntegerClip]:
    """Min / Max nodes with a constant bound that can run on integers (module docstring); their
    input joins the group of their output (which alone sets the encoding)."""
    owner = {id(v): g for g in groups for v in g.quantized}
    clips: list[IntegerClip] = []
    for node in reversed(list(graph)):  # a chain Max → Min joins from its end
        if not is_op(node, ("Min", "Max")) or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        consts = [i for i, v in enumerate(node.inputs) if v is not None and _is_const(v)]
        if len(consts) != 1:
            continue
        bound_i = consts[0]
        data_i = 1 - bound_i
        x, bound, out = node.inputs[data_i], node.inputs[bound_i], node.outputs[0]
        if x is None or not _is_float(bound) or bound.dtype != x.dtype:
            continue
        gx, gm = owner.get(id(x)), owner.get(id(out))
        if gx is None or gm is None or gx is gm:
            continue
        if sole_consumer(x) is not node or out.is_graph_output() or x.is_graph_output():
            continue
        if gx.quantized != [x] or gx.fixed_range is not None or gx.source is not None:
            continue
        if gm.source is not None or gm.folded is not None:
            continue
        if (gx.spec.bits, gx.spec.symmetric, gx.spec.strict) != (
            gm.spec.bits, gm.spec.symmetric, gm.spec.strict
        ):
            continue
        if not np.isfinite(constant(bound)).all() or not _bound_fits(bound, x):
            continue
        gm.quantized.insert(0, x)
        groups.remove(gx)
        owner[id(x)] = gm
        clips.append(IntegerClip(node, data_i, bound_i))
    clips.reverse()
    return clips


def _fold_scalings(groups: list[ActivationGroup], placement: _Placement) -> None:
    """Turn groups written by a Mul / Div by a positive scalar into scaled copies of their
    input's grid: ``Q(x·k)`` with scale ``s·k`` and ``x``'s zero point is ``Q(x)`` itself, so the
    op and its Q/DQ pair disappear (exact up to the float32 rounding of ``s·k``)."""
    owner = {id(v): g for g in groups for v in g.quantized}
    for g in groups:
        if len(g.members) != 1 or g.fixed_range is not None:
            continue
        u = g.members[0]
        node = u.producer()
        scaling = placement.scalings.get(id(node)) if node is not None else None
        if scaling is None or u not in g.quantized or u.is_graph_output():
            continue
        x, k = scaling
        src = owner.get(id(x))
        if src is None or src is g:
            continue
        if (src.spec.bits, src.spec.symmetric) != (g.spec.bits, g.spec.symmetric):
            continue
        g.source, g.factor, g.folded, g.members = x, k, node, []


def _same_values_as_member(value: ir.Value, ties: _Ties, root: int) -> bool:
    """True if ``value`` is the output of a value-preserving op whose input is in the same group
    (its statistics are its input's, so observing it again would be wasted work)."""
    node = value.producer()
    if node is None or node.op_type not in SAME_VALUES_OPS or not _is_standard(node):
        return False
    src = _tied_input(node)
    return src is not None and id(src) in ties.parent and ties.find(id(src)) == root


def _constant_sites(
    graph: ir.Graph, config: QuantConfig, groups: list[ActivationGroup],
    placement: _Placement | None,
) -> list[ConstantSite]:
    """Constant operands of Add / Mul nodes whose other input and output are quantized."""
    quantized = {id(v) for g in groups for v in g.quantized}
    spec_of = {id(v): g.spec for g in groups for v in g.quantized}
    integer_ops = frozenset(config.integer_ops)
    sites: list[ConstantSite] = []
    for node in graph:
        if not _is_standard(node) or node.op_type not in _CONSTANT_OPERAND_OPS:
            continue
        if node.op_type not in integer_ops or len(node.inputs) != 2 or not node.outputs:
            continue
        if placement is not None and not placement.integer(node):
            continue
        a, b = node.inputs
        if a is None or b is None:
            continue
        for index, (c, other) in enumerate(((a, b), (b, a))):
            if not _is_float(c) or not _is_const(c) or id(other) not in quantized:
                continue
            out = _quantized_output(node.outputs[0], quantized)
            if out is None or not np.isfinite(constant(c)).all():
                continue
            sites.append(ConstantSite(node, index, c, spec_of[id(out)]))
    return sites


def _quantized_output(value: ir.Value, quantized: set[int]) -> ir.Value | None:
    """``value`` or the output of the Relu / Clip absorbed after it, if that is quantized."""
    if id(value) in quantized:
        return value
    nxt = sole_consumer(value)
    if is_op(nxt, _ABSORBED) and id(nxt.outputs[0]) in quantized:
        return nxt.outputs[0]
    return None
