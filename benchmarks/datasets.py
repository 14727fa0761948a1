"""Evaluation harnesses on real data: ImageNet top-k, PP-OCR recognition CER, MiniLM retrieval.

Models run under onnxruntime (CPU). A model is a path, serialized bytes, an ``onnx.ModelProto``, an
``onnx_ir.Model`` or a ready ``onnxruntime.InferenceSession``. Preprocessed data is cached in
``<cache>/data/`` (see ``benchmarks.assets.cache_dir``).

ImageNet sample
    ``<shared>/data/imagenet-sample/``: 500 images and ``labels.csv`` (``file,class_index,wnid``);
    ``<shared>`` is ``benchmarks.assets.shared_dir()``. EfficientNet-Lite0 preprocessing: RGB,
    shorter side to 256 with PIL bilinear (the long side rounded), centre crop 224,
    ``(x - 127) / 128``, NCHW float32. The uint8 crops are cached.
OCR lines and WordNet need two Debian packages::

        apt-get update && apt-get install -y wordnet-base fonts-dejavu-core

    (``/usr/share/wordnet/data.noun``, ``/usr/share/fonts/truetype/dejavu/``).
PP-OCR recognition
    A line is 1-3 WordNet noun lemmas (underscores to spaces, ASCII letters, digits and `` -'.``
    only) drawn with ``random.Random(seed)``, rendered black on white in one of five DejaVu faces at
    20-36 px with a 4-10 px margin. The recognizer's input is built as rapidocr-onnxruntime 1.4.4's
    ``TextRecognizer`` builds it: lines sorted by aspect ratio, batches of 6, each crop resized to
    height 48 keeping its aspect ratio (PIL bilinear where rapidocr uses cv2.resize), right-padded
    with zeros to ``int(48 * max(320 / 48, widest ratio in the batch))``, ``(x / 255 - 0.5) / 0.5``.
    CTC greedy decoding (repeats merged, blank = index 0) over the model's characters plus a final
    space; predictions are stripped of leading/trailing spaces, then CER = total edit distance /
    total reference characters.
MiniLM retrieval
    ``count`` noun synsets sampled with ``random.Random(seed)``. Query: the synset's first lemma
    (underscores to spaces). Document: its definition, i.e. the gloss without the quoted example
    sentences (``;``-separated parts starting with ``"`` dropped; examples often contain the lemma).
    Embedding: tokenizer.json with its padding removed and truncation at 256 (sentence-transformers'
    max_seq_length), ``last_hidden_state`` mean-pooled over the attention mask, L2-normalised.
    R@1: share of queries whose most similar definition among all ``count`` is their own.

FP32 figures from these harnesses (onnxruntime 1.32, 2-core CPU):

* effnet-lite0 and effnet-lite0-bn, all 500 images: top-1 0.888, top-5 0.970; their argmax agree
  on every image. Truncating the long side (torchvision's rule) instead of rounding gives 0.886.
* ppocr-rec, ``ocr_lines(150, seed=0)`` (3204 characters): CER 0.0; seed 1: 0.00088; seed 2: 0.0.
  35 of the 150 raw decodes start with a space.
* minilm, ``wordnet_gloss_pairs(2000, seed=0)``: R@1 0.3855 (seeds 1-3: 0.381, 0.374, 0.3945).
  With the example sentences left in the documents: 0.407 (seeds 1-3: 0.417, 0.409, 0.426).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Union

import numpy as np

from benchmarks import assets

if TYPE_CHECKING:
    import onnx
    import onnx_ir
    import onnxruntime as ort

__all__ = [
    "DEJAVU_DIR",
    "WORDNET_NOUNS",
    "ModelLike",
    "agreement",
    "character_error_rate",
    "ctc_greedy_decode",
    "edit_distance",
    "embed",
    "gloss_definition",
    "imagenet_dir",
    "imagenet_sample",
    "minilm_retrieval_r1",
    "ocr_lines",
    "ppocr_characters",
    "ppocr_rec_batches",
    "ppocr_rec_cer",
    "ppocr_rec_predict",
    "predictions",
    "preprocess_imagenet",
    "recall_at_1",
    "require_imagenet",
    "require_system_data",
    "session",
    "topk_accuracy",
    "topk_from_logits",
    "wordnet_gloss_pairs",
    "wordnet_synsets",
]

log = logging.getLogger(__name__)

ModelLike = Union[
    str, os.PathLike, bytes, "onnx.ModelProto", "onnx_ir.Model", "ort.InferenceSession"
]

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")
_APT_HINT = "apt-get update && apt-get install -y wordnet-base fonts-dejavu-core"


def _data_cache() -> Path:
    folder = assets.cache_dir() / "data"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _save_npz(file: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically (another process may be reading the same cache)."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(file)


def _skip(reason: str) -> NoReturn:
    import pytest

    pytest.skip(reason)


# --------------------------------------------------------------------------------------------------
# onnxruntime
# --------------------------------------------------------------------------------------------------


def session(model: ModelLike, intra_op_threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for a path, bytes, ``onnx.ModelProto`` or ``onnx_ir.Model``."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    if isinstance(model, (str, os.PathLike)):
        source: str | bytes = os.fspath(model)
    elif isinstance(model, bytes):
        source = model
    elif type(model).__module__.startswith("onnx_ir"):
        import onnx_ir as ir

        source = ir.serde.serialize_model(model).SerializeToString()
    elif hasattr(model, "SerializeToString"):
        source = model.SerializeToString()
    else:
        raise TypeError(
            f"expected a path, bytes, onnx.ModelProto or onnx_ir.Model, got {type(model)!r}"
        )
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _batches(count: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


# --------------------------------------------------------------------------------------------------
# ImageNet sample (EfficientNet-Lite0)
# --------------------------------------------------------------------------------------------------

_IMAGENET_VERSION = "v2-short256-crop224"
_RESIZE, _CROP = 256, 224


def imagenet_dir() -> Path:
    return assets.shared_dir() / "data" / "imagenet-sample"


def require_imagenet() -> Path:
    """For tests: the ImageNet sample folder, or ``pytest.skip``."""
    folder = imagenet_dir()
    if not (folder / "labels.csv").is_file():
        _skip(f"ImageNet sample not found at {folder} (set ONNXQ_SHARED)")
    return folder


def preprocess_imagenet(file: Path) -> np.ndarray:
    """Resize the shorter side to 256 (bilinear), centre-crop 224: uint8 HWC RGB."""
    from PIL import Image

    with Image.open(file) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    if (
        w <= h
    ):  # the long side is rounded (torchvision truncates; rounding reproduces ASSETS.md's 0.888)
        size = (_RESIZE, round(_RESIZE * h / w))
    else:
        size = (round(_RESIZE * w / h), _RESIZE)
    rgb = rgb.resize(size, Image.BILINEAR)
    left = round((size[0] - _CROP) / 2.0)
    top = round((size[1] - _CROP) / 2.0)
    return np.asarray(rgb.crop((left, top, left + _CROP, top + _CROP)), dtype=np.uint8)


def _read_labels(folder: Path) -> list[tuple[str, int]]:
    with (folder / "labels.csv").open(newline="") as f:
        return [(row["file"], int(row["class_index"])) for row in csv.DictReader(f)]


def _imagenet_crops() -> tuple[np.ndarray, np.ndarray]:
    """All crops (uint8 NHWC) and labels, from the cache or computed once."""
    folder = imagenet_dir()
    labels_csv = folder / "labels.csv"
    if not labels_csv.is_file():
        raise FileNotFoundError(
            f"{labels_csv} not found: the ImageNet sample lives in <shared>/data/"
        )
    key = hashlib.sha256(labels_csv.read_bytes()).hexdigest()[:12]
    cached = _data_cache() / f"imagenet-sample-{_IMAGENET_VERSION}-{key}.npz"
    if cached.is_file():
        with np.load(cached) as data:
            return data["pixels"], data["labels"]
    rows = _read_labels(folder)
    log.info("preprocessing %d ImageNet images -> %s", len(rows), cached)
    pixels = np.stack([preprocess_imagenet(folder / name) for name, _ in rows])
    labels = np.array([label for _, label in rows], dtype=np.int64)
    _save_npz(cached, pixels=pixels, labels=labels)
    return pixels, labels


def imagenet_sample(start: int = 0, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images float32 [N, 3, 224, 224] = (x - 127) / 128 and labels int64 [N]."""
    pixels, labels = _imagenet_crops()
    stop = len(labels) if count is None else min(start + count, len(labels))
    images = (pixels[start:stop].astype(np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels[start:stop].copy()


def predictions(model: ModelLike, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The model's first output for every image, concatenated: logits [N, classes]."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: images[s]})[0] for s in _batches(len(images), batch_size)]
    return np.concatenate(outs).astype(np.float32, copy=False)


def topk_from_logits(
    logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    order = np.argsort(-logits, axis=1, kind="stable")
    return {f"top{k}": float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1))) for k in ks}


def topk_accuracy(
    model: ModelLike, images: np.ndarray, labels: np.ndarray, batch_size: int = 32
) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` of the model on ``images``."""
    return topk_from_logits(predictions(model, images, batch_size), labels)


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Fraction of samples where two models' argmax agree."""
    return float(np.mean(np.argmax(logits_a, axis=-1) == np.argmax(logits_b, axis=-1)))


# --------------------------------------------------------------------------------------------------
# WordNet and fonts
# --------------------------------------------------------------------------------------------------


def require_system_data() -> None:
    """For tests: skip unless WordNet and the DejaVu fonts are installed."""
    missing = [str(p) for p in (WORDNET_NOUNS, DEJAVU_DIR) if not p.exists()]
    if missing:
        _skip(f"{', '.join(missing)} missing: {_APT_HINT}")


def _require_file(file: Path) -> Path:
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: {_APT_HINT}")
    return file


@functools.lru_cache(maxsize=1)
def wordnet_synsets() -> tuple[tuple[tuple[str, ...], str], ...]:
    """Every noun synset in data.noun as (lemmas with underscores, gloss), in file order."""
    synsets = []
    with _require_file(WORDNET_NOUNS).open(encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):  # licence header
                continue
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            n_words = int(parts[3], 16)
            lemmas = tuple(parts[4 + 2 * i] for i in range(n_words))
            synsets.append((lemmas, gloss.strip()))
    return tuple(synsets)


# --------------------------------------------------------------------------------------------------
# PP-OCR recognition
# --------------------------------------------------------------------------------------------------

_OCR_VERSION = "v1"
_OCR_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed.ttf",
)
_OCR_SIZES = (20, 24, 28, 32, 36)
_OCR_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -'.")
_REC_HEIGHT, _REC_MIN_WIDTH, _REC_BATCH = 48, 320, 6


def ppocr_characters() -> list[str]:
    """Decoder classes of ``ppocr-rec``: CTC blank, the model's 6623 characters, a space."""
    file = assets.ppocr_charset_path()
    if not file.is_file():
        raise assets.AssetError(
            f"{file} missing: run `python -m benchmarks.assets fetch ppocr-rec`"
        )
    return ["<blank>", *file.read_text(encoding="utf-8").splitlines(), " "]


def _ocr_lemmas() -> list[str]:
    words = {lemma.replace("_", " ") for lemmas, _ in wordnet_synsets() for lemma in lemmas}
    return sorted(w for w in words if len(w) <= 20 and set(w) <= _OCR_ALPHABET)


def _render_line(text: str, font_file: Path, size: int, margin: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_file), size)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), "white")
    ImageDraw.Draw(canvas).text((margin - left, margin - top), text, font=font, fill="black")
    return np.asarray(canvas, dtype=np.uint8)


def _render_lines(count: int, seed: int) -> list[tuple[np.ndarray, str]]:
    rng = random.Random(seed)
    lemmas = _ocr_lemmas()
    lines = []
    for _ in range(count):
        text = " ".join(rng.choice(lemmas) for _ in range(rng.randint(1, 3)))
        font = _require_file(DEJAVU_DIR / rng.choice(_OCR_FONTS))
        lines.append((_render_line(text, font, rng.choice(_OCR_SIZES), rng.randint(4, 10)), text))
    return lines


def ocr_lines(count: int = 150, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """``count`` rendered text lines: (RGB uint8 image [H, W, 3], exact text). Cached on disk."""
    cached = _data_cache() / f"ocr-lines-{_OCR_VERSION}-n{count}-s{seed}.npz"
    if cached.is_file():
        with np.load(cached) as data:
            texts = [str(t) for t in data["texts"]]
            return [(data[f"img{i}"], text) for i, text in enumerate(texts)]
    lines = _render_lines(count, seed)
    arrays = {f"img{i}": img for i, (img, _) in enumerate(lines)}
    _save_npz(cached, texts=np.array([t for _, t in lines]), **arrays)
    return lines


def _rec_resize_norm(img: np.ndarray, max_wh_ratio: float) -> np.ndarray:
    """rapidocr's ``TextRecognizer.resize_norm_img``: [3, 48, int(48 * max_wh_ratio)] float32."""
    from PIL import Image

    width = int(_REC_HEIGHT * max_wh_ratio)
    h, w = img.shape[:2]
    resized_w = min(width, math.ceil(_REC_HEIGHT * w / float(h)))
    resized = Image.fromarray(img).resize((resized_w, _REC_HEIGHT), Image.BILINEAR)
    chw = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, _REC_HEIGHT, width), dtype=np.float32)
    out[:, :, :resized_w] = (chw - 0.5) / 0.5
    return out


def ppocr_rec_batches(
    lines: Sequence[tuple[np.ndarray, str]] | Sequence[np.ndarray], batch_size: int = _REC_BATCH
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Recognizer inputs as rapidocr builds them: ``(batch [B, 3, 48, W], indices into lines)``.

    Lines are sorted by aspect ratio; a batch is padded to its widest line, at least 320 pixels.
    Usable as calibration data too.
    """
    images = [item[0] if isinstance(item, tuple) else item for item in lines]
    ratios = np.array([img.shape[1] / float(img.shape[0]) for img in images])
    order = np.argsort(ratios, kind="stable")
    batches = []
    for s in _batches(len(order), batch_size):
        idx = order[s]
        max_ratio = max(_REC_MIN_WIDTH / _REC_HEIGHT, float(ratios[idx].max()))
        batches.append((np.stack([_rec_resize_norm(images[i], max_ratio) for i in idx]), idx))
    return batches


def ctc_greedy_decode(probs: np.ndarray, characters: Sequence[str]) -> list[str]:
    """Best-path CTC decoding of [B, T, C] scores: merge repeats, drop the blank (index 0)."""
    best = probs.argmax(axis=2)
    texts = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(characters[i] for i in row[keep]))
    return texts


def ppocr_rec_predict(
    model: ModelLike, lines: Sequence[tuple[np.ndarray, str]], batch_size: int = _REC_BATCH
) -> list[str]:
    """Decoded text for every line (in the order of ``lines``), leading/trailing spaces stripped."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    characters = ppocr_characters()
    texts = [""] * len(lines)
    for batch, idx in ppocr_rec_batches(lines, batch_size):
        probs = sess.run(None, {name: batch})[0]
        if probs.shape[-1] != len(characters):
            raise ValueError(
                f"model has {probs.shape[-1]} classes, the character list {len(characters)}"
            )
        for i, text in zip(idx, ctc_greedy_decode(probs, characters), strict=True):
            texts[i] = text.strip(" ")
    return texts


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit costs)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_error_rate(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """Total edit distance over total reference characters."""
    errors = sum(edit_distance(p, t) for p, t in zip(predicted, truth, strict=True))
    return errors / max(1, sum(len(t) for t in truth))


def ppocr_rec_cer(
    model: ModelLike, lines: Sequence[tuple[np.ndarray, str]], batch_size: int = _REC_BATCH
) -> float:
    """Character error rate of the recognizer on rendered ``lines`` (see ``ocr_lines``)."""
    predicted = ppocr_rec_predict(model, lines, batch_size)
    return character_error_rate(predicted, [text for _, text in lines])


# --------------------------------------------------------------------------------------------------
# MiniLM retrieval
# --------------------------------------------------------------------------------------------------


def gloss_definition(gloss: str) -> str:
    """A WordNet gloss without its quoted examples: the ``;``-separated parts not in quotes."""
    parts = [part.strip() for part in gloss.split(";")]
    return "; ".join(part for part in parts if part and not part.startswith('"'))


def wordnet_gloss_pairs(count: int = 2000, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (lemma, definition) pairs of distinct noun synsets, drawn by ``Random(seed)``.

    The lemma is the synset's first (underscores to spaces); the definition is its gloss without the
    example sentences (which often contain the lemma itself).
    """
    synsets = wordnet_synsets()
    picked = random.Random(seed).sample(range(len(synsets)), count)
    return [(synsets[i][0][0].replace("_", " "), gloss_definition(synsets[i][1])) for i in picked]


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer() -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("MiniLM retrieval needs `pip install tokenizers`") from None
    folder = assets.minilm_tokenizer_dir()
    if not (folder / "tokenizer.json").is_file():
        raise assets.AssetError(f"{folder} missing: run `python -m benchmarks.assets fetch minilm`")
    max_len = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)
    return tokenizer


def _encode(texts: Sequence[str]) -> dict[str, np.ndarray]:
    encodings = _minilm_tokenizer().encode_batch(list(texts))
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def embed(model: ModelLike, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings [N, 384]: mean of ``last_hidden_state`` over the mask, L2-normalised.

    Texts are batched by token length (order of the result = order of ``texts``).
    """
    sess = session(model)
    inputs = {i.name for i in sess.get_inputs()}
    tokenizer = _minilm_tokenizer()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(list(texts))]
    order = np.argsort(lengths, kind="stable")
    pooled_batches = []
    for s in _batches(len(texts), batch_size):
        feeds = _encode([texts[i] for i in order[s]])
        hidden = sess.run(None, {k: v for k, v in feeds.items() if k in inputs})[0]
        mask = feeds["attention_mask"][:, :, None].astype(np.float32)
        pooled_batches.append((hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None))
    pooled = np.concatenate(pooled_batches).astype(np.float32, copy=False)
    out = np.empty_like(pooled)
    out[order] = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    return out


def recall_at_1(queries: np.ndarray, documents: np.ndarray) -> float:
    """Share of rows i whose nearest document (inner product) is document i."""
    return float(np.mean(np.argmax(queries @ documents.T, axis=1) == np.arange(len(queries))))


def minilm_retrieval_r1(model: ModelLike, pairs: Iterable[tuple[str, str]] | None = None) -> float:
    """R@1 of lemma -> definition retrieval among the ``pairs`` (default: 2000 pairs, seed 0)."""
    pairs = list(pairs) if pairs is not None else wordnet_gloss_pairs()
    sess = session(model)
    queries = embed(sess, [lemma for lemma, _ in pairs])
    documents = embed(sess, [gloss for _, gloss in pairs])
    return recall_at_1(queries, documents)
