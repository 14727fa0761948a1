"""The built-in training loop: knowledge distillation from the FP32 model, labels optional.

For users with no training pipeline (QAT), and for fine-tuning a compressed float model. Each
step draws a batch, augments it (image inputs, ``augment``: ``auto`` = random horizontal flip and
a random shift of up to ``shift`` of the side, edge-padded; ``match`` = flip, a random resized
crop per sample and mixup within the batch), runs the FP32 teacher (onnxruntime, on the same
augmented batch, so every augmented image is a valid example) and the student (torch), and
minimizes

    L = (1 − α) · L_KD(student, teacher) + α · CE(student, labels)       (α = 0 without labels)

with ``L_KD = T² · KL(softmax(t/T) ‖ softmax(s/T))`` for ``[N, C]`` outputs (classifier logits)
and the mean squared error divided by the teacher's variance otherwise (embeddings, maps); with
mixup the label loss mixes the two labels. :func:`distill` (float students) can add the mean
normalized MSE of intermediate tensors both models share. AdamW on the weights (``lr``) and,
separately, on the quantizers' log-scales and offsets (``range_lr``, no weight decay), both on
a cosine schedule to 0 after a linear warm-up. With ``validation``, a seeded fraction of the
samples is held out and the weights of the epoch with the lowest held-out distillation loss
(the start included) are the ones kept. A checkpoint (``last.pt`` and ``epoch<N>.pt``) is
written after each epoch; ``resume=True`` continues from ``last.pt``. Shuffling and augmentation
draw from one generator seeded by ``seed``, so a run is repeatable on the same machine and
thread count.

Measured (EfficientNet-Lite0, 256 ImageNet-sample images, 244 held out): ``match`` lowers
nothing that matters there — W4A8 QAT from AdaRound, 10 epochs: held-out KL(FP32‖Q) 0.123 →
0.118 (``match``) vs 0.125 (``auto``); the 75 %-MACs pruned model fine-tuned 10 epochs: top-1
0.684 (``match``) vs 0.615 (flip only) vs 0.689 untuned. What limits both is 256 images.
Feature distillation for QAT (``prepare(sim, features=True)``: every Conv/Gemm/MatMul output
matched too) lowers that held-out KL the most (0.118 → 0.106 with ``match``, 20 epochs, feature
weight 5, on a GPU) but not the held-out top-1 (0.873 against the start's 0.881).
"""

from __future__ import annotations

__all__ = ["FloatStudent", "TrainConfig", "distill", "fit", "load_training_data", "run_qat", "shared_features"]

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from onnxq.errors import ConfigError

log = logging.getLogger(__name__)


AUGMENT = ("auto", "match", "none", "shift", "flip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    range_lr: float = 1e-2
    weight_decay: float = 0.0
    warmup: float = 0.05
    temperature: float = 1.0
    #: weight of the label loss when labels are given (0 = distillation only)
    label_weight: float = 0.5
    #: "kl" (logits), "mse" (normalized) or "auto" (kl for 2-D outputs, else mse)
    distill: str = "auto"
    #: NCHW image inputs (1 or 3 channels, ≥ 16 px): "auto" = flip + shift; "match" = flip +
    #: random resized crop + mixup ("function matching", for few images); "none"; "shift"; "flip"
    augment: str = "auto"
    shift: float = 0.125
    #: fraction of the samples held out (seeded): their distillation loss (outputs, no
    #: augmentation) is measured after every epoch and the weights of the best epoch are kept
    validation: float = 0.0
    seed: int = 0
    max_steps: int | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True
    #: where the student trains: "auto" (a CUDA GPU when torch sees one, else the CPU), "cpu",
    #: "cuda", "cuda:1", … (the teacher runs in onnxruntime on the CPU; the trained module is
    #: back on the CPU when ``fit`` returns, so export is the same either way)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        if self.distill not in ("auto", "kl", "mse"):
            raise ConfigError(f"distill '{self.distill}' is not one of auto, kl, mse")
        if not 0 <= self.validation < 1:
            raise ConfigError(f"validation must be a fraction in [0, 1), got {self.validation}")
        if self.augment not in AUGMENT:
            raise ConfigError(f"augment '{self.augment}' is not one of {', '.join(AUGMENT)}")


def resolve_device(name: str) -> torch.device:
    """The torch device for a :attr:`TrainConfig.device` setting (a clear error when absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"device '{name}' is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}': this torch sees no CUDA GPU (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}': torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def load_training_data(data: Any, model: Any) -> dict[str, np.ndarray]:
    """All samples of ``data`` (any form :func:`onnxq.runtime.data.as_batches` accepts: arrays,
    ``{input: array}`` batches, a ``.npy``/``.npz`` folder, an ImageFolder) as one array per
    input, validated against the model's input names, types and shapes."""
    from onnxq.runtime.data import as_batches

    if isinstance(data, Mapping) and all(isinstance(v, np.ndarray) for v in data.values()):
        data = [dict(data)]
    parts: dict[str, list[np.ndarray]] = {}
    for batch in as_batches(data, model):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    sizes = {len(v) for v in out.values()}
    if len(sizes) != 1:
        raise ConfigError(f"the inputs hold different numbers of samples: {sizes}")
    return out


def _is_image(x: np.ndarray) -> bool:
    return x.ndim == 4 and x.dtype == np.float32 and x.shape[1] in (1, 3) and min(x.shape[2:]) >= 16


def _resized_crop(x: torch.Tensor, gen: torch.Generator, area: tuple[float, float] = (0.25, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """One random crop per sample (area fraction uniform in ``area``, aspect ratio log-uniform in
    ``ratio``, as Inception's crop; clipped to the image), resized back to the input size
    (bilinear)."""
    n, _, h, w = x.shape
    u = torch.rand(n, 4, generator=gen, dtype=torch.float64)
    frac = area[0] + (area[1] - area[0]) * u[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    ch = torch.clamp(torch.sqrt(frac / aspect), max=1.0)       # crop height / h
    cw = torch.clamp(torch.sqrt(frac * aspect), max=1.0)       # crop width / w
    cy = (1 - ch) * u[:, 2] + ch / 2                            # centre, in [0, 1]
    cx = (1 - cw) * u[:, 3] + cw / 2
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = cw, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = ch, 2 * cy - 1
    grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _mixing(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup weights λ ~ U(0, 1) and a partner per sample (one draw per batch, shared by all
    image inputs and by the labels)."""
    return torch.rand(n, generator=gen), torch.randperm(n, generator=gen)


def _augment(x: torch.Tensor, mode: str, shift: float, gen: torch.Generator,
             mix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Random horizontal flip (per sample); ``auto``/``shift``: one random shift per batch,
    edge-padded; ``match``: a random resized crop per sample, then mixup with a partner of the
    batch (``mix``). The teacher sees the same augmented batch, so every augmented image is a
    valid training example ("function matching", Beyer et al. 2022): few images go further."""
    if mode in ("auto", "flip", "match"):
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if mode == "match":
        x = _resized_crop(x, gen)
        if mix is not None:
            lam = mix[0].to(x.dtype)[:, None, None, None]
            x = lam * x + (1 - lam) * x[mix[1]]
        return x.contiguous()
    if mode in ("auto", "shift") and shift > 0:
        h, w = x.shape[2], x.shape[3]
        ph, pw = max(1, int(h * shift)), max(1, int(w * shift))
        dy = int(torch.randint(-ph, ph + 1, (1,), generator=gen))
        dx = int(torch.randint(-pw, pw + 1, (1,), generator=gen))
        x = F.pad(x, (pw, pw, ph, ph), mode="replicate")[:, :, ph + dy:ph + dy + h, pw + dx:pw + dx + w]
    return x


def _distill_loss(s: torch.Tensor, t: torch.Tensor, mode: str, temperature: float) -> torch.Tensor:
    if mode == "kl" or (mode == "auto" and s.ndim == 2 and s.shape[1] > 1):
        T = temperature
        return F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1),
                        reduction="batchmean", log_target=True) * T * T
    return F.mse_loss(s, t) / (t.var() + 1e-12)


def _teacher(model: Any) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    from onnxq.runtime.session import create_session

    # as many onnxruntime threads as torch uses: more would spin against torch's own threads
    session = create_session(model, optimize=True, threads=torch.get_num_threads())
    return lambda feeds: session.run(None, feeds)


def fit(
    qat: Any,
    data: Any,
    labels: np.ndarray | None = None,
    config: TrainConfig = TrainConfig(),
    *,
    teacher: Any = None,
    callback: Callable[[int, dict[str, float]], dict[str, float] | None] | None = None,
) -> list[dict[str, float]]:
    """Train ``qat`` (from :func:`onnxq.train.prepare`, or a :class:`FloatStudent`) by
    distillation; returns per-epoch logs.

    ``teacher``: an ``onnx_ir.Model`` (default: the simulation's FP32 model) or a function
    ``feeds → outputs``. ``callback(epoch, log)`` may return extra numbers to log (e.g. accuracy).
    The student trains on ``config.device`` and is back on the CPU when this returns or raises.
    """
    try:
        return _fit(qat, data, labels, config, teacher, callback)
    finally:  # back on the CPU even when training stops with an error (export, inspection)
        qat.to("cpu")


def _fit(qat: Any, data: Any, labels: np.ndarray | None, config: TrainConfig, teacher: Any,
         callback: Callable[[int, dict[str, float]], dict[str, float] | None] | None) -> list[dict[str, float]]:
    reference = qat.sim.fp32_model if hasattr(qat, "sim") else qat.model
    what = "QAT" if hasattr(qat, "sim") else "fine-tune"
    n_outputs = getattr(qat, "n_outputs", None) or 1_000_000
    feature_weight = getattr(qat, "feature_weight", 1.0)
    arrays = load_training_data(data, reference)
    names = qat.input_names
    n = len(next(iter(arrays.values())))
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != n:
            raise ConfigError(f"{len(labels)} labels for {n} samples")
    if teacher is None and getattr(qat, "anchors", None) and hasattr(qat, "sim"):
        teacher = _with_outputs(reference, qat.anchors)  # QAT with feature distillation
    run_teacher = teacher if callable(teacher) else _teacher(teacher or reference)
    device = resolve_device(config.device)
    qat.to(device)
    log.info("%s on %s", what, device)
    val: dict[str, np.ndarray] | None = None
    if config.validation > 0:
        held, keep = validation_split(n, config)
        val = {name: v[held] for name, v in arrays.items()}
        arrays = {name: v[keep] for name, v in arrays.items()}
        labels = labels[keep] if labels is not None else None
        n = len(keep)
    images = {k for k, v in arrays.items() if _is_image(v)} if config.augment != "none" else set()

    weights = qat.weight_parameters()
    ranges = qat.range_parameters()
    groups = [{"params": weights, "lr": config.lr, "weight_decay": config.weight_decay}]
    if ranges:
        groups.append({"params": ranges, "lr": config.range_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    steps_per_epoch = -(-n // config.batch_size)
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warm = max(1, int(config.warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    start_epoch, step, history = 0, 0, []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (val loss, epoch, state)
    val_loss = _validation(qat, val, run_teacher, config, n_outputs, device) if val is not None else None
    if ckpt is not None and config.resume and (ckpt / "last.pt").exists():
        state = torch.load(ckpt / "last.pt", weights_only=False, map_location="cpu")
        qat.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        best = state.get("best")
        log.info("resumed from %s (epoch %d, step %d)", ckpt / "last.pt", start_epoch, step)

    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    y_all = torch.from_numpy(labels) if labels is not None else None
    alpha = config.label_weight if labels is not None else 0.0
    qat.train()
    if val_loss is not None and best is None:  # the starting point competes too
        best = (val_loss(), 0, {k: v.detach().clone() for k, v in qat.state_dict().items()})
    for epoch in range(start_epoch, config.epochs):
        if step >= total:
            break
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        bar = None
        if config.progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=min(steps_per_epoch, total - step), desc=f"{what} epoch {epoch + 1}",
                           unit="step", leave=False)
            except ImportError:
                bar = None
        running, seen = 0.0, 0
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
            feeds = {}
            mix = _mixing(len(idx), gen) if images and config.augment == "match" else None
            for k in names:
                x = tensors[k][idx]
                feeds[k] = _augment(x, config.augment, config.shift, gen, mix) if k in images else x
            target = run_teacher({k: v.numpy() for k, v in feeds.items()})
            feeds = {k: v.to(device) for k, v in feeds.items()}
            out = qat(feeds)
            outs = out if isinstance(out, tuple) else (out,)
            terms = [_distill_loss(s, torch.from_numpy(np.asarray(t)).to(device), config.distill,
                                   config.temperature)
                     for s, t in zip(outs, target)]
            loss = sum(terms[:n_outputs])
            if len(terms) > n_outputs:  # intermediate features (FloatStudent(anchors=...)): their mean
                loss = loss + feature_weight * sum(terms[n_outputs:]) / (len(terms) - n_outputs)
            loss = loss * (1 - alpha)
            if alpha:
                y = y_all[idx].to(device)  # type: ignore[index]
                if mix is None:
                    loss = loss + alpha * F.cross_entropy(outs[0], y)
                else:  # mixed images, mixed labels
                    lam = mix[0].to(device, outs[0].dtype)
                    ce = lam * F.cross_entropy(outs[0], y, reduction="none") + (1 - lam) * \
                        F.cross_entropy(outs[0], y[mix[1]], reduction="none")
                    loss = loss + alpha * ce.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running / seen:.4f}")
        if bar is not None:
            bar.close()
        entry = {"epoch": epoch + 1, "loss": running / max(seen, 1), "steps": step,
                 "seconds": time.time() - t0}
        if val_loss is not None:
            entry["val_loss"] = val_loss()
            if best is None or entry["val_loss"] < best[0]:
                best = (entry["val_loss"], epoch + 1, {k: v.detach().clone() for k, v in qat.state_dict().items()})
        if callback is not None:
            qat.eval()
            entry.update(callback(epoch + 1, entry) or {})
            qat.train()
        history.append(entry)
        log.info("%s epoch %d/%d: %s", what, epoch + 1, config.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "epoch"))
        if ckpt is not None:
            ckpt.mkdir(parents=True, exist_ok=True)
            state = {"model": qat.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "generator": gen.get_state(),
                     "epoch": epoch + 1, "step": step, "history": history, "best": best}
            tmp = ckpt / "last.pt.tmp"
            torch.save(state, tmp)
            os.replace(tmp, ckpt / "last.pt")
            torch.save(state, ckpt / f"epoch{epoch + 1}.pt")
    if best is not None:
        qat.load_state_dict(best[2])
        log.info("%s: kept the weights of epoch %d (validation loss %.4g)", what, best[1], best[0])
    qat.eval()
    return history


def validation_split(n: int, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, training) sample indices for ``config.validation`` of ``n`` samples (seeded)."""
    k = max(1, int(round(n * config.validation)))
    if k >= n:
        raise ConfigError(f"validation {config.validation} leaves no training samples of {n}")
    order = np.random.default_rng(config.seed).permutation(n)
    return np.sort(order[:k]), np.sort(order[k:])


def _validation(qat: Any, val: Mapping[str, np.ndarray], run_teacher: Callable, config: TrainConfig,
                n_outputs: int, device: torch.device) -> Callable[[], float]:
    """A function returning the mean distillation loss of ``qat``'s outputs on ``val`` (teacher
    outputs computed once, no augmentation, evaluation mode)."""
    size = config.batch_size
    count = len(next(iter(val.values())))
    chunks = [{k: v[i:i + size] for k, v in val.items()} for i in range(0, count, size)]
    targets = [[torch.from_numpy(np.asarray(t)).to(device) for t in run_teacher(c)][:n_outputs]
               for c in chunks]

    def loss() -> float:
        was_training = qat.training
        qat.eval()
        total = 0.0
        with torch.no_grad():
            for chunk, target in zip(chunks, targets):
                out = qat({k: torch.from_numpy(v).to(device) for k, v in chunk.items()})
                outs = (out if isinstance(out, tuple) else (out,))[:n_outputs]
                total += float(sum(_distill_loss(o, t, config.distill, config.temperature)
                                   for o, t in zip(outs, target))) * len(next(iter(chunk.values())))
        qat.train(was_training)
        return total / count

    return loss


class FloatStudent(torch.nn.Module):
    """A float ONNX model as a trainable module for :func:`fit` (no quantizers): every float
    weight an ``nn.Parameter`` named by its ONNX tensor; :meth:`write_back` puts them into the
    model.

    ``anchors``: names of intermediate tensors returned after the graph outputs (the same names
    must exist in the teacher, which :func:`distill` exposes too); :func:`fit` adds the mean of
    their normalized MSEs, times ``feature_weight``, to the loss on the outputs.
    """

    def __init__(self, model: Any, anchors: Sequence[str] = (), feature_weight: float = 1.0) -> None:
        from onnxq.train.executor import GraphModule

        super().__init__()
        self.model = model
        self.anchors = list(anchors)
        self.n_outputs = len(model.graph.outputs)
        self.feature_weight = feature_weight
        self.graph = GraphModule(_with_outputs(model, self.anchors) if self.anchors else model)

    @property
    def input_names(self) -> list[str]:
        return self.graph.input_names

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph(*args, **kwargs)

    def weight_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.graph.params.values() if p.requires_grad]

    def range_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def write_back(self) -> int:
        """Write the trained weights into ``self.model``; returns how many were written."""
        from onnxq.passes._graph import set_constant

        values = self.model.graph.initializers
        written = 0
        for name, param in self.graph.named_onnx_parameters().items():
            if name in values:
                set_constant(values[name], param.detach().cpu().numpy())
                written += 1
        return written


def _with_outputs(model: Any, names: Sequence[str]) -> Any:
    """A copy of ``model`` that also outputs ``names`` (after its own outputs)."""
    work = model.clone()
    produced = {v.name: v for node in work.graph for v in node.outputs if v.name}
    work.graph.outputs.extend(produced[n] for n in names if produced[n] not in work.graph.outputs)
    return work


def same_named_outputs(student: Any, teacher: Any, ops: tuple[str, ...]) -> list[str]:
    """Outputs of ``ops`` nodes of ``student`` that ``teacher``'s ``ops`` nodes also produce
    (by name; not the student's graph outputs), in the student's order, with shapes that do not
    disagree where both graphs declare them."""
    def outputs(model: Any) -> dict[str, Any]:
        return {v.name: v for node in model.graph if node.op_type in ops for v in node.outputs if v.name}

    mine, theirs = outputs(student), outputs(teacher)
    graph_outputs = {v.name for v in student.graph.outputs}
    names = []
    for name, value in mine.items():
        other = theirs.get(name)
        if other is None or name in graph_outputs:
            continue
        if value.shape is not None and other.shape is not None and list(value.shape) != list(other.shape):
            continue
        names.append(name)
    return names


def shared_features(student: Any, teacher: Any, sample: Mapping[str, np.ndarray],
                    ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "Add")) -> list[str]:
    """Outputs of ``ops`` nodes that exist under the same name and with the same shape (on
    ``sample``) in both models, in the student's order: the intermediate tensors a compressed
    model can be distilled on."""
    from onnxq.runtime.session import create_session

    names = same_named_outputs(student, teacher, ops)
    if not names:
        return []
    shapes = []
    for model in (student, teacher):
        session = create_session(_with_outputs(model, names), optimize=False)
        shapes.append(dict(zip(names, (a.shape for a in session.run(names, dict(sample))))))
    return [n for n in names if shapes[0][n] == shapes[1][n]]


def distill(student: Any, teacher: Any, data: Any, config: TrainConfig = TrainConfig(),
            labels: np.ndarray | None = None, *, features: bool | Sequence[str] = False,
            feature_weight: float = 1.0) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a **float** ONNX model (``onnx_ir.Model``, changed in place) by distillation from
    ``teacher`` (an ``onnx_ir.Model`` with the same inputs and outputs, e.g. before compression)
    with :func:`fit`'s loop; returns ``(student, info)``.

    ``features=True`` also matches the intermediate tensors both models share
    (:func:`shared_features`: Conv/Gemm/MatMul/Add outputs with the same name and shape), or the
    tensors named, so that every image constrains every layer and not only the outputs. Measured
    on EfficientNet-Lite0 pruned to 75 % MACs with 205 images: no gain (top-1 0.689 with, 0.684
    without, 0.689 untuned; ``benchmarks/compress.py --finetune-features``)."""
    anchors: list[str] = []
    if features:
        if isinstance(features, bool):
            data = load_training_data(data, student)  # loaded once, for the probe and for fit
            anchors = shared_features(student, teacher, {k: v[:1] for k, v in data.items()})
        else:
            anchors = list(features)
    module = FloatStudent(student, anchors, feature_weight)
    if not module.weight_parameters():
        return student, {"status": "skipped", "reason": "no trainable float weights"}
    run_teacher = _teacher(_with_outputs(teacher, anchors) if anchors else teacher)
    history = fit(module, data, labels, config, teacher=run_teacher)
    return student, {"status": "done", "epochs": config.epochs, "weights": module.write_back(),
                     "features": len(anchors), "history": history}


def run_qat(
    model: Any,
    data: Any,
    out_dir: str | os.PathLike,
    *,
    labels: np.ndarray | None = None,
    config: Any = "default",
    passes: Any = "fold-bn",
    adaround: Any = None,
    learn_ranges: bool = True,
    train: TrainConfig = TrainConfig(),
    calibration_limit: int | None = 256,
    features: bool | Sequence[str] = False,
    feature_weight: float = 1.0,
) -> dict[str, Any]:
    """File to file: quantize ``model`` (calibrating on the first ``calibration_limit`` samples
    of ``data``, optionally with AdaRound), prepare, train by distillation, export to ``out_dir``.

    Nothing is written to ``out_dir`` unless training finished (checkpoints go to
    ``train.checkpoint_dir``). ``features`` / ``feature_weight``: feature distillation (see
    :func:`onnxq.train.prepare`). Returns ``{"paths": …, "history": …}``.
    """
    import onnxq
    from onnxq.train.qat import prepare

    float_model = onnxq.load(model)
    arrays = load_training_data(data, float_model)
    n = len(next(iter(arrays.values())))
    # the held-out samples stay out of calibration (and AdaRound) too, or they would not be held out
    usable = validation_split(n, train)[1] if train.validation > 0 else np.arange(n)
    first = usable[:min(len(usable), calibration_limit or len(usable))]
    calib = [{name: v[first[i:i + 32]] for name, v in arrays.items()} for i in range(0, len(first), 32)]
    sim = onnxq.quantize(float_model, calib, config=config, passes=passes, adaround=adaround)
    module = prepare(sim, learn_ranges=learn_ranges, features=features, feature_weight=feature_weight)
    history = fit(module, arrays, labels, train)
    paths = module.export(out_dir, Path(str(model)).stem if isinstance(model, (str, os.PathLike)) else "model")
    return {"paths": paths, "history": history, "sim": sim}
