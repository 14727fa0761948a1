"""``prepare(sim)`` → a trainable ``torch.nn.Module`` over the QDQ model; ``export`` writes it back.

The module is :class:`~onnxq.train.executor.GraphModule` run on ``sim.model`` itself: weights are
float parameters (initialized from ``sim.float_model``) behind their weight quantizers, every
QuantizeLinear a quantizer whose range is learnable (``learn_ranges=True``, LSQ) or fixed.
Encodings marked frozen (``"is_frozen"``: AdaRound / SeqMSE grids) never move.

Export writes the trained state into copies of the simulation's models, by ONNX tensor name:

* QDQ model: integer weights ``q = clamp(round(w / s) + z)`` with the learned ``s``, ``z``; the
  activation scales / zero points of every QuantizeLinear and its DequantizeLinear readers
  (a folded reader keeps its factor: ``s_dq = k·s``); int32 biases on ``s_x · s_w``;
* float model: the trained float weights (what the encodings describe);
* encodings: the learned grids, frozen flags kept.

Every number written is the float32 value the torch forward pass used, so onnxruntime on the
exported QDQ model computes what the module computed (Q/DQ bit for bit).
"""

from __future__ import annotations

__all__ = ["QatModel", "feature_anchors", "prepare"]

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from onnxq.errors import ConfigError, UnsupportedModelError
from onnxq.quant.insert_qdq import Encoding
from onnxq.quant.sim import QuantSim
from onnxq.train import fake_quant as fq
from onnxq.train.executor import GraphModule, Quantizer

log = logging.getLogger(__name__)


def _float_weights(model: ir.Model) -> dict[str, np.ndarray]:
    out = {}
    for name, v in model.graph.initializers.items():
        if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT:
            out[name] = np.array(v.const_value.numpy())
    return out


def _int_tensor(codes: np.ndarray, dtype: ir.DataType, name: str) -> ir.Tensor:
    if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        import ml_dtypes  # installed with onnx

        arr = codes.astype(ml_dtypes.int4 if dtype == ir.DataType.INT4 else ml_dtypes.uint4)
        return ir.Tensor(arr, dtype=dtype, name=name)
    return ir.Tensor(codes.astype(dtype.numpy()), name=name)


class QatModel(nn.Module):
    """The QDQ model of ``sim`` as a torch module (see the module docstring)."""

    def __init__(self, sim: QuantSim, learn_ranges: bool = True, features: Sequence[str] = (),
                 feature_weight: float = 1.0) -> None:
        from onnxq.train.loop import _with_outputs

        super().__init__()
        n_q = sum(1 for n in sim.model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
        if n_q == 0:
            raise UnsupportedModelError(
                "the model has no QuantizeLinear/DequantizeLinear nodes: quantize it first "
                "(onnxq.quantize(model, data, config)) and prepare the result"
            )
        self.sim = sim
        self.learn_ranges = learn_ranges
        #: intermediate tensors returned after the outputs (feature distillation, see :func:`prepare`)
        self.anchors = list(features)
        self.n_outputs = len(sim.model.graph.outputs)
        self.feature_weight = feature_weight
        model = _with_outputs(sim.model, self.anchors) if self.anchors else sim.model
        self.graph = GraphModule(model, _float_weights(sim.float_model))
        frozen = {e.name for e in sim.encodings if e.frozen}
        for key, q in self.graph.quantizers.items():
            if q.name in frozen:
                q.frozen = True
        for key, info in self.graph.activation_quantizers.items():
            via = {d["via"] for d in info["dq"] if not d["direct"]}
            if "Clip" in via:  # integer Clip bounds are codes of the old grid: keep the grid
                self.graph.quantizers[key].frozen = True
                log.info("range of '%s' kept fixed: an integer Clip reads its codes", key)
        self.graph.set_ranges_learnable(learn_ranges)
        log.info("QAT model: %d weight tensors, %d quantizers (%d frozen), ranges %s",
                 len(self.graph.params), len(self.graph.quantizers),
                 sum(q.frozen for q in self.quantizers()),
                 "learned" if learn_ranges else "fixed")

    # ----------------------------------------------------------------------------- access
    @property
    def input_names(self) -> list[str]:
        return self.graph.input_names

    @property
    def output_names(self) -> list[str]:
        return self.graph.output_names

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph(*args, **kwargs)

    def quantizers(self) -> list[Quantizer]:
        return [q for q in self.graph.quantizers.values() if isinstance(q, Quantizer)]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Weights and biases (ONNX constants); see :meth:`GraphModule.named_onnx_parameters`."""
        return list(self.graph.params.values())

    def range_parameters(self) -> list[nn.Parameter]:
        """Learnable scales (log-ratio θ) and zero-point offsets φ."""
        return [p for q in self.quantizers() for p in (q.log_scale, q.offset) if p.requires_grad]

    # ----------------------------------------------------------------------------- export
    def to_sim(self) -> QuantSim:
        """A :class:`QuantSim` with the trained weights and learned encodings."""
        from onnxq.quant.annotate import annotate

        g = self.graph
        qdq = self.sim.model.clone()
        inits = qdq.graph.initializers

        def put(name: str | None, arr: np.ndarray) -> None:
            if not name:
                return
            v = inits[name]
            old = v.const_value
            shape = tuple(old.shape.numpy()) if hasattr(old.shape, "numpy") else tuple(old.shape)
            arr = np.asarray(arr).reshape(shape)
            if old.dtype == ir.DataType.FLOAT:
                v.const_value = ir.Tensor(arr.astype(np.float32), name=name)
            else:
                v.const_value = _int_tensor(arr, old.dtype, name)

        scales: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        with torch.no_grad():
            for key, info in g.activation_quantizers.items():
                q = g.quantizers[key]
                s, z = q.scale().numpy(), q.zero_point().numpy().astype(np.int64)
                put(info["scale_init"], s)
                put(info["zero_init"], z)
                scales[q.name] = (s, z)
                for dq in info["dq"]:
                    s_dq = q.scale(getattr(g, dq["base"])).numpy()
                    put(dq["scale_init"], s_dq)
                    if dq["node"].endswith("_DequantizeLinear"):
                        scales.setdefault(dq["node"][: -len("_DequantizeLinear")], (s_dq, z))
            for key, (name, codes_init, s_init, z_init) in g.weight_quantizers.items():
                q = g.quantizers[key]
                w = g.params[g.param_names[name]]
                s, z = q.scale(), q.zero_point()
                codes = fq.quantize(w, s, z, q.qmin, q.qmax, q.axis).numpy().astype(np.int64)
                put(codes_init, codes)
                put(s_init, s.numpy())
                put(z_init, z.numpy().astype(np.int64))
                scales[name] = (s.numpy(), z.numpy().astype(np.int64))
            for key, info in g.bias_quantizers.items():
                q = g.quantizers[key]
                b = g.params[g.param_names[q.name]]
                s = g.bias_scale(key)
                codes = torch.round(b / s).clamp(q.qmin, q.qmax).numpy().astype(np.int64)
                put(info["codes_init"], codes)
                put(info["scale_init"], s.numpy())
                scales[q.name] = (np.broadcast_to(s.numpy(), b.shape), np.zeros(b.shape, np.int64))

        float_model = self.sim.float_model.clone()
        f_inits = float_model.graph.initializers
        trained = {n: p.detach().numpy() for n, p in g.named_onnx_parameters().items()}
        for name, arr in trained.items():
            if name in f_inits and f_inits[name].const_value is not None and \
                    f_inits[name].const_value.dtype == ir.DataType.FLOAT:
                f_inits[name].const_value = ir.Tensor(arr.astype(np.float32), name=name)
            if name in inits and inits[name].const_value is not None and \
                    inits[name].const_value.dtype == ir.DataType.FLOAT:
                inits[name].const_value = ir.Tensor(arr.astype(np.float32), name=name)

        encodings: list[Encoding] = []
        for e in self.sim.encodings:
            found = scales.get(e.name)
            if found is None:
                log.debug("encoding '%s' has no quantizer in the executor: kept", e.name)
                encodings.append(e)
                continue
            s, z = found
            s_t = tuple(float(v) for v in np.atleast_1d(s).reshape(-1))
            z_t = tuple(int(v) for v in np.atleast_1d(z).reshape(-1))
            if len(s_t) == 1 and len(e.scale) > 1:
                s_t, z_t = s_t * len(e.scale), z_t * len(e.scale)
            if np.array_equal(np.float32(s_t), np.float32(e.scale)) and z_t == e.zero_point:
                encodings.append(e)  # unchanged: keep the calibrated (float64) numbers
                continue
            encodings.append(dataclasses.replace(e, scale=s_t, zero_point=z_t))
        plan = annotate(float_model, self.sim.config)
        return QuantSim(qdq, float_model, encodings, self.sim.config, plan, self.sim.fp32_model)

    def export(self, out_dir: str | os.PathLike, name: str = "model") -> dict[str, Path]:
        """Write ``<name>.qdq.onnx``, ``<name>.float.onnx`` and the encodings (1.0.0, 2.0.0)."""
        return self.to_sim().export(out_dir, name)


def feature_anchors(sim: QuantSim, ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul")) -> list[str]:
    """Outputs of ``ops`` nodes in ``sim.model`` that the FP32 reference computes under the same
    name and shape (the layer outputs before their activation and quantizer): the tensors
    ``prepare(sim, features=True)`` distills on."""
    from onnxq.train.loop import same_named_outputs

    return same_named_outputs(sim.model, sim.fp32_model, ops)


def prepare(sim: QuantSim, learn_ranges: bool = True, *, features: bool | Sequence[str] = False,
            feature_weight: float = 1.0) -> QatModel:
    """A trainable module over ``sim.model`` (see :class:`QatModel`).

    ``learn_ranges``: train the quantizers' scales and zero points too (range learning, LSQ);
    ``False`` keeps the calibrated ranges (fixed-range QAT). ``features``: also distill
    intermediate tensors — ``True`` for :func:`feature_anchors` (every Conv / Gemm / MatMul
    output the FP32 model shares), or a list of names; :func:`~onnxq.train.fit` then adds
    ``feature_weight`` times the mean of their MSEs, each divided by the teacher's variance, to
    the loss on the outputs, so that every image constrains every layer. Raises
    :class:`~onnxq.errors.UnsupportedModelError` for a model without quantizers or with an op the
    executor cannot run (naming the node, op and opset) before anything is trained.
    """
    if not isinstance(sim, QuantSim):
        raise TypeError(f"prepare() takes the QuantSim that onnxq.quantize returns, not {type(sim).__name__}")
    anchors = feature_anchors(sim) if features is True else list(features or ())
    if features is not True and anchors:
        known = set(feature_anchors(sim, ops=tuple({n.op_type for n in sim.model.graph})))
        missing = [n for n in anchors if n not in known]
        if missing:
            raise ConfigError(f"features {missing[:3]}: not tensors that both the QDQ model and its FP32 "
                              "reference compute (see onnxq.train.qat.feature_anchors)")
    return QatModel(sim, learn_ranges, anchors, feature_weight)
