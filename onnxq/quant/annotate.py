"""Decide where quantizers go (no graph edits here): the *plan* Q/DQ insertion then carries out.

For every tensor the plan says whether and how it is quantized:

* **weights** of Conv / ConvTranspose / Gemm / MatMul (constant, float): per tensor or per
  output channel on the op's axis (Conv 0, ConvTranspose 1, Gemm 0 if transB else 1, MatMul 1);
* **biases** of Conv / ConvTranspose / Gemm: 32-bit with scale = input scale × weight scale,
  when both the input activation and the weight are quantized;
* **activations** at op boundaries: float model inputs (``model_inputs``) and node outputs,
  except inside a fusion supergroup (Conv→Relu: the quantizer goes after the Relu), constant
  sub-expressions, non-float tensors and graph outputs (unless ``model_outputs``);
* **tied encodings**: data-movement ops (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice,
  Gather, Identity, Pad, …) and MaxPool / Resize reuse their input's encoding, and Concat's inputs and
  output share one, so the runtime sees equal scales where it needs them;
* **fixed ranges**: Sigmoid, HardSigmoid and Softmax outputs are [0, 1], Tanh [−1, 1].

Facts are kept in the returned :class:`QuantPlan`; nothing in the model changes.
"""

from __future__ import annotations

__all__ = ["QuantPlan", "ActivationGroup", "WeightSite", "BiasSite", "annotate", "QUANTIZED_OPS"]

import dataclasses
import logging

import onnx_ir as ir

from onnxq.errors import UnsupportedModelError
from onnxq.passes._graph import attr, constant, is_op, sole_consumer, weight_problem
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
FIXED_RANGES = {"Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Softmax": (0.0, 1.0),
                "Tanh": (-1.0, 1.0)}
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclasses.dataclass
class ActivationGroup:
    """Tensors that share one encoding; ``quantized`` are the ones that get a Q/DQ pair."""

    spec: QuantSpec
    members: list[ir.Value]
    quantized: list[ir.Value]
    fixed_range: tuple[float, float] | None = None


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
class QuantPlan:
    groups: list[ActivationGroup]
    weights: list[WeightSite]
    biases: list[BiasSite]
    skipped: list[tuple[str, str]]

    def group_of(self) -> dict[int, ActivationGroup]:
        return {id(v): g for g in self.groups for v in g.members}


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


def annotate(model: ir.Model, config: QuantConfig) -> QuantPlan:
    """Decide the quantizers of the main graph of ``model`` (subgraphs stay float)."""
    _check_not_quantized(model)
    _ensure_types(model)
    graph = model.graph
    skipped: list[tuple[str, str]] = []
    weights: list[WeightSite] = []
    biases: list[BiasSite] = []
    weight_inputs: set[int] = set()

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
        weight_inputs.add(id(layer.weight))
        if config.quantize_bias and node.op_type != "MatMul" and len(node.inputs) > 2:
            bias = node.inputs[2]
            if bias is not None and constant(bias) is not None and _is_float(bias) and \
                    not weight_problem(bias, [node]) and constant(bias).ndim == 1:
                biases.append(BiasSite(node, bias, site))

    # activations: candidates, then ties
    ties = _Ties()
    candidates: list[ir.Value] = []
    specs: dict[int, QuantSpec] = {}
    fixed: dict[int, tuple[float, float]] = {}
    supergroup_pairs = {
        (g[i], g[i + 1]) for g in config.supergroups for i in range(len(g) - 1)
    }

    def consider(value: ir.Value, owner: ir.Node | None) -> None:
        if not _is_float(value) or value.const_value is not None or not value.uses():
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
        if node.op_type in QUANTIZED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in ("Constant", "Shape", "Size", "ConstantOfShape"):
            continue
        data_inputs = [i for i in node.inputs if i is not None and constant(i) is None]
        if not data_inputs:
            continue  # a constant sub-expression
        out = node.outputs[0] if node.outputs else None
        if out is None:
            continue
        nxt = sole_consumer(out)
        if nxt is not None and (node.op_type, nxt.op_type) in supergroup_pairs:
            continue  # inside a fusion supergroup: quantize after its tail
        if node.op_type in FIXED_RANGES:
            fixed[id(out)] = FIXED_RANGES[node.op_type]
        consider(out, node)
        if (
            node.op_type in TIED_OPS
            and node.inputs[0] is not None
            and _is_float(node.inputs[0])
            and constant(node.inputs[0]) is None  # a Gather from an embedding table is not tied
        ):
            ties.union(out, node.inputs[0])
            for extra in node.outputs[1:]:
                if _is_float(extra) and extra.uses():
                    consider(extra, node)
                    ties.union(extra, node.inputs[0])
        if is_op(node, "Concat"):
            for inp in node.inputs:
                if inp is not None and _is_float(inp) and constant(inp) is None:
                    ties.union(out, inp)

    quantized_ids = {id(v) for v in candidates}
    by_root: dict[int, ActivationGroup] = {}
    for key in ties.parent:
        root = ties.find(key)
        value = ties.values[key]
        group = by_root.get(root)
        if group is None:
            spec = specs.get(key, config.activations)
            group = by_root[root] = ActivationGroup(spec, [], [])
        group.members.append(value)
        if key in quantized_ids:
            group.quantized.append(value)
            group.spec = specs[key]
        if key in fixed:
            group.fixed_range = fixed[key]
    groups = [g for g in by_root.values() if g.quantized]
    log.info(
        "annotate: %d activation groups (%d tensors), %d weights, %d biases, %d skipped",
        len(groups), sum(len(g.quantized) for g in groups), len(weights), len(biases), len(skipped),
    )
    return QuantPlan(groups, weights, biases, skipped)
