"""Quantization-aware training of an ONNX model (optional: needs ``pip install onnxq[train]``).

``import onnxq`` never imports this package (nor torch). Here::

    qat = onnxq.train.prepare(sim, learn_ranges=True)   # torch.nn.Module over sim.model itself
    ...train qat with any torch loop, or onnxq.train.fit(...)...
    qat.export("out/")                                  # QDQ model, float model, encodings

Modules: :mod:`~onnxq.train.ops` (op registry), :mod:`~onnxq.train.fake_quant`,
:mod:`~onnxq.train.executor` (the graph as a module), :mod:`~onnxq.train.qat` (prepare/export),
:mod:`~onnxq.train.loop` (distillation loop; ``run_qat`` is ``onnxq qat`` file to file).

Measured (``benchmarks/qat.py``, Fashion-MNIST ResNet, W4A4 per-channel, 2 epochs of
distillation without labels, one thread): FP32 91.07 %, nearest 59.26 %, AdaRound 88.54 %, QAT
fixed ranges 89.97 % (159 s), QAT range learning 90.62 % (244 s). The exported QDQ model and
the torch module agree on all 10k test images (output SQNR 139 dB).

Torch threads: on a machine whose cores are shared with other processes, use
``torch.set_num_threads(1)``: two OpenMP threads that spin-wait on each other made a QAT step
~10x slower here.
"""

from __future__ import annotations

__all__ = ["FloatStudent", "GraphModule", "QatModel", "TrainConfig", "distill", "fit", "load_training_data", "prepare",
           "run_qat"]

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from onnxq.errors import ConfigError

    raise ConfigError(
        "onnxq.train needs torch: pip install 'onnxq[train]' (CPU build: pip install torch==2.13.0)"
    ) from exc

from onnxq.train.executor import GraphModule
from onnxq.train.loop import FloatStudent, TrainConfig, distill, fit, load_training_data, run_qat
from onnxq.train.qat import QatModel, prepare
