"""ONNX operators in torch, one small function per op, dispatched by ``(domain, op_type)``.

Each entry of :data:`OPS` is an :class:`OpDef`: the function ``fn(attrs, *inputs) -> outputs`` (a
tensor or a tuple; absent optional inputs are ``None``), the opset range it implements and an
optional ``check(attrs, node)`` that returns why a node's attributes are not supported. Attributes
are read once when the executor is built (``attrs`` is a plain dict), so an unsupported op or
attribute fails before any data is seen. The semantics follow the ONNX operator specification;
float ops compute in float32 as onnxruntime does, so results agree to float32 rounding.

Integer tensors produced by ``QuantizeLinear`` never reach these functions as integers: the
executor keeps quantized codes as float tensors holding integers (exact up to 2²⁴), which is what
lets gradients flow through data-movement ops (MaxPool, Reshape, integer Clip …) between a
QuantizeLinear and its DequantizeLinear.
"""

from __future__ import annotations

__all__ = ["OPS", "TORCH_DTYPES", "OpDef", "lookup", "register"]

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Attrs = dict[str, Any]
OpFn = Callable[..., Any]

#: ONNX TensorProto data type number → torch dtype
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
    7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}


@dataclasses.dataclass(frozen=True)
class OpDef:
    fn: OpFn
    since: int = 1
    until: int | None = None  # last opset this implementation covers (None: up to the newest)
    check: Callable[[Attrs, Any], str | None] | None = None
    defaults: tuple[tuple[str, Any], ...] = ()


OPS: dict[tuple[str, str], list[OpDef]] = {}


def register(
    op_type: str, domain: str = "", since: int = 1, until: int | None = None,
    check: Callable[[Attrs, Any], str | None] | None = None, **defaults: Any,
) -> Callable[[OpFn], OpFn]:
    """Register ``fn`` for ``(domain, op_type)`` at opsets ``since..until`` with attribute defaults."""

    def wrap(fn: OpFn) -> OpFn:
        OPS.setdefault((domain, op_type), []).append(
            OpDef(fn, since, until, check, tuple(defaults.items()))
        )
        return fn

    return wrap


def lookup(domain: str, op_type: str, opset: int) -> OpDef | str:
    """The implementation of ``op_type`` at ``opset``, or why there is none."""
    domain = "" if domain == "ai.onnx" else domain
    defs = OPS.get((domain, op_type))
    if not defs:
        return "no torch implementation"
    for d in defs:
        if d.since <= opset and (d.until is None or opset <= d.until):
            return d
    spans = ", ".join(f"{d.since}..{d.until or 'latest'}" for d in defs)
    return f"implemented for opsets {spans} only"


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


# ---------------------------------------------------------------------------------------------
# element-wise
# ---------------------------------------------------------------------------------------------


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    def op(attrs: Attrs, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return fn(a, b)

    return op


for _name, _fn in (
    ("Add", torch.add), ("Sub", torch.sub), ("Mul", torch.mul), ("Pow", torch.pow),
    ("Equal", torch.eq), ("Less", torch.lt), ("Greater", torch.gt), ("LessOrEqual", torch.le),
    ("GreaterOrEqual", torch.ge), ("And", torch.logical_and), ("Or", torch.logical_or),
    ("Xor", torch.logical_xor),
):
    register(_name, since=7)(_binary(_fn))


@register("Div", since=7)
def div(attrs: Attrs, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # integer division truncates
    return a / b


@register("Max", since=6)
def max_(attrs: Attrs, *xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.maximum(out, x)
    return out


@register("Min", since=6)
def min_(attrs: Attrs, *xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.minimum(out, x)
    return out


@register("Sum", since=6)
def sum_(attrs: Attrs, *xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    def op(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
        return fn(x)

    return op


for _name, _fn in (
    ("Relu", torch.relu), ("Sigmoid", torch.sigmoid), ("Tanh", torch.tanh), ("Exp", torch.exp),
    ("Log", torch.log), ("Sqrt", torch.sqrt), ("Erf", torch.erf), ("Neg", torch.neg),
    ("Abs", torch.abs), ("Reciprocal", torch.reciprocal), ("Not", torch.logical_not),
    ("Floor", torch.floor), ("Ceil", torch.ceil), ("Sin", torch.sin), ("Cos", torch.cos),
    ("Softplus", F.softplus), ("Identity", lambda x: x),
):
    register(_name, since=1)(_unary(_fn))


@register("Round", since=11)
def round_(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)


@register("Dropout", since=1)
def dropout(attrs: Attrs, x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
    return x  # inference semantics: training_mode inputs are not honoured (QAT keeps the graph's)


@register("LeakyRelu", since=6, alpha=0.01)
def leaky_relu(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, attrs["alpha"])


@register("PRelu", since=7)
def prelu(attrs: Attrs, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, x * slope)


@register("Elu", since=6, alpha=1.0)
def elu(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return F.elu(x, attrs["alpha"])


@register("HardSigmoid", since=6, alpha=0.2, beta=0.5)
def hard_sigmoid(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x * attrs["alpha"] + attrs["beta"], 0.0, 1.0)


@register("HardSwish", since=14)
def hard_swish(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@register("Clip", since=1, until=10, min=-math.inf, max=math.inf)
def clip_v1(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, attrs["min"], attrs["max"])


@register("Clip", since=11)
def clip(attrs: Attrs, x: torch.Tensor, lo: torch.Tensor | None = None,
         hi: torch.Tensor | None = None) -> torch.Tensor:
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))
    return x


@register("Where", since=9)
def where(attrs: Attrs, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(c.to(torch.bool), a, b)


@register("Cast", since=6)
def cast(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return x.to(TORCH_DTYPES[attrs["to"]])


def _check_cast(attrs: Attrs, node: Any) -> str | None:
    return None if attrs.get("to") in TORCH_DTYPES else f"Cast to data type {attrs.get('to')}"


OPS[("", "Cast")][-1] = dataclasses.replace(OPS[("", "Cast")][-1], check=_check_cast)


# ---------------------------------------------------------------------------------------------
# normalization, softmax, reductions
# ---------------------------------------------------------------------------------------------


@register("BatchNormalization", since=9, epsilon=1e-5, training_mode=0)
def batch_norm(attrs: Attrs, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
               mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Inference form: ``y = (x − μ) / √(σ² + ε) · γ + β`` with the running statistics."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    inv = torch.rsqrt(var + attrs["epsilon"]) * gamma
    return (x - mean.reshape(shape)) * inv.reshape(shape) + beta.reshape(shape)


def _check_bn(attrs: Attrs, node: Any) -> str | None:
    if attrs.get("training_mode", 0) or len(node.outputs) > 1:
        return "BatchNormalization in training mode (several outputs)"
    return None


OPS[("", "BatchNormalization")][-1] = dataclasses.replace(
    OPS[("", "BatchNormalization")][-1], check=_check_bn
)


@register("LayerNormalization", since=17, axis=-1, epsilon=1e-5, stash_type=1)
def layer_norm(attrs: Attrs, x: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    axis = _axis(attrs["axis"], x.ndim)
    return F.layer_norm(x, x.shape[axis:], scale, bias, attrs["epsilon"])


def _softmax_like(fn: Callable[..., torch.Tensor]) -> Callable[[int], OpFn]:
    def make(since: int) -> OpFn:
        def op(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
            axis = _axis(attrs["axis"], x.ndim)
            if since >= 13 or axis == x.ndim - 1:
                return fn(x, dim=axis)
            # opset < 13: the input is coerced to 2-D [prod(d<axis), prod(d>=axis)]
            flat = x.reshape(int(math.prod(x.shape[:axis])), -1)
            return fn(flat, dim=1).reshape(x.shape)

        return op

    return make


for _name, _fn in (("Softmax", torch.softmax), ("LogSoftmax", torch.log_softmax)):
    register(_name, since=1, until=12, axis=1)(_softmax_like(_fn)(1))
    register(_name, since=13, axis=-1)(_softmax_like(_fn)(13))


def _reduce(fn: Callable[..., torch.Tensor], axes_input_since: int) -> Callable[[int, int | None], None]:
    def make(since: int, until: int | None) -> None:
        def op(attrs: Attrs, x: torch.Tensor, axes_t: torch.Tensor | None = None) -> torch.Tensor:
            axes = attrs.get("axes") if since < axes_input_since else _ints(axes_t)
            keep = bool(attrs["keepdims"])
            if not axes:
                if attrs.get("noop_with_empty_axes", 0):
                    return x
                axes = list(range(x.ndim))
            return fn(x, dim=[_axis(a, x.ndim) for a in axes], keepdim=keep)

        return op

    return make


for _name, _fn, _since_input in (
    ("ReduceMean", torch.mean, 18), ("ReduceSum", torch.sum, 13),
    ("ReduceMax", torch.amax, 18), ("ReduceMin", torch.amin, 18),
):
    _make = _reduce(_fn, _since_input)
    register(_name, since=1, until=_since_input - 1, keepdims=1)(_make(1, _since_input - 1))
    register(_name, since=_since_input, keepdims=1, noop_with_empty_axes=0)(
        _make(_since_input, None)
    )


# ---------------------------------------------------------------------------------------------
# linear algebra and convolutions
# ---------------------------------------------------------------------------------------------


@register("MatMul", since=1)
def matmul(attrs: Attrs, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


@register("Gemm", since=7, alpha=1.0, beta=1.0, transA=0, transB=0)
def gemm(attrs: Attrs, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``Y = α · A' · B' + β · C``."""
    a = a.t() if attrs["transA"] else a
    b = b.t() if attrs["transB"] else b
    y = a @ b
    if attrs["alpha"] != 1.0:
        y = y * attrs["alpha"]
    if c is not None:
        y = y + (c * attrs["beta"] if attrs["beta"] != 1.0 else c)
    return y


def _conv_pads(attrs: Attrs, x: torch.Tensor, kernel: Sequence[int], transpose: bool = False) -> tuple[list[int], list[int]]:
    """(begin pads, end pads) per spatial axis, resolving ``auto_pad``."""
    n = len(kernel)
    strides = attrs.get("strides") or [1] * n
    dil = attrs.get("dilations") or [1] * n
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER") and not transpose:
        begin, end = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * n, [0] * n
    pads = attrs.get("pads") or [0] * (2 * n)
    return list(pads[:n]), list(pads[n:])


def _check_auto_pad(attrs: Attrs, node: Any) -> str | None:
    auto = attrs.get("auto_pad", "NOTSET")
    if node.op_type == "ConvTranspose" and auto not in ("NOTSET", "VALID"):
        return f"ConvTranspose with auto_pad={auto}"
    return None


def _pad_if_asymmetric(x: torch.Tensor, begin: list[int], end: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    if begin == end:
        return x, begin
    pad: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        pad += [b, e]
    return F.pad(x, pad, value=value), [0] * len(begin)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register("Conv", since=1, group=1, auto_pad="NOTSET", check=_check_auto_pad)
def conv(attrs: Attrs, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    n = w.ndim - 2
    begin, end = _conv_pads(attrs, x, w.shape[2:])
    x, pads = _pad_if_asymmetric(x, begin, end)
    return _CONV[n](x, w, b, attrs.get("strides") or 1, pads, attrs.get("dilations") or 1,
                    attrs["group"])


@register("ConvTranspose", since=1, group=1, auto_pad="NOTSET", check=_check_auto_pad)
def conv_transpose(attrs: Attrs, x: torch.Tensor, w: torch.Tensor,
                   b: torch.Tensor | None = None) -> torch.Tensor:
    n = w.ndim - 2
    if attrs.get("output_shape"):
        raise NotImplementedError("ConvTranspose with output_shape")
    begin, end = _conv_pads(attrs, x, w.shape[2:], transpose=True)
    out_pad = list(attrs.get("output_padding") or [0] * n)
    y = _CONV_T[n](x, w, b, attrs.get("strides") or 1, 0, out_pad, attrs["group"],
                   attrs.get("dilations") or 1)
    if any(begin) or any(end):  # crop: pads remove rows/columns from the full output
        idx = [slice(None), slice(None)] + [
            slice(bb, y.shape[2 + i] - ee) for i, (bb, ee) in enumerate(zip(begin, end))
        ]
        y = y[tuple(idx)]
    return y


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------


@register("GlobalAveragePool", since=1)
def global_average_pool(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


@register("GlobalMaxPool", since=1)
def global_max_pool(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)


def _check_pool(attrs: Attrs, node: Any) -> str | None:
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        return "MaxPool with an Indices output"
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return f"auto_pad={attrs.get('auto_pad')}"
    return None


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register("MaxPool", since=1, ceil_mode=0, auto_pad="NOTSET", check=_check_pool)
def max_pool(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    k = attrs["kernel_shape"]
    begin, end = _conv_pads(attrs, x, k)
    x, pads = _pad_if_asymmetric(x, begin, end, value=-math.inf)
    return _MAX_POOL[len(k)](x, k, attrs.get("strides") or 1, pads, attrs.get("dilations") or 1, bool(attrs["ceil_mode"]))


@register("AveragePool", since=1, ceil_mode=0, count_include_pad=0, auto_pad="NOTSET",
          check=_check_pool)
def average_pool(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    k = attrs["kernel_shape"]
    begin, end = _conv_pads(attrs, x, k)
    if begin != end:
        raise NotImplementedError("AveragePool with asymmetric pads")
    return _AVG_POOL[len(k)](x, k, attrs.get("strides") or 1, begin, bool(attrs["ceil_mode"]),
                             bool(attrs["count_include_pad"]))


# ---------------------------------------------------------------------------------------------
# shapes and data movement
# ---------------------------------------------------------------------------------------------


@register("Shape", since=1, start=0)
def shape(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    dims = list(x.shape)[attrs["start"]:attrs.get("end")]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@register("Size", since=1)
def size(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register("Reshape", since=5, allowzero=0)
def reshape(attrs: Attrs, x: torch.Tensor, shape_t: torch.Tensor) -> torch.Tensor:
    dims = _ints(shape_t) or []
    if not attrs["allowzero"]:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@register("Flatten", since=1, axis=1)
def flatten(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    axis = _axis(attrs["axis"], x.ndim)
    return x.reshape(int(math.prod(x.shape[:axis])), -1)


@register("Transpose", since=1)
def transpose(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    perm = attrs.get("perm") or list(reversed(range(x.ndim)))
    return x.permute(perm)


@register("Squeeze", since=1, until=12)
def squeeze_v1(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return _squeeze(x, attrs.get("axes"))


@register("Squeeze", since=13)
def squeeze(attrs: Attrs, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    return _squeeze(x, _ints(axes))


def _squeeze(x: torch.Tensor, axes: list[int] | None) -> torch.Tensor:
    if not axes:
        return x.squeeze()
    keep = [d for i, d in enumerate(x.shape) if i not in {_axis(a, x.ndim) for a in axes}]
    return x.reshape(keep)


@register("Unsqueeze", since=1, until=12)
def unsqueeze_v1(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return _unsqueeze(x, attrs["axes"])


@register("Unsqueeze", since=13)
def unsqueeze(attrs: Attrs, x: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    return _unsqueeze(x, _ints(axes) or [])


def _unsqueeze(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    rank = x.ndim + len(axes)
    dims = list(x.shape)
    for a in sorted(_axis(a, rank) for a in axes):
        dims.insert(a, 1)
    return x.reshape(dims)


@register("Concat", since=4)
def concat(attrs: Attrs, *xs: torch.Tensor) -> torch.Tensor:
    parts = [x for x in xs if x is not None and x.numel() > 0] or [xs[0]]
    if len({p.dtype for p in parts}) > 1:  # float codes next to integers cannot happen in ONNX
        parts = [p.to(parts[0].dtype) for p in parts]
    return torch.cat(parts, dim=_axis(attrs["axis"], parts[0].ndim))


@register("Split", since=13, axis=0)
def split(attrs: Attrs, x: torch.Tensor, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    axis = _axis(attrs["axis"], x.ndim)
    if sizes is None:
        n = attrs["_n_outputs"]
        return tuple(torch.tensor_split(x, n, dim=axis)) if x.shape[axis] % n == 0 else \
            tuple(torch.split(x, -(-x.shape[axis] // n), dim=axis))
    return tuple(torch.split(x, _ints(sizes) or [], dim=axis))


@register("Slice", since=1, until=9)
def slice_v1(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return _slice(x, attrs["starts"], attrs["ends"], attrs.get("axes"), None)


@register("Slice", since=10)
def slice_(attrs: Attrs, x: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
           axes: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
    return _slice(x, _ints(starts) or [], _ints(ends) or [], _ints(axes), _ints(steps))


def _slice(x: torch.Tensor, starts: list[int], ends: list[int], axes: list[int] | None,
           steps: list[int] | None) -> torch.Tensor:
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.ndim)
        dim = x.shape[a]
        if st > 0:
            s = min(max(s + dim if s < 0 else s, 0), dim)
            e = min(max(e + dim if e < 0 else e, 0), dim)
            x = x.narrow(a, s, max(e - s, 0))[(slice(None),) * a + (slice(None, None, st),)] \
                if st != 1 else x.narrow(a, s, max(e - s, 0))
        else:  # negative step: flip, then slice forwards
            s = min(max(s + dim if s < 0 else s, -1), dim - 1)
            e = min(max(e + dim if e < 0 else e, -1), dim - 1)
            idx = torch.arange(s, e, st, dtype=torch.int64, device=x.device)
            x = x.index_select(a, idx)
    return x


@register("Gather", since=1, axis=0)
def gather(attrs: Attrs, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    axis = _axis(attrs["axis"], x.ndim)
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


@register("GatherND", since=11, batch_dims=0)
def gather_nd(attrs: Attrs, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if attrs["batch_dims"]:
        raise NotImplementedError("GatherND with batch_dims")
    idx = idx.to(torch.int64)
    k = idx.shape[-1]
    dims = torch.tensor(x.shape[:k], dtype=torch.int64, device=x.device)
    idx = torch.where(idx < 0, idx + dims, idx)
    flat = idx.reshape(-1, k)
    out = x[tuple(flat[:, i] for i in range(k))]
    return out.reshape(list(idx.shape[:-1]) + list(x.shape[k:]))


def _check_gather_nd(attrs: Attrs, node: Any) -> str | None:
    return "GatherND with batch_dims > 0" if attrs.get("batch_dims") else None


OPS[("", "GatherND")][-1] = dataclasses.replace(OPS[("", "GatherND")][-1], check=_check_gather_nd)


@register("Expand", since=8)
def expand(attrs: Attrs, x: torch.Tensor, shape_t: torch.Tensor) -> torch.Tensor:
    dims = _ints(shape_t) or []
    target = torch.broadcast_shapes(tuple(x.shape), tuple(dims))
    return x.expand(target)


@register("Tile", since=6)
def tile(attrs: Attrs, x: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
    return x.repeat(_ints(repeats) or [])


@register("Range", since=11)
def range_(attrs: Attrs, start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@register("ConstantOfShape", since=9)
def constant_of_shape(attrs: Attrs, shape_t: torch.Tensor) -> torch.Tensor:
    value = attrs.get("value")
    fill = value.reshape(-1)[0] if value is not None else torch.tensor(0.0)
    return torch.full(_ints(shape_t) or [], fill.item(), dtype=fill.dtype, device=shape_t.device)


def _check_pad(attrs: Attrs, node: Any) -> str | None:
    mode = attrs.get("mode", "constant")
    return None if mode in ("constant", "reflect", "edge") else f"Pad mode '{mode}'"


@register("Pad", since=1, until=10, mode="constant", value=0.0, check=_check_pad)
def pad_v1(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return _pad(x, attrs["pads"], attrs["mode"], attrs["value"], None)


@register("Pad", since=11, mode="constant", check=_check_pad)
def pad(attrs: Attrs, x: torch.Tensor, pads: torch.Tensor, value: torch.Tensor | None = None,
        axes: torch.Tensor | None = None) -> torch.Tensor:
    v = float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0
    return _pad(x, _ints(pads) or [], attrs["mode"], v, _ints(axes))


def _pad(x: torch.Tensor, pads: list[int], mode: str, value: float, axes: list[int] | None) -> torch.Tensor:
    axes = [_axis(a, x.ndim) for a in axes] if axes is not None else list(range(x.ndim))
    n = len(axes)
    begin = dict(zip(axes, pads[:n]))
    end = dict(zip(axes, pads[n:]))
    torch_pads: list[int] = []
    for a in reversed(range(x.ndim)):
        torch_pads += [begin.get(a, 0), end.get(a, 0)]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _check_resize(attrs: Attrs, node: Any) -> str | None:
    mode = attrs.get("mode", "nearest")
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
    if mode == "nearest":
        if ctm != "asymmetric" or attrs.get("nearest_mode", "round_prefer_floor") != "floor":
            return f"Resize nearest with {ctm}/{attrs.get('nearest_mode', 'round_prefer_floor')}"
        return None
    if mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return None
    return f"Resize mode '{mode}' with coordinate_transformation_mode '{ctm}'"


@register("Resize", since=11, mode="nearest", check=_check_resize)
def resize(attrs: Attrs, x: torch.Tensor, roi: torch.Tensor | None = None,
           scales: torch.Tensor | None = None, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest (asymmetric, floor) = torch's ``nearest``; linear half-pixel / align-corners =
    torch's ``bilinear`` (``align_corners`` False / True). Batch and channel are not resized."""
    if sizes is not None and sizes.numel():
        out = _ints(sizes)[2:]  # type: ignore[index]
        kwargs: dict[str, Any] = {"size": out}
    else:
        sc = [float(v) for v in scales.reshape(-1).tolist()]  # type: ignore[union-attr]
        out = [math.floor(d * s) for d, s in zip(x.shape[2:], sc[2:])]
        kwargs = {"size": out}
        if all(abs(o / d - s) < 1e-6 for o, d, s in zip(out, x.shape[2:], sc[2:])):
            kwargs = {"scale_factor": sc[2:]}
    if attrs["mode"] == "nearest":
        return F.interpolate(x, mode="nearest", **kwargs)
    align = attrs.get("coordinate_transformation_mode") == "align_corners"
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
    return F.interpolate(x, mode=mode, align_corners=align, **kwargs)
