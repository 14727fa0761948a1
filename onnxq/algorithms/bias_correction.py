"""Bias correction: remove the mean shift that weight quantization puts on each layer's output.

Quantizing a weight ``W → W_q`` shifts the expected output of channel ``o`` by
``E[y_q − y]_o = Σ_{c,k} (W_q − W)[o, c, k] · E[x_c]`` (Nagel et al. 2019, "Data-Free
Quantization"). The correction subtracts it from the bias, ``b ← b − E[y_q − y]``.

* **empirical**: layer by layer in topological order, ``E[y_q − y]`` is measured on calibration
  data, averaged over batch and spatial positions: ``y_q`` from the QDQ model whose earlier layers
  are already corrected (activations quantized as configured), ``y`` from the float model.
* **analytic** (data-free): ``E[x_c]`` from the BatchNorm statistics BN folding kept on the layer
  that produces ``x`` (``node.meta["onnxq.bn_stats"]``: its pre-activation output channel ``c`` is
  taken as ``N(β_c, γ_c²)``), through that layer's activation as a clipped Gaussian:
  ``E[clip(z, a, b)] = a·Φ(α) + b·(1 − Φ(β')) + μ·(Φ(β') − Φ(α)) + σ·(φ(α) − φ(β'))`` with
  ``α = (a − μ)/σ``, ``β' = (b − μ)/σ`` (Relu: ``a = 0, b = ∞``; Relu6: ``[0, 6]``; none:
  ``E = μ``). Layers without such statistics are left alone (logged).
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
from onnxq.algorithms._layers import Layer, find_layers, quantized_layer_map
from onnxq.errors import ConfigError
from onnxq.passes._graph import BN_STATS_KEY, constant, is_op, set_constant
from onnxq.runtime.session import create_session

log = logging.getLogger(__name__)

MODES = ("empirical", "analytic", "hybrid")


@dataclasses.dataclass(frozen=True)
class BiasCorrectionConfig:
    mode: str = "empirical"
    max_samples: int | None = None
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"bias correction mode '{self.mode}' is not one of {', '.join(MODES)}")


def clipped_normal_mean(mu: np.ndarray, sigma: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    """E[clip(z, lo, hi)] for z ~ N(mu, sigma²) (None: unbounded on that side)."""
    mu = np.asarray(mu, np.float64)
    sigma = np.maximum(np.asarray(sigma, np.float64), 1e-12)
    a = -np.inf if lo is None else lo
    b = np.inf if hi is None else hi
    alpha = (a - mu) / sigma
    beta = (b - mu) / sigma
    cdf_a, cdf_b = special.ndtr(alpha), special.ndtr(beta)
    pdf = lambda t: np.where(np.isfinite(t), np.exp(-0.5 * np.square(np.where(np.isfinite(t), t, 0))) / np.sqrt(2 * np.pi), 0.0)  # noqa: E731
    mean = mu * (cdf_b - cdf_a) + sigma * (pdf(alpha) - pdf(beta))
    if lo is not None:
        mean = mean + a * cdf_a
    if hi is not None:
        mean = mean + b * (1 - cdf_b)
    return mean


def _bounds(kind: str, params: tuple) -> tuple[float | None, float | None] | None:
    if kind == "identity":
        return (None, None)
    if kind == "relu":
        return (0.0, None)
    if kind == "clip":
        return params
    return None


def _input_mean(layer: Layer, layers_by_output: dict[int, Layer]) -> np.ndarray | str:
    """E[x] per input channel from the producer's BN statistics, or why not."""
    x = layer.input
    producer_layer = None
    node = x.producer()
    # x is the producer's output directly, or after its activation
    if node is not None and id(node.outputs[0]) in layers_by_output:
        producer_layer = layers_by_output[id(node.outputs[0])]
        kind, params = "identity", ()
    elif node is not None and node.inputs and node.inputs[0] is not None and id(node.inputs[0]) in layers_by_output:
        producer_layer = layers_by_output[id(node.inputs[0])]
        kind, params = producer_layer.activation.kind, producer_layer.activation.params
        if kind == "identity":
            return f"'{node.op_type}' between '{producer_layer.name}' and the layer is not an activation"
    if producer_layer is None:
        return "its input is not the output of a layer with folded BatchNorm"
    stats = producer_layer.node.meta.get(BN_STATS_KEY)
    if stats is None:
        return f"'{producer_layer.name}' has no BatchNorm statistics (run fold-bn first)"
    bounds = _bounds(kind, params)
    if bounds is None:
        return f"activation '{kind}' has no clipped-Gaussian mean"
    gamma = np.abs(np.asarray(stats["gamma"], np.float64))
    beta = np.asarray(stats["beta"], np.float64)
    return clipped_normal_mean(beta, gamma, *bounds)


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
    if cfg.mode in ("empirical", "hybrid") and data is None:
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
    if cfg.mode in ("analytic", "hybrid"):
        for layer in usable:
            ex = _input_mean(layer, by_output)
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
    if cfg.mode == "analytic":
        for layer in usable:
            if layer.name in analytic:
                layer.weight_layer.set_bias(float_model.graph, layer.weight_layer.bias() - analytic[layer.name])
                corrected += 1
        log.info("bias-correction (analytic): %d of %d layers in %.1f s", corrected, len(usable),
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
