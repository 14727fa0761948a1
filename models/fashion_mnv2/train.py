"""Train the small MobileNetV2-style Fashion-MNIST classifier bundled for ``onnxq demo``.

One command regenerates both bundled files, bit for bit on the same software stack::

    apt-get update && apt-get install -y dataset-fashion-mnist  # /usr/share/datasets/fashion-mnist
    pip install torch==2.13.0                                    # CPU build, only for this script
    python models/fashion_mnv2/train.py                          # [--epochs N]

It writes onnxq/demo/fashion_mnv2.onnx and onnxq/demo/fashion_test.npz.

``--verify-only`` skips training and re-runs the onnxruntime check (FP32 vs weight-only INT8 with
per-tensor and per-channel scales, BatchNorm folded in numpy) on the files already in onnxq/demo/;
it does not import torch.

Model input: float32 NCHW [N, 1, 28, 28] holding ``(x / 255 - 0.5) / 0.5`` of the uint8 image x,
i.e. values in [-1, 1]; no normalisation inside the graph. Input "image", output "logits" [N, 10].
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = REPO / "onnxq" / "demo"
ONNX_PATH = OUT_DIR / "fashion_mnv2.onnx"
NPZ_PATH = OUT_DIR / "fashion_test.npz"
N_TEST_BUNDLED = 2000  # first 2000 images of the official 10k test set (classes 188..219 each)

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Stem: 3x3 conv 1->16, stride 2 (28x28 -> 14x14).
# Inverted-residual blocks: (expansion t, output channels c, stride s).
BLOCKS = (
    (4, 24, 1),  # 14x14
    (4, 24, 1),  # 14x14, residual
    (4, 32, 2),  # 14x14 -> 7x7
    (4, 32, 1),  # 7x7, residual
    (4, 64, 1),  # 7x7
)
STEM_CHANNELS = 16
STEM_STRIDE = 2
HEAD_CHANNELS = 128


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def _read_idx(name: str) -> np.ndarray:
    path = DATA_DIR / name
    if not path.exists():
        sys.exit(f"{path} not found: apt-get update && apt-get install -y dataset-fashion-mnist")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        _read_idx("train-images-idx3-ubyte.gz"),
        _read_idx("train-labels-idx1-ubyte.gz"),
        _read_idx("t10k-images-idx3-ubyte.gz"),
        _read_idx("t10k-labels-idx1-ubyte.gz"),
    )


def preprocess(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] = (x / 255 - 0.5) / 0.5."""
    x = images_u8.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


# ----------------------------------------------------------------------------------------------
# model + training (torch)
# ----------------------------------------------------------------------------------------------


def build_model():
    from torch import nn

    def conv_bn(cin, cout, k, stride=1, groups=1, act=True):
        layers = [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU6())
        return layers

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, t, stride):
            super().__init__()
            hidden = cin * t
            self.use_res = stride == 1 and cin == cout
            self.conv = nn.Sequential(
                *conv_bn(cin, hidden, 1),  # expand
                *conv_bn(hidden, hidden, 3, stride, groups=hidden),  # depthwise
                *conv_bn(hidden, cout, 1, act=False),  # project (linear)
            )

        def forward(self, x):
            y = self.conv(x)
            return x + y if self.use_res else y

    class FashionMobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            layers = conv_bn(1, STEM_CHANNELS, 3, STEM_STRIDE)
            cin = STEM_CHANNELS
            for t, c, s in BLOCKS:
                layers.append(InvertedResidual(cin, c, t, s))
                cin = c
            layers += conv_bn(cin, HEAD_CHANNELS, 1)
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(HEAD_CHANNELS, 10)

        def forward(self, x):
            x = self.pool(self.features(x))
            return self.classifier(x.flatten(1))

    return FashionMobileNetV2()


def train(args) -> tuple[object, float]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    try:  # glibc: keep freed activation buffers instead of mmap/munmap-ing them each step (~20%)
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling costs ~20% on CPU
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    xtr_u8, ytr, xte_u8, yte = load_fashion_mnist()
    xtr = torch.from_numpy(preprocess(xtr_u8))
    ytr_t = torch.from_numpy(ytr.astype(np.int64))
    xte = torch.from_numpy(preprocess(xte_u8))
    yte_t = torch.from_numpy(yte.astype(np.int64))

    model = build_model()
    # Weight decay only on the dense (stem / 1x1 / linear) weights: none on depthwise kernels and
    # none on BatchNorm gamma/beta (the usual MobileNet recipe). Together with the high peak
    # learning rate this makes the model hostile to per-tensor INT8, as big MobileNetV2s are: the
    # early high-LR phase kills a few 1x1-expand channels (ReLU6 output constant), the depthwise
    # conv after such a channel outputs a constant, its BN running variance is ~0, and folding BN
    # multiplies that (never-decayed) depthwise kernel by gamma/sqrt(eps) ~ 300. That one channel
    # sets the per-tensor scale of the layer and rounds all the others to a few levels.
    decay, no_decay = [], []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 or isinstance(mod, nn.Linear):
            decay.append(mod.weight)
            no_decay += [p for n, p in mod.named_parameters(recurse=False) if n != "weight"]
        else:
            no_decay += list(mod.parameters(recurse=False))
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if args.opt == "adam":  # Adam with classic (coupled) L2 weight decay
        opt = torch.optim.Adam(groups, lr=args.lr)
    elif args.opt == "adamw":
        opt = torch.optim.AdamW(groups, lr=args.lr)
    else:
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = (len(xtr) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=args.lr,
        total_steps=args.epochs * steps_per_epoch,
        pct_start=args.warmup,
        anneal_strategy="cos",
    )
    gen = torch.Generator().manual_seed(args.seed)

    def evaluate():
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(xte), 1000):
                correct += (model(xte[i : i + 1000]).argmax(1) == yte_t[i : i + 1000]).sum().item()
        model.train()
        return correct / len(xte)

    t0 = time.time()
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        total_loss = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            xb, yb = xtr[idx], ytr_t[idx]
            # augmentation: random horizontal flip + random shift of up to 2 px (zero = -1 padding)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = F.pad(xb, (2, 2, 2, 2), value=-1.0)[:, :, 2 + dy : 30 + dy, 2 + dx : 30 + dx]
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item()
        acc = evaluate()
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {total_loss / steps_per_epoch:.4f}  "
            f"test acc (10k) {acc:.4f}  [{time.time() - t0:.0f}s]",
            flush=True,
        )
    model.eval()
    return model, time.time() - t0


def export(model, path: Path) -> None:
    import onnx
    import torch

    model.eval()
    dummy = torch.from_numpy(preprocess(np.zeros((2, 28, 28), np.uint8)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        dynamo=False,
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    m = onnx.load(str(tmp))
    tmp.unlink()
    # The legacy exporter deduplicates identical initializers by inserting Identity nodes; turn any
    # Identity of an initializer back into a plain initializer (graph: Conv/BN/Clip/... only).
    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for node in m.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.doc_string = ""
    m.graph.doc_string = ""
    for node in m.graph.node:
        node.doc_string = ""
        if node.op_type == "BatchNormalization":
            assert len(node.output) == 1, "BatchNormalization must be inference-form"
            assert all(a.i == 0 for a in node.attribute if a.name == "training_mode")
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))

    # exported graph == torch eval
    import onnxruntime as ort

    x = preprocess(load_fashion_mnist()[2][:256])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )[0]
    err = float(np.abs(ref - got).max())
    print(
        f"onnxruntime vs torch eval, 256 images: max |diff| = {err:.2e} "
        f"(max |logit| {np.abs(ref).max():.1f})"
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def write_test_set(path: Path) -> None:
    _, _, xte, yte = load_fashion_mnist()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # file handle: keeps np.savez_compressed from appending ".npz"
        np.savez_compressed(
            f, images=xte[:N_TEST_BUNDLED].copy(), labels=yte[:N_TEST_BUNDLED].copy()
        )


# ----------------------------------------------------------------------------------------------
# verification with onnxruntime only: FP32, weight-only INT8 per-tensor / per-channel (BN folded)
# ----------------------------------------------------------------------------------------------


def fold_bn(model):
    """Copy of ``model`` with every Conv -> BatchNormalization pair folded: W' = W*g/sqrt(v+eps)."""
    import onnx
    from onnx import numpy_helper as nh

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: nh.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    n_consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            n_consumers[i] = n_consumers.get(i, 0) + 1
    bns = [n for n in g.node if n.op_type == "BatchNormalization"]
    for bn in bns:
        conv = producer.get(bn.input[0])
        assert conv is not None and conv.op_type == "Conv" and n_consumers[bn.input[0]] == 1
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (inits[name].astype(np.float64) for name in bn.input[1:5])
        w = inits[conv.input[1]].astype(np.float64)
        b = (
            inits[conv.input[2]].astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else 0.0
        )
        s = gamma / np.sqrt(var + np.float64(eps))
        wname, bname = bn.output[0] + "_W_folded", bn.output[0] + "_B_folded"
        g.initializer.append(nh.from_array((w * s[:, None, None, None]).astype(np.float32), wname))
        g.initializer.append(nh.from_array(((b - mean) * s + beta).astype(np.float32), bname))
        data = conv.input[0]
        del conv.input[:]
        conv.input.extend([data, wname, bname])
        conv.output[0] = bn.output[0]
        g.node.remove(bn)
    used = {i for n in g.node for i in n.input}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return m


def quantize_weights(model, per_channel: bool):
    """Weight-only symmetric round-to-nearest INT8 of Conv/Gemm weights, dequantized to float."""
    import onnx
    from onnx import numpy_helper as nh

    m = onnx.ModelProto()
    m.CopyFrom(model)
    targets = {n.input[1] for n in m.graph.node if n.op_type in ("Conv", "Gemm")}
    for t in m.graph.initializer:
        if t.name not in targets:
            continue
        w = nh.to_array(t).astype(np.float32)
        # Conv weight [O, I/g, kh, kw] and Gemm B with transB=1 [O, I]: output channel is axis 0
        amax = np.abs(w).reshape(w.shape[0], -1).max(1) if per_channel else np.abs(w).max()
        scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
        if per_channel:
            scale = scale.reshape((-1,) + (1,) * (w.ndim - 1))
        q = np.clip(np.round(w / scale), -127, 127)
        t.CopyFrom(nh.from_array((q * scale).astype(np.float32), t.name))
    return m


def accuracy(model, images_u8, labels) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": preprocess(images_u8)})[0]
    return float((logits.argmax(1) == labels).mean())


def verify(onnx_path: Path = ONNX_PATH, npz_path: Path = NPZ_PATH) -> dict[str, float]:
    import onnx

    model = onnx.load(str(onnx_path))
    data = np.load(npz_path)
    x, y = data["images"], data["labels"]
    folded = fold_bn(model)
    res = {
        "fp32": accuracy(model, x, y),
        "fp32_bn_folded": accuracy(folded, x, y),
        "int8_w_per_tensor": accuracy(quantize_weights(folded, per_channel=False), x, y),
        "int8_w_per_channel": accuracy(quantize_weights(folded, per_channel=True), x, y),
    }
    print(f"onnxruntime on {len(y)} bundled test images ({npz_path.name}):")
    for k, v in res.items():
        print(f"  {k:<20s} {100 * v:6.2f} %")
    for name, p in (("onnx", onnx_path), ("npz", npz_path)):
        print(
            f"  {name}: {p.stat().st_size} bytes  "
            f"sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument(
        "--lr", type=float, default=0.5, help="peak learning rate of the one-cycle cosine schedule"
    )
    ap.add_argument(
        "--warmup", type=float, default=0.05, help="fraction of the steps spent warming up"
    )
    ap.add_argument(
        "--opt", choices=("sgd", "adam", "adamw"), default="sgd", help="sgd: momentum 0.9, Nesterov"
    )
    ap.add_argument(
        "--wd", type=float, default=5e-5, help="weight decay of dense conv/linear weights only"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument(
        "--verify-only", action="store_true", help="skip training; check the existing files"
    )
    args = ap.parse_args()
    onnx_path, npz_path = args.out_dir / ONNX_PATH.name, args.out_dir / NPZ_PATH.name
    if not args.verify_only:
        model, seconds = train(args)
        print(f"training took {seconds:.0f} s")
        export(model, onnx_path)
        write_test_set(npz_path)
    verify(onnx_path, npz_path)


if __name__ == "__main__":
    main()
