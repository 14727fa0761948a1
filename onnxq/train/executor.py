"""A differentiable executor of an ONNX graph: ``torch.nn.Module`` built straight from onnx-ir.

The module runs the graph node by node in topological order, each node through its function in
:mod:`onnxq.train.ops` (registry keyed by ``(domain, op_type)`` with opset ranges). Nothing is
converted into another model: the graph that is trained is the graph that is exported.

* Every trainable constant is an ``nn.Parameter`` keyed by its ONNX tensor name
  (:meth:`GraphModule.parameter`): the weights and biases of Conv / ConvTranspose / Gemm / MatMul,
  BatchNormalization and LayerNormalization scale and bias, constant operands of element-wise
  ops with more than one element. Other constants (shapes, indices, BatchNorm statistics, clip
  bounds, scalars) are buffers.
* In a QDQ model every ``QuantizeLinear`` is a :class:`Quantizer` with a scale ``s = s₀·exp(θ)``
  and a zero point ``z = z₀ + φ`` (``θ``, ``φ`` learnable or frozen, see
  :mod:`onnxq.train.fake_quant`); its ``DequantizeLinear`` readers (tied to it by their shared
  zero-point initializer, also through integer ops such as MaxPool or Clip on the codes, and
  through folded scalar scales ``s_dq = k·s``) dequantize with ``s_dq₀·exp(θ)`` and the same ``z``.
* A ``DequantizeLinear`` of stored integer weights becomes a fake-quantized **float** weight
  parameter (initialized from the float model when given, else from the dequantized integers)
  with its own quantizer; an int32 bias becomes a float bias fake-quantized on the scale
  ``s_x · s_w`` of the layer's input and weight quantizers, as the exported model stores it.

Forward semantics are onnxruntime's: Q/DQ bit for bit, float ops to float32 rounding.
"""

from __future__ import annotations

__all__ = ["GraphModule", "Quantizer", "check_supported"]

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from onnxq.errors import UnsupportedModelError
from onnxq.train import fake_quant as fq
from onnxq.train.ops import OpDef, lookup

log = logging.getLogger(__name__)

#: inputs of these ops that are weights (trainable when they are float constants)
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "PRelu": (1,),
    "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1),
}
_Q = ("", "QuantizeLinear")
_DQ = ("", "DequantizeLinear")


def _key(name: str) -> str:
    """A module/parameter key for an ONNX name (torch forbids '.' in keys)."""
    return name.replace(".", "\u00b7") or "_"


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _attrs(node: ir.Node, op: OpDef) -> dict[str, Any]:
    out: dict[str, Any] = dict(op.defaults)
    for name, attr in node.attributes.items():
        value = attr.value
        if isinstance(value, ir.TensorProtocol) or hasattr(value, "numpy"):
            value = torch.from_numpy(np.array(value.numpy()))
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    out["_n_outputs"] = len(node.outputs)
    return out


def _tensor(value: ir.Value) -> np.ndarray | None:
    """The constant a value holds (initializer or Constant node output), else None."""
    if value.const_value is not None:
        return np.array(value.const_value.numpy())
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and _domain(producer) == "":
        for name, attr in producer.attributes.items():
            v = attr.value
            if name == "value":
                return np.array(v.numpy())
            if name in ("value_float", "value_int"):
                return np.array(v, np.float32 if name == "value_float" else np.int64)
            if name in ("value_floats", "value_ints"):
                return np.array(list(v), np.float32 if name == "value_floats" else np.int64)
    return None


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 or arr.dtype.name in ("int4", "uint4") or arr.dtype == np.uint32 or arr.dtype == np.uint64:
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.array(arr, order="C"))  # (ascontiguousarray makes 0-d 1-d)


def check_supported(model: ir.Model) -> None:
    """Raise :class:`UnsupportedModelError` naming the first node the executor cannot run."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    bad: list[str] = []
    for node in model.graph:
        if node.op_type == "Constant" and _domain(node) == "":
            continue
        if (_domain(node), node.op_type) in (_Q, _DQ):
            if "block_size" in node.attributes and node.attributes["block_size"].value:
                bad.append(f"node '{node.name}' ({node.op_type}, opset {opset}): blocked quantization")
            continue
        found = lookup(_domain(node), node.op_type, opset)
        if isinstance(found, str):
            bad.append(f"node '{node.name}' ({(node.domain + '.') if node.domain else ''}"
                       f"{node.op_type}, opset {opset}): {found}")
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            bad.append(f"node '{node.name}' ({node.op_type}, opset {opset}): subgraphs")
            continue
        if found.check is not None:
            why = found.check(_attrs(node, found), node)
            if why:
                bad.append(f"node '{node.name}' ({node.op_type}, opset {opset}): {why} not supported")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UnsupportedModelError(
            f"the QAT executor cannot run {bad[0]}{more}; supported ops: onnxq.train.ops.OPS"
        )


class Quantizer(nn.Module):
    """One quantization grid: ``s = s₀·exp(θ)``, ``z = clamp(round_ste(z₀ + φ), qmin, qmax)``.

    ``θ`` (log of the scale's change) and ``φ`` (the zero point's change) start at 0, so an
    untrained quantizer reproduces the stored float32 scale and integer zero point exactly.
    """

    def __init__(self, name: str, scale: np.ndarray, zero_point: np.ndarray, qmin: int,
                 qmax: int, axis: int | None, kind: str) -> None:
        super().__init__()
        self.name, self.qmin, self.qmax, self.axis, self.kind = name, qmin, qmax, axis, kind
        s = torch.from_numpy(np.asarray(scale, np.float32).copy())
        z = torch.from_numpy(np.asarray(zero_point, np.float32).copy())
        self.register_buffer("scale0", s)
        self.register_buffer("zero0", z)
        self.log_scale = nn.Parameter(torch.zeros_like(s))
        self.offset = nn.Parameter(torch.zeros_like(z))
        self.frozen = False
        self.set_learnable(False)

    @property
    def learns_offset(self) -> bool:
        """Only unsigned (asymmetric) grids move their zero point; signed ones keep z = 0."""
        return self.qmin == 0

    def set_learnable(self, learn: bool) -> None:
        learn = learn and not self.frozen
        self.log_scale.requires_grad_(learn)
        self.offset.requires_grad_(learn and self.learns_offset)

    def scale(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """The current scale (``base`` instead of ``s₀`` for a tied DequantizeLinear)."""
        s0 = self.scale0 if base is None else base
        if not self.log_scale.requires_grad and not bool(self.log_scale.detach().any()):
            return s0  # exp(0) = 1: skip the arithmetic, keep bit-exactness obvious
        return s0 * torch.exp(self.log_scale)

    def zero_point(self) -> torch.Tensor:
        if not self.offset.requires_grad and not bool(self.offset.detach().any()):
            return self.zero0
        return torch.clamp(fq.round_ste(self.zero0 + self.offset), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (weights)."""
        return fq.fake_quantize(x, self.scale(), self.zero_point(), self.qmin, self.qmax, self.axis)

    def extra_repr(self) -> str:
        return (f"{self.name!r}, [{self.qmin}, {self.qmax}], axis={self.axis}, "
                f"channels={self.scale0.numel()}, frozen={self.frozen}")


class GraphModule(nn.Module):
    """Run an onnx-ir graph (float or QDQ) in torch; see the module docstring.

    ``float_weights``: float tensors by ONNX name that initialize the parameters behind weight
    ``DequantizeLinear`` nodes (a weight's integer initializer is ``<name>_quantized``); without
    them the dequantized integers are used.
    """

    def __init__(self, model: ir.Model, float_weights: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        check_supported(model)
        self.model = model
        graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        float_weights = float_weights or {}
        self.params = nn.ParameterDict()
        self.quantizers = nn.ModuleDict()
        self.param_names: dict[str, str] = {}  # ONNX name → key in self.params
        self.input_names = [v.name or f"input{i}" for i, v in enumerate(graph.inputs)]
        self._slot: dict[int, int] = {}
        self._consts: list[tuple[int, str, str]] = []  # (slot, "param"|"buffer", key)
        self._steps: list[tuple[Any, list[int | None], list[int]]] = []
        self.weight_quantizers: dict[str, tuple[str, str, str, str]] = {}
        self.bias_quantizers: dict[str, dict[str, Any]] = {}
        self.activation_quantizers: dict[str, dict[str, Any]] = {}
        self._q_key: dict[int, str] = {}

        initializers = {id(v) for v in graph.initializers.values()}
        for v in graph.inputs:
            self._new_slot(v)
        trainable = self._trainable_constants(graph)

        q_by_zero: dict[int, str] = {}  # zero-point value → key of the Quantizer of its Q node
        for node in graph:
            dom = (_domain(node), node.op_type)
            if dom == _Q:
                q_by_zero[id(node.inputs[2])] = self._add_activation_quantizer(node)
        n_buffers = 0
        for node in graph:
            dom = (_domain(node), node.op_type)
            if node.op_type == "Constant" and dom[0] == "":
                continue
            if dom == _DQ and node.inputs[0] is not None and _tensor(node.inputs[0]) is not None:
                self._weight_dq(node, float_weights)
                continue
            in_slots: list[int | None] = []
            for i, v in enumerate(node.inputs):
                if v is None or (not v.name and v.producer() is None and id(v) not in self._slot):
                    in_slots.append(None)
                    continue
                if id(v) not in self._slot:
                    arr = _tensor(v)
                    if arr is None:
                        raise UnsupportedModelError(
                            f"node '{node.name}' ({node.op_type}): input '{v.name}' is neither "
                            "computed before it nor a constant (graph not topologically sorted?)"
                        )
                    slot = self._new_slot(v)
                    if id(v) in trainable and id(v) in initializers | {id(v)}:
                        self._add_param(v.name or f"const{slot}", arr, slot)
                    else:
                        key = f"c{n_buffers}"
                        n_buffers += 1
                        self.register_buffer(key, _to_torch(arr), persistent=True)
                        self._consts.append((slot, "buffer", key))
                in_slots.append(self._slot[id(v)])
            out_slots = [self._new_slot(o) for o in node.outputs]
            if dom == _Q:
                fn: Any = self._q_fn(node)
                in_slots = in_slots[:1]  # scale / zero point come from the quantizer
            elif dom == _DQ:
                fn = self._act_dq_fn(node, q_by_zero)
                in_slots = in_slots[:1]
            else:
                op = lookup(dom[0], node.op_type, self.opset)
                assert not isinstance(op, str)
                fn = (op.fn, _attrs(node, op))
            self._steps.append((fn, in_slots, out_slots))
        self.output_slots = []
        for v in graph.outputs:
            if id(v) not in self._slot:  # an output that is a constant
                slot = self._new_slot(v)
                key = f"c{n_buffers}"
                n_buffers += 1
                self.register_buffer(key, _to_torch(_tensor(v)))
                self._consts.append((slot, "buffer", key))
            self.output_slots.append(self._slot[id(v)])
        self.output_names = [v.name or f"output{i}" for i, v in enumerate(graph.outputs)]
        self._link_biases(graph)
        log.info("executor: %d steps, %d parameters, %d quantizers", len(self._steps),
                 len(self.params), len(self.quantizers))

    # ------------------------------------------------------------------------------ building
    def _new_slot(self, v: ir.Value) -> int:
        self._slot[id(v)] = len(self._slot)
        return self._slot[id(v)]

    def _add_param(self, name: str, arr: np.ndarray, slot: int | None) -> str:
        key = _key(name)
        if key not in self.params:
            self.params[key] = nn.Parameter(torch.from_numpy(np.array(arr, np.float32)))
            self.param_names[name] = key
        if slot is not None:
            self._consts.append((slot, "param", key))
        return key

    @staticmethod
    def _trainable_constants(graph: ir.Graph) -> set[int]:
        out: set[int] = set()
        for node in graph:
            slots = WEIGHT_SLOTS.get(node.op_type) if _domain(node) == "" else None
            for i in slots or ():
                if i >= len(node.inputs) or node.inputs[i] is None:
                    continue
                arr = _tensor(node.inputs[i])
                if arr is not None and arr.dtype == np.float32 and arr.size > 1:
                    out.add(id(node.inputs[i]))
        return out

    def _add_activation_quantizer(self, node: ir.Node) -> str:
        x, s, z = node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        if z is None:
            raise UnsupportedModelError(f"node '{node.name}' (QuantizeLinear): no zero point input")
        scale, zero = _tensor(s), _tensor(z)
        if scale is None or zero is None:
            raise UnsupportedModelError(
                f"node '{node.name}' (QuantizeLinear): scale / zero point are not constants"
            )
        qmin, qmax = fq.grid_of(z.dtype.name)
        axis = node.attributes["axis"].value if "axis" in node.attributes and scale.ndim else None
        # onnxq names a QuantizeLinear after the tensor its encoding describes (its input may be
        # the tensor before an activation the grid made redundant, e.g. a Relu on a [0, ·] grid)
        qname = node.name or ""
        name = qname[: -len("_QuantizeLinear")] if qname.endswith("_QuantizeLinear") else \
            (x.name or qname)
        key = _key(name)
        if key in self.quantizers:
            key = _key(f"{name}#{len(self.quantizers)}")
        self._q_key[id(node)] = key
        self.quantizers[key] = Quantizer(name, scale, zero, qmin, qmax, axis, "activation")
        self.activation_quantizers[key] = {
            "q_node": node.name, "scale_init": s.name, "zero_init": z.name, "dq": []
        }
        return key

    @staticmethod
    def _fused(node: ir.Node) -> bool:
        """A QuantizeLinear whose every reader is a DequantizeLinear with the same scale and
        zero-point initializers runs as one fused fake-quantizer (its readers pass through)."""
        uses = list(node.outputs[0].uses())
        return bool(uses) and not node.outputs[0].is_graph_output() and all(
            (_domain(u.node), u.node.op_type) == _DQ and u.idx == 0
            and u.node.inputs[1] is node.inputs[1] and len(u.node.inputs) > 2
            and u.node.inputs[2] is node.inputs[2]
            and u.node.attributes.get("axis", None) == node.attributes.get("axis", None)
            for u in uses
        )

    def _q_fn(self, node: ir.Node) -> Any:
        key = self._q_key[id(node)]
        quantizer = self.quantizers[key]
        if self._fused(node):
            return quantizer  # x̂ = DQ(Q(x)) in one step; the DQ readers pass it on

        def q(x: torch.Tensor) -> torch.Tensor:
            return fq.quantize(x, quantizer.scale(), quantizer.zero_point(), quantizer.qmin,
                               quantizer.qmax, quantizer.axis)

        return q

    def _act_dq_fn(self, node: ir.Node, q_by_zero: Mapping[int, str]) -> Any:
        s, z = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        scale = _tensor(s)
        zero = _tensor(z) if z is not None else np.zeros((), np.int64)
        if scale is None or zero is None:
            raise UnsupportedModelError(
                f"node '{node.name}' (DequantizeLinear): scale / zero point are not constants"
            )
        axis = node.attributes["axis"].value if "axis" in node.attributes and scale.ndim else None
        key = q_by_zero.get(id(z)) if z is not None else None
        if key is None:  # a DQ of a graph input or of codes whose quantizer is unknown: fixed
            s_t = torch.from_numpy(scale.astype(np.float32))
            z_t = torch.from_numpy(zero.astype(np.float32))
            self.register_buffer(f"dq{len(self._steps)}_s", s_t)
            self.register_buffer(f"dq{len(self._steps)}_z", z_t)
            sk, zk = f"dq{len(self._steps)}_s", f"dq{len(self._steps)}_z"

            def dq_fixed(q: torch.Tensor) -> torch.Tensor:
                return fq.dequantize(q.float(), getattr(self, sk), getattr(self, zk), axis)

            return dq_fixed
        quantizer = self.quantizers[key]
        base = torch.from_numpy(np.asarray(scale, np.float32).copy())
        bkey = f"dq{len(self._steps)}_s"
        self.register_buffer(bkey, base)
        producer = node.inputs[0].producer()
        direct = producer is not None and (_domain(producer), producer.op_type) == _Q
        fused = direct and self._fused(producer)
        self.activation_quantizers[key]["dq"].append(
            {"node": node.name, "scale_init": s.name, "direct": direct, "base": bkey,
             "via": None if direct else (producer.op_type if producer is not None else None)}
        )

        def dq(q: torch.Tensor) -> torch.Tensor:
            if fused:
                return q  # already dequantized by the fused QuantizeLinear step
            return fq.dequantize(q, quantizer.scale(getattr(self, bkey)), quantizer.zero_point(),
                                 quantizer.axis)

        return dq

    def _weight_dq(self, node: ir.Node, float_weights: Mapping[str, np.ndarray]) -> None:
        """A DequantizeLinear of a constant: a float parameter behind a fake-quantizer."""
        codes_v, s_v = node.inputs[0], node.inputs[1]
        z_v = node.inputs[2] if len(node.inputs) > 2 else None
        codes = _tensor(codes_v)
        scale = _tensor(s_v)
        zero = _tensor(z_v) if z_v is not None else np.zeros_like(scale, dtype=np.int64)
        if scale is None or zero is None or codes is None:
            raise UnsupportedModelError(
                f"node '{node.name}' (DequantizeLinear): scale / zero point are not constants"
            )
        raw = codes_v.name or node.name
        name = raw.removesuffix("_quantized")
        axis = node.attributes["axis"].value if "axis" in node.attributes and scale.ndim else 1
        axis = axis if scale.ndim else None
        s32 = scale.astype(np.float32)
        deq = (codes.astype(np.float64) - fq.channel_shape(
            torch.from_numpy(zero.astype(np.float64)), codes.ndim, axis).numpy()) * \
            fq.channel_shape(torch.from_numpy(s32.astype(np.float64)), codes.ndim, axis).numpy()
        bits_type = codes_v.dtype.name if codes_v.dtype is not None else "INT8"
        qmin, qmax = fq.grid_of(bits_type)
        init = float_weights.get(name)
        if init is None or tuple(init.shape) != tuple(codes.shape):
            init = deq.astype(np.float32)
        else:
            # the stored codes were rounded in float64; where float32 rounding of the float
            # weight gives another code, start from the grid point so the forward pass is the
            # stored model's exactly
            again = fq.quantize(
                torch.from_numpy(init.astype(np.float32)), torch.from_numpy(s32),
                torch.from_numpy(zero.astype(np.float32)), qmin, qmax, axis,
            ).numpy()
            differ = again != codes.astype(np.float32)
            if differ.any():
                init = np.where(differ, deq, init).astype(np.float32)
        key = _key(name)
        if key not in self.quantizers:
            self._add_param(name, init, None)
            self.quantizers[key] = Quantizer(name, s32, zero, qmin, qmax, axis,
                                             "bias" if bits_type == "INT32" else "param")
            if bits_type == "INT32":
                self.bias_quantizers[key] = {"codes_init": codes_v.name, "scale_init": s_v.name,
                                             "zero_init": z_v.name if z_v else None,
                                             "link": None}
            else:
                self.weight_quantizers[key] = (name, codes_v.name or "", s_v.name or "",
                                               z_v.name if z_v is not None else "")
        pkey = self.param_names[name]
        quantizer = self.quantizers[key]
        slot = self._new_slot(node.outputs[0])

        if bits_type == "INT32":
            def bias_fn() -> torch.Tensor:
                link = self.bias_quantizers[key]["link"]
                if link is None:
                    return quantizer(self.params[pkey])
                s = self.bias_scale(key)
                return fq.dequantize(fq.quantize(self.params[pkey], s, quantizer.zero0,
                                                 quantizer.qmin, quantizer.qmax, 0 if s.ndim else None),
                                     s, quantizer.zero0, 0 if s.ndim else None)

            self._steps.append((bias_fn, [], [slot]))
        else:
            def weight_fn() -> torch.Tensor:
                return quantizer(self.params[pkey])

            self._steps.append((weight_fn, [], [slot]))

    def _link_biases(self, graph: ir.Graph) -> None:
        """Tie each int32 bias to ``s_x · s_w`` of its layer (what the exported model stores)."""
        dq_of: dict[str, tuple[str, str]] = {}  # DQ node name → (quantizer key, base buffer)
        for key, info in self.activation_quantizers.items():
            for dq in info["dq"]:
                dq_of[dq["node"]] = (key, dq["base"])
        for key, info in self.bias_quantizers.items():
            consumer = next(
                (n for n in graph if n.op_type in ("Conv", "Gemm", "ConvTranspose")
                 and len(n.inputs) > 2 and n.inputs[2] is not None
                 and n.inputs[2].producer() is not None
                 and n.inputs[2].producer().inputs[0].name == info["codes_init"]), None)
            if consumer is None:
                continue
            x_dq, w_dq = consumer.inputs[0].producer(), consumer.inputs[1].producer()
            if x_dq is None or w_dq is None or x_dq.name not in dq_of or \
                    w_dq.op_type != "DequantizeLinear":
                continue
            x_key, base_key = dq_of[x_dq.name]
            w_raw = w_dq.inputs[0].name or ""
            w_key = _key(w_raw.removesuffix("_quantized"))
            if w_key not in self.quantizers:
                continue
            stored = self.quantizers[key].scale0.double()
            product = (getattr(self, base_key) * self.quantizers[w_key].scale0).double()
            if product.numel() not in (1, stored.numel()) or not torch.allclose(
                    product.expand_as(stored) if product.numel() == 1 else product.reshape(stored.shape),
                    stored, rtol=1e-5, atol=0):
                log.debug("bias '%s': stored scale is not s_x·s_w; kept fixed", key)
                continue
            info["link"] = (x_key, w_key, base_key)

    def bias_scale(self, key: str) -> torch.Tensor:
        """``s_b = s_b₀ · (s_x / s_x₀) · (s_w / s_w₀)``: the stored ``s_x·s_w`` (rounded once,
        in float64, by the quantizer) followed through the learned changes of both scales."""
        quantizer = self.quantizers[key]
        link = self.bias_quantizers[key]["link"]
        if link is None:
            return quantizer.scale()
        x_key, w_key, _ = link
        qx, qw = self.quantizers[x_key], self.quantizers[w_key]
        if not (qx.log_scale.requires_grad or qw.log_scale.requires_grad or
                bool(qx.log_scale.detach().any()) or bool(qw.log_scale.detach().any())):
            return quantizer.scale0
        return quantizer.scale0 * torch.exp(qx.log_scale + qw.log_scale)

    # ------------------------------------------------------------------------------ running
    def parameter(self, name: str) -> nn.Parameter:
        """The parameter behind the ONNX tensor ``name``."""
        return self.params[self.param_names[name]]

    def named_onnx_parameters(self) -> dict[str, nn.Parameter]:
        return {name: self.params[key] for name, key in self.param_names.items()}

    def set_ranges_learnable(self, learn: bool) -> None:
        for q in self.quantizers.values():
            if isinstance(q, Quantizer) and q.kind != "bias":
                q.set_learnable(learn)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Inputs positionally (graph input order) or by name; returns the graph outputs."""
        feeds = list(args)
        if kwargs or (len(args) == 1 and isinstance(args[0], Mapping)):
            named = dict(args[0]) if args else {}
            named.update(kwargs)
            missing = [n for n in self.input_names if n not in named]
            if missing:
                raise ValueError(f"missing model input(s) {missing}; the model's inputs are "
                                 f"{self.input_names}")
            feeds = [named[n] for n in self.input_names]
        if len(feeds) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} input(s) {self.input_names}, "
                             f"got {len(feeds)}")
        env: list[Any] = [None] * len(self._slot)
        device = self._device()
        for i, x in enumerate(feeds):
            env[i] = (x if isinstance(x, torch.Tensor) else _to_torch(np.asarray(x))).to(device)
        for slot, kind, key in self._consts:
            env[slot] = self.params[key] if kind == "param" else getattr(self, key)
        for fn, ins, outs in self._steps:
            if isinstance(fn, tuple):
                result = fn[0](fn[1], *[env[i] if i is not None else None for i in ins])
            else:
                result = fn(*[env[i] for i in ins if i is not None])
            if isinstance(result, (tuple, list)):
                for o, r in zip(outs, result):
                    env[o] = r
            else:
                env[outs[0]] = result
        outputs = [env[s] for s in self.output_slots]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _device(self) -> torch.device:
        """Where the module's tensors are (inputs are moved there)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def run_numpy(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Evaluate without gradients; numpy in, list of numpy out (like onnxruntime's run)."""
        with torch.no_grad():
            out = self(dict(feeds)) if isinstance(feeds, Mapping) else self(*feeds)
        outs = out if isinstance(out, tuple) else (out,)
        return [o.detach().cpu().numpy() for o in outs]
