"""Bias correction: remove the mean shift that weight quantization puts on each layer's output.

Quantizing a weight ``W → W_q`` shifts the expected output of channel ``o`` by
``E[y_q − y]_o = Σ_{c,k} (W_q − W)[o, c, k] · E[x_c]`` (Nagel et al. 2019, "Data-Free
Quantization"). The correction subtracts it from the bias, ``b ← b − E[y_q − y]``.

* **empirical**: layer by layer in topological order, ``E[y_q − y]`` is measured on calibration
  data, averaged over batch and spatial positions: ``y_q`` from the QDQ model whose earlier layers
  are already corrected (activations quantized as configured), ``y`` from the float model.
* **analytic** (data-free): ``E[x_c]`` from the BatchNorm statistics BN folding kept on the layer
  that produces ``x`` (``node.meta["onnxq.bn_stats"]``: its pre-activation output channel ``c`` is
  taken as ``N(β_c, γ_c²)``), through the ops between that layer and ``x`` (its activation,
  CLE's per-channel ``Min(·, 6/s)``, a zero Pad) as a clipped Gaussian:
  ``E[clip(z, a, b)] = a·Φ(α) + b·(1 − Φ(β')) + μ·(Φ(β') − Φ(α)) + σ·(φ(α) − φ(β'))`` with
  ``α = (a − μ)/σ``, ``β' = (b − μ)/σ`` (Relu: ``a = 0, b = ∞``; Relu6: ``[0, 6]``; after CLE
  ``[0, 6/s_c]`` per channel; none: ``E = μ``). Layers without such statistics are left alone
  (logged).
* **measured**: the analytic formula with ``E[x_c]`` measured on the calibration data: one pass of
  the float model that averages every layer input over batch and spatial positions (no
  layer-by-layer QDQ runs). It covers every layer, whatever op computes its input, and uses the
  statistics of the data the model will see rather than those of the training set that BatchNorm
  recorded (PP-OCR rec: rendered text lines; its BN statistics describe neither).
* **hybrid**: analytic where statistics exist, empirical elsewhere (needs data).
"""

from __future__ import annotations

__all__ = ["BiasCorrectionConfig", "bias_correction", "clipped_normal_mean"]

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from scipy import special

from onnxq.algorithms._capture import _exposed, materialize
from onnxq.algorithms._driver import _widen_int4
from onnxq.algorithms._layers import Layer, _channel_vector, find_layers, quantized_layer_map
from onnxq.errors import ConfigError
from onnxq.passes._graph import BN_STATS_KEY, attr, clip_bounds, constant, is_op, set_constant
from onnxq.runtime.session import create_session

log = logging.getLogger(__name__)

MODES = ("empirical", "analytic", "measured", "hybrid")


@dataclasses.dataclass(frozen=True)
class BiasCorrectionConfig:
    mode: str = "empirical"
    max_samples: int | None = None
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"bias correction mode '{self.mode}' is not one of {', '.join(MODES)}")


def clipped_normal_mean(mu: np.ndarray, sigma: np.ndarray, lo: Any, hi: Any) -> np.ndarray:
    """E[clip(z, lo, hi)] for z ~ N(mu, sigma²); ``lo`` / ``hi`` scalars or per-channel arrays
    (None or ∓∞: unbounded on that side)."""
    mu = np.asarray(mu, np.float64)
    sigma = np.maximum(np.asarray(sigma, np.float64), 1e-12)
    a = np.broadcast_to(np.asarray(-np.inf if lo is None else lo, np.float64), mu.shape)
    b = np.broadcast_to(np.asarray(np.inf if hi is None else hi, np.float64), mu.shape)
    alpha = (a - mu) / sigma
    beta = (b - mu) / sigma
    cdf_a, cdf_b = special.ndtr(alpha), special.ndtr(beta)
    pdf = lambda t: np.where(np.isfinite(t), np.exp(-0.5 * np.square(np.where(np.isfinite(t), t, 0))) / np.sqrt(2 * np.pi), 0.0)  # noqa: E731
    mean = mu * (cdf_b - cdf_a) + sigma * (pdf(alpha) - pdf(beta))
    mean = mean + np.where(np.isfinite(a), np.where(np.isfinite(a), a, 0) * cdf_a, 0.0)
    mean = mean + np.where(np.isfinite(b), np.where(np.isfinite(b), b, 0) * (1 - cdf_b), 0.0)
    return mean


def _zero_pad(node: ir.Node) -> bool:
    mode = attr(node, "mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode != "constant":
        return False
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is None:
        return float(attr(node, "value", 0.0)) == 0.0
    c = constant(value)
    return c is not None and c.size == 1 and float(c.reshape(())) == 0.0


def _input_mean(layer: Layer, layers_by_output: dict[int, Layer]) -> np.ndarray | str:
    """E[x] per input channel from the BN statistics of the layers that compute ``x``, or why not.

    Walking back from ``x``: Relu, Clip, Min / Max with a scalar or per-channel constant (CLE
    turns ReLU6 into ``Relu → Min(·, 6/s)``), Identity and a zero-constant Pad (its zeros at the
    border are left out) clip the Gaussian pre-activation ``N(β_c, γ_c²)`` of the producing
    layer to ``[lo_c, hi_c]``; a residual ``Add`` adds the means of its two inputs (each traced
    the same way); global average pooling, ReduceMean over the spatial axes and
    Reshape / Flatten / Squeeze to ``(N, C)`` keep the per-channel mean.
    """
    channel_last = layer.op_type not in ("Conv", "ConvTranspose")
    return _value_mean(layer.input, layer.weight_layer.in_channels, channel_last, layers_by_output, 0)


_POOLS = ("GlobalAveragePool", "ReduceMean", "Reshape", "Flatten", "Squeeze")


def _value_mean(v: ir.Value | None, channels: int, channel_last: bool,
                layers_by_output: dict[int, Layer], depth: int) -> np.ndarray | str:
    lo = np.full(channels, -np.inf)
    hi = np.full(channels, np.inf)
    for _ in range(32):
        if v is None:
            return "its input has no producer"
        if id(v) in layers_by_output:
            break
        node = v.producer()
        if node is None:
            return "its input is not computed from layers with folded BatchNorm"
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        bounded = bool(np.isfinite(lo).any() or np.isfinite(hi).any())
        if op == "Relu":
            lo = np.maximum(lo, 0.0)
        elif op == "Clip":
            bounds = clip_bounds(node)
            if isinstance(bounds, str):
                return f"Clip '{node.name}': {bounds}"
            if bounds[0] is not None:
                lo = np.maximum(lo, bounds[0])
            if bounds[1] is not None:
                hi = np.minimum(hi, bounds[1])
        elif op in ("Min", "Max") and len(node.inputs) == 2:
            consts = [constant(i) for i in node.inputs]
            k = 0 if consts[1] is not None else 1 if consts[0] is not None else None
            if k is None:
                return f"'{node.name}' ({op}) has no constant operand"
            vec = _channel_vector(consts[1 - k], channels, channel_last)
            if vec is None:
                return f"'{node.name}' ({op}): the constant is not per channel"
            if op == "Min":
                hi = np.minimum(hi, vec)
            else:
                lo = np.maximum(lo, vec)
            v = node.inputs[k]
            continue
        elif op == "Pad":
            if not _zero_pad(node):
                return f"Pad '{node.name}' does not pad with zeros"
        elif op == "Add" and len(node.inputs) == 2 and depth < 8:
            if bounded:
                return f"a clip after the Add '{node.name}'"
            parts = [_value_mean(i, channels, channel_last, layers_by_output, depth + 1) for i in node.inputs]
            for part in parts:
                if isinstance(part, str):
                    return f"Add '{node.name}': {part}"
            return parts[0] + parts[1]
        elif op in _POOLS:
            if bounded:
                return f"a clip after '{op}' '{node.name}'"
            channel_last = False
        elif op not in ("Identity", "Dropout"):
            return f"'{op}' between the producing layer and the layer is not an activation"
        v = node.inputs[0]
    else:
        return "no layer within 32 ops before the input"
    producer_layer = layers_by_output[id(v)]
    stats = producer_layer.node.meta.get(BN_STATS_KEY)
    if stats is None:
        return f"'{producer_layer.name}' has no BatchNorm statistics (run fold-bn first)"
    if np.any(lo > hi):
        return "empty clip interval"
    gamma = np.abs(np.asarray(stats["gamma"], np.float64))
    beta = np.asarray(stats["beta"], np.float64)
    if beta.shape != (channels,):
        return f"BatchNorm statistics of '{producer_layer.name}' have {beta.size} channels, not {channels}"
    return clipped_normal_mean(beta, gamma, lo, hi)


def _quantized_weight(layer: Layer, enc: Any) -> np.ndarray:
    """The canonical weight after quantization with ``enc`` (nearest rounding unless frozen
    values already are on the grid)."""
    wc = layer.weight_layer.canonical().astype(np.float64)
    scale = np.asarray(enc.scale, np.float64)
    zero = np.asarray(enc.zero_point, np.float64)
    shape = (-1,) + (1,) * (wc.ndim - 1)
    if scale.size > 1:
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    g = enc.grid()
    return (np.clip(np.rint(wc / scale) + zero, g.qmin, g.qmax) - zero) * scale


def _write_bias(work_node: ir.Node, layer: Layer, b: np.ndarray, qdq_graph: ir.Graph) -> bool:
    """Set the layer's bias in the QDQ working model (int32 DQ or float constant)."""
    wl_bias_index = layer.weight_layer.bias_index
    if layer.op_type == "MatMul":
        add = work_node.outputs[0].consumers()
        target = next((n for n in add if is_op(n, "Add")), None)
        if target is None:
            return False
        other = next((v for v in target.inputs if v is not work_node.outputs[0]), None)
        holder = other
    else:
        if len(work_node.inputs) <= 2 or work_node.inputs[2] is None:
            return False
        holder = work_node.inputs[wl_bias_index or 2]
    dq = holder.producer() if holder is not None else None
    if is_op(dq, "DequantizeLinear"):
        scale = constant(dq.inputs[1]).astype(np.float64)
        zero = constant(dq.inputs[2]).astype(np.float64) if len(dq.inputs) > 2 and dq.inputs[2] is not None else 0.0
        old = dq.inputs[0].const_value
        kind = old.dtype.numpy()
        info = np.iinfo(kind)
        codes = np.clip(np.rint(b.reshape(old.shape) / np.broadcast_to(scale, old.shape)) + zero, info.min, info.max)
        dq.inputs[0].const_value = ir.Tensor(codes.astype(kind), name=dq.inputs[0].name)
        return True
    if holder is not None and constant(holder) is not None:
        old = constant(holder)
        set_constant(holder, b.reshape(old.shape).astype(old.dtype))
        return True
    return False


def bias_correction(
    sim: Any,
    data: Any = None,
    config: BiasCorrectionConfig | None = None,
    progress: Callable[[str, int, int], Any] | None = None,
    **overrides: Any,
) -> Any:
    """Correct the biases of ``sim``'s quantized layers; returns a new QuantSim.

    The float model's biases change (so the exported float model + encodings agree with the QDQ
    model); weight encodings stay as they are; activation encodings are kept (analytic) or
    recalibrated on ``data``.
    """
    from onnxq.quant.sim import rebuild

    cfg = dataclasses.replace(config or BiasCorrectionConfig(), **overrides)
    if cfg.mode in ("empirical", "measured", "hybrid") and data is None:
        raise ConfigError(f"bias correction mode '{cfg.mode}' needs calibration data")
    t0 = time.perf_counter()
    float_model = sim.float_model.clone()
    encs = {e.name: e for e in sim.encodings if e.kind == "param"}
    wanted = {s.node.name or "" for s in sim.plan.weights}
    if cfg.layers is not None:
        wanted &= set(cfg.layers)
    wanted -= set(cfg.exclude)
    layers, skipped = find_layers(float_model, wanted)
    for name, reason in skipped:
        log.info("bias-correction: layer '%s' skipped: %s", name, reason)
    usable = []
    for layer in layers:
        problem = layer.weight_layer.bias_problem()
        if problem is None and layer.weight_layer.bias_value is None:
            problem = "it has no bias input (add one with the float passes first)"
        if problem is None and layer.weight_layer.weight.name not in encs:
            problem = "its weight has no encoding"
        if problem:
            log.info("bias-correction: layer '%s' skipped: %s", layer.name, problem)
        else:
            usable.append(layer)

    by_output = {id(layer.output): layer for layer in layers}
    reference = {layer.name: layer for layer in find_layers(sim.fp32_model, wanted)[0]}
    analytic: dict[str, np.ndarray] = {}
    measured: dict[str, np.ndarray] = {}
    if cfg.mode == "measured":
        batches = materialize(data, float_model, cfg.max_samples)
        measured = _measured_input_means(float_model, usable, batches)
    if cfg.mode in ("analytic", "measured", "hybrid"):
        if any(e.frozen for e in encs.values()):
            log.warning(
                "bias-correction (%s): some weights were optimized by AdaRound/SeqMSE against the "
                "real quantized inputs; the analytic correction assumes plain rounding and undoes "
                "part of that (EfficientNet-Lite0 W4A8 AdaRound: top-1 0.873 -> 0.811). Prefer "
                "mode='empirical' after them.", cfg.mode)
        for layer in usable:
            ex = measured[layer.name] if cfg.mode == "measured" else _input_mean(layer, by_output)
            if isinstance(ex, str):
                log.info("bias-correction: no analytic E[x] for '%s': %s", layer.name, ex)
                continue
            if ex.shape[0] != layer.weight_layer.in_channels:
                continue
            ref = reference.get(layer.name, layer)  # W before any earlier algorithm
            wq = _quantized_weight(layer, encs[layer.weight_layer.weight.name])
            delta = layer.weight_layer.input_dot(wq - ref.weight_layer.canonical(), ex)
            analytic[layer.name] = delta

    corrected = 0
    if cfg.mode in ("analytic", "measured"):
        for layer in usable:
            if layer.name in analytic:
                layer.weight_layer.set_bias(float_model.graph, layer.weight_layer.bias() - analytic[layer.name])
                corrected += 1
        log.info("bias-correction (%s): %d of %d layers in %.1f s", cfg.mode, corrected, len(usable),
                 time.perf_counter() - t0)
        given = {e.name: e for e in sim.encodings if not e.name.endswith("_bias") and e.bits != 32}
        return rebuild(sim, float_model, given, None)

    batches = materialize(data, float_model, cfg.max_samples)
    # float means of every layer output: one pass
    names = list(dict.fromkeys(layer.output.name for layer in usable))
    session = create_session(_exposed(sim.fp32_model, names), optimize=True)
    sums = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    for feeds in batches:
        for name, y in zip(names, session.run(names, feeds)):
            axes = _mean_axes(y, by_name_op(usable, name))
            sums[name] = sums[name] + y.astype(np.float64).sum(axis=axes)
            counts[name] += int(np.prod([y.shape[a] for a in axes]))
    del session
    float_means = {n: sums[n] / max(counts[n], 1) for n in names}

    work = sim.model.clone()
    q_layers = quantized_layer_map(work)
    for _, dq in q_layers.values():
        _widen_int4(dq)  # same values; onnxruntime then runs integer kernels (none for int4)
    for index, layer in enumerate(usable):
        wl = layer.weight_layer
        if layer.name in analytic:
            delta = analytic[layer.name]
        else:
            found = q_layers.get(layer.node.name or "")
            if found is None:
                log.info("bias-correction: layer '%s' not found in the QDQ model", layer.name)
                continue
            out_name = layer.output.name
            s = create_session(_exposed(work, [out_name]), optimize=True)
            inputs = {i.name for i in s.get_inputs()}
            total, count = 0.0, 0
            for feeds in batches:
                (y,) = s.run([out_name], {k: v for k, v in feeds.items() if k in inputs})
                axes = _mean_axes(y, layer)
                total = total + y.astype(np.float64).sum(axis=axes)
                count += int(np.prod([y.shape[a] for a in axes]))
            delta = total / max(count, 1) - float_means[out_name]
        new_b = wl.bias() - delta
        found = q_layers.get(layer.node.name or "")
        if found is not None and not _write_bias(found[0], layer, _native_bias(layer, new_b), work.graph):
            log.info("bias-correction: could not write the bias of '%s' in the QDQ model", layer.name)
            continue
        wl.set_bias(float_model.graph, new_b)
        corrected += 1
        if progress is not None:
            progress(layer.name, index + 1, len(usable))
        log.debug("bias-correction: '%s' |Δb| max %.3g", layer.name, float(np.max(np.abs(delta))))
    log.info("bias-correction (%s): %d of %d layers in %.1f s", cfg.mode, corrected, len(usable),
             time.perf_counter() - t0)
    given = {e.name: e for e in sim.encodings if e.kind == "param" and e.bits != 32}
    return rebuild(sim, float_model, given, batches)


def _measured_input_means(
    float_model: ir.Model, layers: list[Layer], batches: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray | str]:
    """E[x] per input channel of each layer, averaged over the batches (one float pass)."""
    names = list(dict.fromkeys(layer.input.name for layer in layers if layer.input is not None))
    sums: dict[str, Any] = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    last = {n: False for n in names}  # channel axis last (Gemm / MatMul inputs)
    for layer in layers:
        if layer.input is not None and layer.op_type not in ("Conv", "ConvTranspose"):
            last[layer.input.name] = True
    if names:
        session = create_session(_exposed(float_model, names), optimize=True)
        inputs = {i.name for i in session.get_inputs()}
        outs = [o.name for o in session.get_outputs()]
        for feeds in batches:
            for name, x in zip(outs, session.run(outs, {k: v for k, v in feeds.items() if k in inputs})):
                axes = tuple(range(x.ndim - 1)) if last[name] else (0,) + tuple(range(2, x.ndim))
                sums[name] = sums[name] + x.sum(axis=axes, dtype=np.float64)
                counts[name] += int(np.prod([x.shape[a] for a in axes]))
        del session
    means: dict[str, np.ndarray | str] = {}
    for layer in layers:
        if layer.input is None:
            means[layer.name] = "its input has no name"
            continue
        name = layer.input.name
        means[layer.name] = np.atleast_1d(sums[name] / max(counts[name], 1))
    return means


def by_name_op(layers: list[Layer], output_name: str) -> Layer:
    return next(layer for layer in layers if layer.output.name == output_name)


def _mean_axes(y: np.ndarray, layer: Layer) -> tuple[int, ...]:
    if layer.op_type in ("Conv", "ConvTranspose"):
        return (0,) + tuple(range(2, y.ndim))
    return tuple(range(y.ndim - 1))


def _native_bias(layer: Layer, b: np.ndarray) -> np.ndarray:
    """The stored bias for an effective per-channel bias (Gemm divides by beta)."""
    if layer.op_type == "Gemm":
        from onnxq.passes._graph import attr

        return b / float(attr(layer.node, "beta", 1.0))
    return b
