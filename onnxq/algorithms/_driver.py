"""Layer-by-layer weight optimization over a QuantSim (shared by AdaRound and SeqMSE).

For each quantized weight layer in topological order:

1. its **target** is the float model's output of that layer at sampled positions (captured once
   for all layers in one float pass, kept in a :class:`RowStore` within the memory budget);
2. its **input** comes from the working model in which every earlier layer already carries its
   optimized weights (the QDQ model, so activations are quantized as deployed; with
   ``act_quant=False`` a weights-only model instead), at the same positions;
3. ``solve(layer, job)`` returns the layer's integer codes (and, optionally, a new scale);
4. the working model is updated before the next layer runs.

The result is a new :class:`QuantSim` whose float model carries the dequantized optimized weights
and whose weight encodings are frozen, so later calibration never changes them. The activation
grids stay those the layers were fitted to (``act_quant``); a weights-only run (``act_quant=False``)
calibrates them on the final weights.
"""

from __future__ import annotations

__all__ = ["LayerJob", "optimize_layers"]

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.algorithms._capture import (
    RowStore,
    capture_inputs,
    capture_targets,
    find_row_mask,
    input_session,
    materialize,
)
from onnxq.algorithms._layers import Layer, find_layers, quantized_layer_map
from onnxq.passes._graph import attr, constant, is_op, set_constant
from onnxq.quant.insert_qdq import Encoding, _int_tensor
from onnxq.quant.qparams import QRange

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerJob:
    """Everything one layer's solver needs, in canonical grouped form."""

    layer: Layer
    weight: np.ndarray  # (G, O, K) float32
    scale: np.ndarray  # (G, O, 1) float64
    zero: np.ndarray  # (G, O, 1) int64
    grid: QRange
    bias: np.ndarray  # (G·O,) float32
    inputs: np.ndarray  # (rows, G, K) float32
    target: np.ndarray  # (rows, G·O) float32 (may be a memmap)
    encoding: Encoding
    rng: np.random.Generator


@dataclasses.dataclass
class Solution:
    codes: np.ndarray  # (G, O, K) integers
    scale: np.ndarray | None = None  # (G, O, 1) when the solver changed it
    zero: np.ndarray | None = None  # (G, O, 1) with a changed scale on an asymmetric grid
    bias: np.ndarray | None = None  # (G·O,) when the solver changed the layer's bias
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _rows_of(enc: Encoding, layer: Layer, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The encoding's scale / zero point per canonical output row, shaped (G, O, 1)."""
    scale = np.asarray(enc.scale, np.float64)
    zero = np.asarray(enc.zero_point, np.int64)
    if scale.size == 1:
        return np.full(shape[:2] + (1,), float(scale[0])), np.full(shape[:2] + (1,), int(zero[0]))
    return scale.reshape(shape[0], shape[1], 1), zero.reshape(shape[0], shape[1], 1)


def _to_encoding_scale(enc: Encoding, scale: np.ndarray) -> tuple[float, ...]:
    flat = np.asarray(scale, np.float64).reshape(-1)
    return (float(flat[0]),) if len(enc.scale) == 1 else tuple(flat.tolist())


def _native(layer: Layer, grouped: np.ndarray) -> np.ndarray:
    wl = layer.weight_layer
    return wl.to_native(grouped.reshape(wl.canonical_shape))


def _widen_int4(dq: ir.Node) -> None:
    """Store 4-bit weight codes as int8 in the working model: the same dequantized values, but
    onnxruntime fuses int8 DQ → Conv → Q into integer kernels (it has none for int4), 5–9× faster.
    Asymmetric (uint4) codes are stored centred, ``q − z`` with a zero point of 0: onnxruntime's
    integer kernels for weights with non-zero per-channel zero points are several times slower
    still (measured, EfficientNet-Lite0 W4A8 asymmetric AdaRound: 1244 s → 243 s, same result)."""
    codes = dq.inputs[0]
    if codes is None or codes.const_value is None:
        return
    if codes.const_value.dtype not in (ir.DataType.INT4, ir.DataType.UINT4):
        return
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    z = zero.const_value.numpy() if zero is not None and zero.const_value is not None else None
    _set_centered(dq, codes.const_value.numpy(), z)


def _set_centered(dq: ir.Node, codes: np.ndarray, zero: np.ndarray | None) -> None:
    """Write ``codes − zero`` (4-bit codes in the weight's native layout; ``zero``: the DQ's
    zero point, scalar or per channel along its ``axis``) as int8 codes, zero point int8 0."""
    centered = codes.astype(np.int16)
    if zero is not None and np.any(zero):
        z = np.asarray(zero, np.int16)
        if z.ndim == 1 and z.size > 1:
            axis = int(attr(dq, "axis", 1)) % centered.ndim
            shape = [1] * centered.ndim
            shape[axis] = z.size
            z = z.reshape(shape)
        centered = centered - z
    value = dq.inputs[0]
    value.const_value = ir.Tensor(centered.astype(np.int8), name=value.name)
    value.type = ir.TensorType(ir.DataType.INT8)
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zp is not None and zp.const_value is not None:
        shape = zp.const_value.numpy().shape
        zp.const_value = ir.Tensor(np.zeros(shape, np.int8), name=zp.name)
        zp.type = ir.TensorType(ir.DataType.INT8)


class _WorkingModel:
    """The model that feeds layer inputs: QDQ (act_quant) or float with fake-quantized weights."""

    def __init__(self, sim: Any, act_quant: bool) -> None:
        self.act_quant = act_quant
        if act_quant:
            self.model = sim.model.clone()
            self.q_layers = quantized_layer_map(self.model)
            for _, dq in self.q_layers.values():
                _widen_int4(dq)
        else:
            self.model = sim.float_model.clone()
            self.q_layers = {}
            encs = {e.name: e for e in sim.encodings if e.kind == "param"}
            layers, _ = find_layers(self.model)
            for layer in layers:
                enc = encs.get(layer.weight_layer.weight.name or "")
                if enc is None:
                    continue
                w = layer.weight_matrix()
                scale, zero = _rows_of(enc, layer, w.shape)
                g = enc.grid()
                codes = np.clip(np.rint(w / scale) + zero, g.qmin, g.qmax)
                self._set_float(layer.name, _native(layer, ((codes - zero) * scale).astype(np.float32)))

    def input_name(self, layer: Layer) -> str | None:
        if self.act_quant:
            found = self.q_layers.get(layer.node.name or "")
            if found is None:
                return None
            inp = found[0].inputs[0]
            return inp.name if inp is not None else None
        return layer.input.name

    def _set_float(self, node_name: str, w_native: np.ndarray) -> None:
        for node in self.model.graph:
            if node.name == node_name:
                set_constant(node.inputs[1], w_native.astype(np.float32))
                return

    def _set_bias(self, node: ir.Node, b: np.ndarray) -> None:
        """A new bias on the working model's layer: int32 codes at the bias scale it has, or
        the float bias of a layer whose bias is not quantized."""
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is None:
            return
        b_dq = bias.producer()
        if is_op(b_dq, "DequantizeLinear") and constant(b_dq.inputs[1]) is not None:
            b_scale = constant(b_dq.inputs[1]).astype(np.float64)
            codes = np.clip(np.rint(b.astype(np.float64) / np.broadcast_to(b_scale, b.shape)), -(2**31), 2**31 - 1)
            b_dq.inputs[0].const_value = ir.Tensor(codes.astype(np.int32), name=b_dq.inputs[0].name)
        elif bias.const_value is not None:
            set_constant(bias, b.astype(np.float32))

    def update(self, layer: Layer, job: LayerJob, sol: Solution) -> None:
        scale = job.scale if sol.scale is None else sol.scale
        zero = job.zero if sol.zero is None else sol.zero
        deq = ((sol.codes - zero) * scale).astype(np.float32)
        if not self.act_quant:
            self._set_float(layer.name, _native(layer, deq))
            if sol.bias is not None:
                for node in self.model.graph:
                    if node.name == layer.name and len(node.inputs) > 2 and node.inputs[2] is not None:
                        set_constant(node.inputs[2], sol.bias.astype(np.float32))
            return
        node, dq = self.q_layers[layer.node.name or ""]
        enc = job.encoding
        codes_native = _native(layer, sol.codes.astype(np.int64))
        if enc.bits == 4:  # int8 codes, centred (see _widen_int4)
            zflat = np.asarray(zero, np.int64).reshape(-1)
            zero_native = zflat if len(enc.zero_point) > 1 else zflat[:1].reshape(())
            _set_centered(dq, codes_native, zero_native)
        else:
            dq.inputs[0].const_value = _int_tensor(codes_native, enc.bits, enc.signed, dq.inputs[0].name or "")
        if sol.scale is None:
            if sol.bias is not None:
                self._set_bias(node, sol.bias)
            return
        flat = np.asarray(sol.scale, np.float64).reshape(-1)
        new_scale = flat[:1].reshape(()) if len(enc.scale) == 1 else flat
        set_constant(dq.inputs[1], new_scale.astype(np.float32))
        if sol.zero is not None and enc.bits != 4 and len(dq.inputs) > 2 and dq.inputs[2] is not None:
            zflat = np.asarray(sol.zero).reshape(-1)
            znew = zflat[:1].reshape(()) if len(enc.scale) == 1 else zflat
            dq.inputs[2].const_value = _int_tensor(znew, enc.bits, enc.signed, dq.inputs[2].name or "")
        # the int32 bias is quantized with s_input · s_weight: follow the new weight scale
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        b_dq = bias.producer() if bias is not None else None
        if is_op(b_dq, "DequantizeLinear") and constant(b_dq.inputs[1]) is not None:
            old_b_scale = constant(b_dq.inputs[1]).astype(np.float64)
            old_w_scale = np.asarray(enc.scale, np.float64)
            s_in = float(np.atleast_1d(old_b_scale)[0] / old_w_scale[0])
            b_scale = s_in * new_scale
            b = (job.bias if sol.bias is None else sol.bias).astype(np.float64)
            codes = np.clip(np.rint(b / np.broadcast_to(b_scale, b.shape)), -(2**31), 2**31 - 1)
            b_dq.inputs[0].const_value = ir.Tensor(codes.astype(np.int32), name=b_dq.inputs[0].name)
            set_constant(b_dq.inputs[1], np.asarray(b_scale, np.float32))
        elif sol.bias is not None:  # a float bias (not quantized): written as it is
            self._set_bias(node, sol.bias)


def optimize_layers(
    sim: Any,
    data: Any,
    solve: Callable[[LayerJob], Solution | None],
    *,
    what: str,
    rows_per_layer: int,
    act_quant: bool,
    max_samples: int | None,
    memory_budget_mb: float,
    seed: int,
    layers: Any = None,
    exclude: Any = (),
    progress: Callable[[str, int, int], Any] | None = None,
    row_mask: str | None = None,
) -> Any:
    """Run ``solve`` on every eligible layer of ``sim`` in order; returns a new QuantSim.

    ``row_mask``: see :func:`~onnxq.algorithms._capture.find_row_mask` (``"auto"``, an input
    name, or ``None``): MatMul rows are sampled only at the positions it marks as data."""
    from onnxq.quant.sim import rebuild

    t0 = time.perf_counter()
    encs = {e.name: e for e in sim.encodings if e.kind == "param"}
    wanted = {s.node.name or "" for s in sim.plan.weights}
    if layers is not None:
        wanted &= set(layers)
    wanted -= set(exclude)
    # weights and targets from the FP32 model (before any earlier algorithm), biases as they are now
    all_layers, skipped = find_layers(sim.fp32_model, wanted)
    current = {layer.name: layer for layer in find_layers(sim.float_model, wanted)[0]}
    for name, reason in skipped:
        log.info("%s: layer '%s' skipped: %s", what, name, reason)
    work = _WorkingModel(sim, act_quant)
    chosen: list[Layer] = []
    for layer in all_layers:
        enc = encs.get(layer.weight_layer.weight.name or "")
        if enc is None:
            log.info("%s: layer '%s' skipped: its weight has no encoding", what, layer.name)
        elif enc.frozen and what == "seq-mse":
            log.info("%s: layer '%s' skipped: its weight encoding is frozen", what, layer.name)
        elif work.input_name(layer) is None:
            log.info("%s: layer '%s' skipped: not found in the QDQ model", what, layer.name)
        else:
            chosen.append(layer)
    batches = materialize(data, sim.float_model, max_samples)
    new_encodings: dict[str, Encoding] = {e.name: e for e in sim.encodings if e.kind == "param" and e.frozen}
    new_weights: dict[str, np.ndarray] = {}
    new_biases: dict[str, np.ndarray] = {}
    with RowStore(int(memory_budget_mb * 2**20)) as store:
        # weights-only fitting recalibrates the activation grids afterwards, on every position:
        # padded positions left out of the fit drift and then set those grids (measured, MiniLM
        # W4A8 AdaRound act_quant=False: R@1 0.300 with every position, 0.169 with the mask)
        mask = find_row_mask(sim.fp32_model, None if row_mask == "auto" and not act_quant else row_mask)
        if mask is not None:
            log.info("%s: MatMul rows are sampled where the input '%s' is non-zero (not padding)", what, mask)
        samples = capture_targets(sim.fp32_model, chosen, batches, rows_per_layer, store, seed,
                                  row_mask=mask)
        log.info("%s: targets of %d layers captured in %.1f s", what, len(chosen), time.perf_counter() - t0)
        for index, layer in enumerate(chosen):
            t1 = time.perf_counter()
            enc = encs[layer.weight_layer.weight.name]
            w = layer.weight_matrix()
            scale, zero = _rows_of(enc, layer, w.shape)
            session = input_session(work.model, work.input_name(layer))
            x = capture_inputs(session, layer, samples[layer.name], batches)
            del session
            bias = current[layer.name].bias() if layer.name in current else layer.bias()
            job = LayerJob(layer, w, scale, zero, enc.grid(), bias, x,
                           store.get(f"{layer.name}/target"), enc, np.random.default_rng([seed, index]))
            sol = solve(job)
            del x
            store.drop(f"{layer.name}/target")
            if sol is None:
                continue
            work.update(layer, job, sol)
            final_scale = job.scale if sol.scale is None else sol.scale
            final_zero = job.zero if sol.zero is None else sol.zero
            deq = ((sol.codes - final_zero) * final_scale).astype(np.float32)
            new_weights[layer.weight_layer.weight.name] = _native(layer, deq)
            if sol.bias is not None:
                new_biases[layer.name] = sol.bias
            new_encodings[enc.name] = dataclasses.replace(
                enc, scale=_to_encoding_scale(enc, final_scale),
                zero_point=tuple(int(z) for z in np.asarray(final_zero).reshape(-1)[: len(enc.zero_point)]),
                frozen=True,
            )
            log.info("%s: layer %d/%d '%s' (%s, %s) done in %.2f s %s", what, index + 1, len(chosen),
                     layer.name, layer.op_type, layer.activation.kind, time.perf_counter() - t1, sol.info)
            if progress is not None:
                progress(layer.name, index + 1, len(chosen))
    float_model = sim.float_model.clone()
    for name, w in new_weights.items():
        set_constant(float_model.graph.initializers[name], w)
    if new_biases:
        for layer in find_layers(float_model, set(new_biases))[0]:
            if layer.weight_layer.bias_problem() is None:
                layer.weight_layer.set_bias(float_model.graph, new_biases[layer.name])
    # the layers were fitted to the activation grids of the QDQ model they read (act_quant):
    # keep those grids. Recalibrating them on the new weights undoes the fit (measured, PP-OCR rec
    # CER on 600 lines: W4A8 AdaRound 2.54 % -> 0.32 %, W8A8 per-tensor dfq + AdaRound 62.6 % ->
    # 0.03 %, FP32 0.02 %; EfficientNet-Lite0 W4A8 top-1 0.865 -> 0.861, one image of 244)
    out = rebuild(sim, float_model, new_encodings, None if act_quant else batches)
    log.info("%s: %d layers in %.1f s", what, len(new_weights), time.perf_counter() - t0)
    return out
