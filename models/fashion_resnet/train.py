"""Train the small Fashion-MNIST ResNet used by the QAT benchmark (``benchmarks/qat.py``).

One command writes ``models/fashion_resnet/fashion_resnet.onnx`` (FP32, opset 17, BatchNormalization
kept, ~0.7 MB, committed)::

    apt-get update && apt-get install -y dataset-fashion-mnist  # /usr/share/datasets/fashion-mnist
    pip install torch==2.13.0                                    # CPU build, only for this script
    python models/fashion_resnet/train.py                        # [--epochs N] [--seed S]

Architecture (14 weight layers): stem Conv3x3 1→16 stride 2 + BN + ReLU (28→14), three stages of
two BasicBlocks (Conv3x3 + BN + ReLU, Conv3x3 + BN, residual Add, ReLU; a 1x1 Conv + BN shortcut
where the shape changes) with 16, 32, 64 channels and strides 1, 2, 2 (14→7→4), global average
pool, Linear 64→10. Input ``image`` float32 [N, 1, 28, 28] = ``(u8 / 255 − 0.5) / 0.5``, output
``logits`` [N, 10] (the same preprocessing as the demo model in ``models/fashion_mnv2``).

Training: SGD with Nesterov momentum, one-cycle cosine schedule, random flip + 2-pixel shift,
``torch.use_deterministic_algorithms(True)``, one thread by default, seeded.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "fashion_resnet.onnx"
STAGES = ((16, 1), (32, 2), (64, 2))  # (channels, stride of the first block)
BLOCKS_PER_STAGE = 2

log = logging.getLogger("fashion_resnet")


def _mnv2() -> ModuleType:
    """The demo model's script: Fashion-MNIST reading and preprocessing are shared."""
    spec = importlib.util.spec_from_file_location(
        "fashion_mnv2_train", HERE.parent / "fashion_mnv2" / "train.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images u8 [60000, 28, 28], train labels, test images [10000, 28, 28], labels)."""
    return _mnv2().load_fashion_mnist()


def preprocess(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] → float32 [N, 1, 28, 28] = (x / 255 − 0.5) / 0.5."""
    return _mnv2().preprocess(images_u8)


def build_model() -> Any:
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.shortcut: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + self.shortcut(x))

    class FashionResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c0 = STAGES[0][0]
            layers: list[nn.Module] = [
                nn.Conv2d(1, c0, 3, 2, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU()
            ]
            cin = c0
            for cout, stride in STAGES:
                for i in range(BLOCKS_PER_STAGE):
                    layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                    cin = cout
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(cin, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.pool(self.features(x)).flatten(1))

    return FashionResNet()


def train(args: argparse.Namespace) -> tuple[Any, float]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.manual_seed(args.seed)
    xtr_u8, ytr, xte_u8, yte = load_fashion_mnist()
    xtr = torch.from_numpy(preprocess(xtr_u8))
    ytr_t = torch.from_numpy(ytr.astype(np.int64))
    xte = torch.from_numpy(preprocess(xte_u8))
    yte_t = torch.from_numpy(yte.astype(np.int64))

    model = build_model()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, momentum=0.9, nesterov=True,
    )
    steps = (len(xtr) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps, pct_start=0.15,
        anneal_strategy="cos",
    )
    gen = torch.Generator().manual_seed(args.seed)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(xte[i:i + 1000]).argmax(1) == yte_t[i:i + 1000]).sum())
                for i in range(0, len(xte), 1000)
            )
        model.train()
        return correct / len(xte)

    t0 = time.time()
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(steps):
            idx = perm[i * args.batch:(i + 1) * args.batch]
            xb, yb = xtr[idx], ytr_t[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = F.pad(xb, (2, 2, 2, 2), value=-1.0)[:, :, 2 + dy:30 + dy, 2 + dx:30 + dx]
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        log.info("epoch %d/%d  loss %.4f  test acc (10k) %.4f  [%.0fs]", epoch + 1, args.epochs,
                 total / steps, evaluate(), time.time() - t0)
    model.eval()
    return model, time.time() - t0


def export(model: Any, path: Path) -> float:
    """Write the ONNX file (legacy exporter, BatchNormalization kept) and check it against torch;
    returns the onnxruntime test accuracy on the 10k test images."""
    import onnx
    import onnxruntime as ort
    import torch

    dummy = torch.from_numpy(preprocess(np.zeros((2, 28, 28), np.uint8)))
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model, (dummy,), str(tmp), dynamo=False, opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    m = onnx.load(str(tmp))
    tmp.unlink()
    m.doc_string = m.graph.doc_string = ""
    for node in m.graph.node:
        node.doc_string = ""
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    _, _, xte_u8, yte = load_fashion_mnist()
    x = preprocess(xte_u8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"image": x[i:i + 1000]})[0] for i in range(0, len(x), 1000)])
    with torch.no_grad():
        ref = model(torch.from_numpy(x[:256])).numpy()
    np.testing.assert_allclose(got[:256], ref, rtol=1e-4, atol=1e-4)
    return float((got.argmax(1) == yte).mean())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.2, help="peak learning rate (one-cycle cosine)")
    ap.add_argument("--wd", type=float, default=5e-4, help="weight decay of conv/linear weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine two threads spin-wait on "
                    "each other and run ~9x slower)")
    ap.add_argument("--out", type=Path, default=ONNX_PATH)
    args = ap.parse_args()
    model, seconds = train(args)
    acc = export(model, args.out)
    log.info("training took %.0f s; onnxruntime test accuracy (10k) %.4f; wrote %s (%d bytes)",
             seconds, acc, args.out, args.out.stat().st_size)


if __name__ == "__main__":
    main()
