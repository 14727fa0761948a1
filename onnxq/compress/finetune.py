"""Fine-tuning a compressed float model by distillation from the uncompressed one (optional, torch).

The loop is ``onnxq.train``'s (:func:`onnxq.train.distill`): the student is the compressed ONNX
graph itself, run in torch by the graph executor (every float weight an ``nn.Parameter`` keyed
by its ONNX name), so the trained weights go straight back into the same IR model. Each step
runs the teacher (the uncompressed model, onnxruntime) and the student on the same augmented
batch and minimizes ``T²·KL`` on classifier logits, a normalized MSE otherwise.

Importing this module imports nothing heavy.
"""

from __future__ import annotations

__all__ = ["finetune_available"]


def finetune_available() -> str | None:
    """None when fine-tuning can run, else why not."""
    try:
        import torch  # noqa: F401

        from onnxq.train import distill  # noqa: F401
    except ImportError as exc:
        return f"fine-tuning needs onnxq.train and torch: pip install 'onnxq[train]' ({exc})"
    return None
