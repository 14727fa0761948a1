"""Fine-tuning a compressed float model by distillation from the uncompressed one (optional, torch).

The student is the compressed ONNX graph itself, run in torch by ``onnxq.train``'s executor
(``GraphModule``: every float weight an ``nn.Parameter`` keyed by its ONNX name), so the trained
weights are written straight back into the same IR model: no second model, no name mapping.
Each step draws a batch of the calibration samples, runs the teacher (the uncompressed model,
onnxruntime) and the student, and minimizes

    L = T²·KL(softmax(t/T) ‖ softmax(s/T))   for [N, C] outputs (classifier logits),
    L = ‖s − t‖² / Var(t)                      otherwise (feature maps, embeddings)

with AdamW and a cosine learning-rate schedule after a short linear warm-up; image inputs
(NCHW, 1 or 3 channels) get a random horizontal flip. When ``onnxq.train`` offers its own
``distill(student, teacher, data, epochs=, seed=)``, that is used instead.

Importing this module imports nothing heavy; torch is imported when :func:`distill` runs.
"""

from __future__ import annotations

__all__ = ["distill", "finetune_available"]

import logging
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxq.passes._graph import set_constant

log = logging.getLogger(__name__)


def finetune_available() -> str | None:
    """None when fine-tuning can run, else why not."""
    try:
        import torch  # noqa: F401

        from onnxq.train.executor import GraphModule  # noqa: F401
    except ImportError as exc:
        return f"fine-tuning needs onnxq.train and torch ({exc})"
    return None


def _arrays(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    names = list(batches[0])
    return {n: np.concatenate([b[n] for b in batches]) for n in names}


def distill(student: ir.Model, teacher: ir.Model, batches: Sequence[Mapping[str, np.ndarray]], *,
            epochs: int, lr: float = 1e-4, batch_size: int = 32, temperature: float = 1.0,
            seed: int = 0, warmup: float = 0.05) -> tuple[ir.Model, dict]:
    """Train ``student``'s float weights in place by distillation from ``teacher``; returns the
    student and a log (per-epoch loss, seconds)."""
    import torch
    import torch.nn.functional as F

    from onnxq.runtime.session import create_session
    from onnxq.train.executor import GraphModule

    module = GraphModule(student)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return student, {"status": "skipped", "reason": "no trainable float weights"}
    arrays = _arrays(batches)
    n = len(next(iter(arrays.values())))
    teacher_session = create_session(teacher, optimize=True)
    steps_per_epoch = max(1, -(-n // batch_size))
    total = epochs * steps_per_epoch
    warm = max(1, int(warmup * total))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images = {k for k, v in arrays.items() if v.ndim == 4 and v.shape[1] in (1, 3) and v.shape[-1] >= 16}
    history = []
    module.train()
    for epoch in range(epochs):
        start, running, seen = time.perf_counter(), 0.0, 0
        order = gen.permutation(n)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            feeds = {}
            for k, v in arrays.items():
                x = v[idx]
                if k in images:
                    flip = gen.random(len(idx)) < 0.5
                    x = np.where(flip[:, None, None, None], x[..., ::-1], x)
                feeds[k] = np.ascontiguousarray(x)
            targets = teacher_session.run(None, feeds)
            out = module({k: torch.from_numpy(v) for k, v in feeds.items()})
            outs = out if isinstance(out, tuple) else (out,)
            loss = 0.0
            for s, t in zip(outs, targets):
                t = torch.from_numpy(np.asarray(t, np.float32))
                if s.ndim == 2:
                    loss = loss + temperature ** 2 * F.kl_div(
                        F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        reduction="batchmean", log_target=True)
                else:
                    loss = loss + F.mse_loss(s, t) / (t.var() + 1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
        entry = {"epoch": epoch + 1, "loss": running / max(seen, 1), "seconds": time.perf_counter() - start}
        history.append(entry)
        log.info("fine-tune epoch %d/%d: loss %.4g (%.0f s)", epoch + 1, epochs, entry["loss"], entry["seconds"])
    module.eval()
    values = {v.name: v for v in student.graph.initializers.values()}
    written = 0
    for onnx_name, key in module.param_names.items():
        value = values.get(onnx_name)
        if value is None or key not in module.params:
            continue
        set_constant(value, module.params[key].detach().cpu().numpy())
        written += 1
    return student, {"status": "done", "epochs": epochs, "weights": written, "history": history}
