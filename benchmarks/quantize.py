"""W8A8 post-training quantization: onnxq against ``onnxruntime.quantization.quantize_static``.

For each model, side by side in one run: FP32, ``onnxq.quantize`` and onnxruntime's
``quantize_static`` (QDQ format, ``QUInt8`` activations / ``QInt8`` weights, the same granularity,
MinMax calibration, plus Entropy and MinMax with ``CalibMovingAverage`` — its counterpart of
onnxq's ``batch-median`` range; ``quant_pre_process`` first as onnxruntime recommends, its time
included) on the same float model and the same calibration batches. Per row:

* the metric (EfficientNet-Lite0: top-1 and argmax agreement with FP32; PP-OCR rec: character
  error rate; MiniLM: R@1 of lemma → definition retrieval);
* the quantization wall time and its calibration part, and the peak memory of the quantization
  step: every quantization runs in a fresh subprocess (``--one ROW``) that reports ``VmHWM`` from
  ``/proc/self/status`` at its end (``ru_maxrss`` would include the parent's, which Linux carries
  into a child), next to its resident size just before quantizing (imports + data);
* the QDQ model's onnxruntime latency (graph optimizations enabled, ``intra_op_num_threads=2``) at
  batch 1 and 32 (PP-OCR rec ``[B, 3, 48, 320]``, MiniLM sequence 64): the median of 15 (batch 1)
  or 3 (batch 32) runs after warm-up, measured round-robin over all of a model's rows
  ``--rounds`` times (default 3) and the best round reported, so that load from other processes
  on a shared machine does not land on one row only;
* which integer kernels onnxruntime fused: the optimized graph is saved
  (``SessionOptions.optimized_model_filepath``) and its op types counted;
* calibration time against plain FP32 inference (optimizations on, 2 threads) over the same
  calibration batches (target: calibration ≤ 2× inference): per row, the row's own calibration
  against the best of 3 FP32 runs; and, per model, ``calibration_timing``: onnxq's calibration
  (statistics pass + range computation) for minmax / batch-median / mse / entropy alternated with FP32 inference
  ``--calib-reps`` times (default 3), best against best — the figure to quote on a shared machine.

onnxq rows use its default placement ("runtime": quantizers only where onnxruntime runs integer
kernels); the ``, all`` rows use ``placement="all"`` (a quantizer at every op boundary, onnxq's
placement before), for comparison.

Models and data:

* ``effnet-lite0-bn`` (49 BatchNorms): calibration on images 0..255 of the ImageNet sample (8
  batches of 32), top-1 on images 256..499. onnxq gets the BN model with ``passes=["fold-bn"]``
  (naive) or ``"dfq"``; onnxruntime gets the BN-folded (or ``dfq``) float model from a file.
* ``ppocr-rec``: calibration on ``ocr_lines(150, seed=1)`` as the recognizer's batches (25 × 6
  lines), CER on ``ocr_lines(600, seed=0)`` (about 14 000 characters: on the 150 lines used
  before, about 2 000 characters, onnxq's and onnxruntime's min-max CER differed by 5 characters
  one way, and on 600 other lines by 11 the other way). onnxq gets the cached model (opset 12) with
  ``passes=["fold-bn"]`` (or ``"dfq"``) and raises the opset itself where per-channel needs it.
  onnxruntime gets it with its Constant-node weights lifted to initializers
  (``onnxq.optimize(passes=[])`` or ``"dfq"``, exact) and converted to opset 13 (``onnx``'s version
  converter, exact): on the opset-12 file ``quantize_static(per_channel=True)`` writes bias
  ``DequantizeLinear`` nodes with an ``axis`` attribute without raising the opset, a model
  onnxruntime then refuses to load. Its ``quant_pre_process`` folds the 6 BatchNorms.
* ``minilm``: calibration on both sides of 64 WordNet pairs (``wordnet_gloss_pairs(64, seed=1)``:
  64 lemmas, the queries, then their 64 definitions, the documents; 8 batches of 16), R@1 on
  ``wordnet_gloss_pairs()`` (2000 pairs, seed 0). (Until 2026-11-26 the definitions alone, none
  of the queries' kind of text.)

``quant_pre_process`` is called with its defaults; where onnxruntime's symbolic shape inference
gives up ("Incomplete symbolic shape inference": PP-OCR rec, MiniLM) it is retried with
``auto_merge=True``, then ``skip_symbolic_shape=True``; every attempt counts in the time. A row whose
quantizer fails or whose QDQ model onnxruntime refuses reports the error; rows marked ``(wa)`` work
around such onnxq failures (``NO_AVGPOOL``, ``NO_GATHER``, the opset-13 copy of PP-OCR rec) and run
only when the row they stand in for failed.

Run::

    python -m benchmarks.quantize [--models effnet-lite0-bn,ppocr-rec,minilm] [--quick]
                                  [--json PATH] [--no-profile] [--keep DIR] [--rows ID,...]
                                  [--calib-reps N] [--rounds N]

``--quick``: EfficientNet-Lite0 only, 64 calibration images (smoke check). A subprocess whose
resident size passes ``--mem-limit-gb`` (default 17) is killed and its row reports that.
onnxruntime's calibrators keep every batch's intermediate outputs until the end by default
(ReduceMin/ReduceMax scalars for MinMax, whole activations for Entropy); the Entropy rows pass
``CalibStridedMinMax=1`` (one batch per ``collect_data``, histograms merged), which bounds that.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import io
import json
import logging
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import assets, datasets

log = logging.getLogger("benchmarks.quantize")
RESULTS = Path(__file__).parent / "results"
MODELS = ("effnet-lite0-bn", "ppocr-rec", "minilm")
METRIC = {"effnet-lite0-bn": "top1", "ppocr-rec": "cer", "minilm": "r1"}
HIGHER_IS_BETTER = {"top1": True, "cer": False, "r1": True}
THREADS = 2

#: op types counted in onnxruntime's optimized graph
INT_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
FLOAT_COMPUTE = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    model: str
    label: str
    tool: str  # "onnxq" | "ort"
    per_channel: bool
    #: onnxq: passes given to onnxq.quantize; ort: which prepared float model it quantizes
    passes: Any = None
    float_variant: str = "float"
    method: str = "minmax"  # onnxq range method / ORT calibrate method (minmax | entropy)
    #: ORT extra_options (calibration memory bounds)
    ort_options: Any = None
    #: onnxq: QuantConfig.op_overrides (workaround rows)
    overrides: Any = None
    #: onnxq: other QuantConfig fields (e.g. {"placement": "all"})
    config: Any = None
    #: onnxq: "asset" (the cached model) or a prepared float variant in the work folder
    source: str = "asset"
    #: a workaround row: runs only when the row with this id failed
    fallback_for: str | None = None


#: ORT's histogram calibrators keep every batch's outputs until the end unless strided
STRIDED = {"CalibStridedMinMax": 1}
#: PP-OCR rec: rendered lines the CER is measured on
OCR_EVAL_LINES = 600
#: ORT's MinMax with an exponential moving average of the per-batch extremes (constant 0.01)
MOVING_AVERAGE = {"CalibMovingAverage": True}
#: workarounds (onnxq at the time of writing): an AveragePool Q/DQ pair with a [1]-shaped scale
#: makes onnxruntime's QLinearAveragePool fail; a Gather on an embedding table ties an initializer
#: into an activation group, which calibration refuses
NO_AVGPOOL = {"AveragePool": {"skip": True}}
NO_GATHER = {"Gather": {"skip": True}}
#: onnxq's placement before the "runtime" placement: a quantizer at every op boundary
ALL = {"placement": "all"}


def rows_for(model: str) -> list[Row]:
    if model == "effnet-lite0-bn":
        e = "effnet"
        return [
            Row(f"{e}/pc-onnxq-minmax", model, "W8A8 per-channel  onnxq minmax", "onnxq", True,
                ["fold-bn"]),
            Row(f"{e}/pc-onnxq-mse", model, "W8A8 per-channel  onnxq mse", "onnxq", True,
                ["fold-bn"], method="mse"),
            Row(f"{e}/pc-onnxq-entropy", model, "W8A8 per-channel  onnxq entropy", "onnxq", True,
                ["fold-bn"], method="entropy"),
            Row(f"{e}/pc-onnxq-batch-median", model, "W8A8 per-channel  onnxq batch-median",
                "onnxq", True, ["fold-bn"], method="batch-median"),
            Row(f"{e}/pc-onnxq-minmax-all", model, "W8A8 per-channel  onnxq minmax, all", "onnxq",
                True, ["fold-bn"], config=ALL),
            Row(f"{e}/pc-ort-minmax", model, "W8A8 per-channel  ORT MinMax", "ort", True,
                float_variant="folded"),
            Row(f"{e}/pc-ort-minmax-ma", model, "W8A8 per-channel  ORT MinMax moving avg", "ort",
                True, float_variant="folded", ort_options=MOVING_AVERAGE),
            Row(f"{e}/pc-ort-entropy", model, "W8A8 per-channel  ORT Entropy strided", "ort",
                True, float_variant="folded", method="entropy", ort_options=STRIDED),
            Row(f"{e}/pt-onnxq-naive", model, "W8A8 per-tensor   onnxq naive", "onnxq", False,
                ["fold-bn"]),
            Row(f"{e}/pt-ort-naive", model, "W8A8 per-tensor   ORT naive", "ort", False,
                float_variant="folded"),
            Row(f"{e}/pt-onnxq-dfq", model, "W8A8 per-tensor   onnxq dfq", "onnxq", False, "dfq"),
            Row(f"{e}/pt-ort-dfq", model, "W8A8 per-tensor   ORT on dfq float", "ort", False,
                float_variant="dfq"),
        ]
    if model == "ppocr-rec":
        p = "ppocr"
        return [
            Row(f"{p}/pt-onnxq-naive", model, "W8A8 per-tensor   onnxq naive", "onnxq", False,
                ["fold-bn"]),
            Row(f"{p}/pt-onnxq-dfq", model, "W8A8 per-tensor   onnxq dfq", "onnxq", False, "dfq"),
            Row(f"{p}/pt-ort-naive", model, "W8A8 per-tensor   ORT naive", "ort", False,
                float_variant="lifted13"),
            Row(f"{p}/pt-ort-dfq", model, "W8A8 per-tensor   ORT on dfq float", "ort", False,
                float_variant="dfq13"),
            Row(f"{p}/pc-onnxq-minmax", model, "W8A8 per-channel  onnxq minmax", "onnxq", True,
                ["fold-bn"]),
            Row(f"{p}/pc-onnxq-mse", model, "W8A8 per-channel  onnxq mse", "onnxq", True,
                ["fold-bn"], method="mse"),
            Row(f"{p}/pc-onnxq-entropy", model, "W8A8 per-channel  onnxq entropy", "onnxq", True,
                ["fold-bn"], method="entropy"),
            Row(f"{p}/pc-onnxq-batch-median", model, "W8A8 per-channel  onnxq batch-median",
                "onnxq", True, ["fold-bn"], method="batch-median"),
            Row(f"{p}/pc-onnxq-minmax-all", model, "W8A8 per-channel  onnxq minmax, all", "onnxq",
                True, ["fold-bn"], config=ALL),
            Row(f"{p}/pc-ort-minmax", model, "W8A8 per-channel  ORT MinMax", "ort", True,
                float_variant="lifted13"),
            Row(f"{p}/pc-ort-minmax-ma", model, "W8A8 per-channel  ORT MinMax moving avg", "ort",
                True, float_variant="lifted13", ort_options=MOVING_AVERAGE),
            Row(f"{p}/pc-ort-entropy", model, "W8A8 per-channel  ORT Entropy strided", "ort",
                True, float_variant="lifted13", method="entropy", ort_options=STRIDED),
            # workarounds for the onnxq failures above (see the module docstring)
            Row(f"{p}/pt-onnxq-dfq-wa", model, "W8A8 per-tensor   onnxq dfq (wa)", "onnxq", False,
                "dfq", overrides=NO_AVGPOOL, source="lifted13", fallback_for=f"{p}/pt-onnxq-dfq"),
            Row(f"{p}/pc-onnxq-minmax-wa", model, "W8A8 per-channel  onnxq minmax (wa)", "onnxq",
                True, ["fold-bn"], overrides=NO_AVGPOOL, fallback_for=f"{p}/pc-onnxq-minmax"),
        ]
    if model == "minilm":
        m = "minilm"
        return [
            Row(f"{m}/pc-onnxq-minmax", model, "W8A8 per-channel  onnxq minmax", "onnxq", True),
            Row(f"{m}/pc-onnxq-minmax-wa", model, "W8A8 per-channel  onnxq minmax (wa)", "onnxq",
                True, overrides=NO_GATHER, fallback_for=f"{m}/pc-onnxq-minmax"),
            Row(f"{m}/pc-onnxq-entropy", model, "W8A8 per-channel  onnxq entropy", "onnxq", True,
                method="entropy"),
            Row(f"{m}/pc-onnxq-batch-median", model, "W8A8 per-channel  onnxq batch-median",
                "onnxq", True, method="batch-median"),
            Row(f"{m}/pc-onnxq-minmax-all", model, "W8A8 per-channel  onnxq minmax, all", "onnxq",
                True, config=ALL),
            Row(f"{m}/pc-onnxq-minmax-lnfloat", model, "W8A8 per-channel  onnxq minmax, LN float",
                "onnxq", True, config={"integer_neighbours": ()}),
            Row(f"{m}/pc-ort-minmax", model, "W8A8 per-channel  ORT MinMax", "ort", True,
                float_variant="float"),
            Row(f"{m}/pc-ort-minmax-ma", model, "W8A8 per-channel  ORT MinMax moving avg", "ort",
                True, float_variant="float", ort_options=MOVING_AVERAGE),
            Row(f"{m}/pc-ort-entropy", model, "W8A8 per-channel  ORT Entropy strided", "ort",
                True, float_variant="float", method="entropy", ort_options=STRIDED),
        ]
    raise SystemExit(f"no benchmark for {model} (known: {', '.join(MODELS)})")


def find_row(row_id: str) -> Row:
    for model in MODELS:
        for row in rows_for(model):
            if row.id == row_id:
                return row
    raise SystemExit(f"unknown row {row_id}")


def asset_path(model: str) -> Path:
    path = assets.path(model)
    if path is None:
        raise SystemExit(f"asset {model} missing: python -m benchmarks.assets fetch {model}")
    return path


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def calibration_batches(model: str, quick: bool) -> list[dict[str, np.ndarray]]:
    """The calibration batches every quantizer of ``model`` sees (the same list for all)."""
    if model == "effnet-lite0-bn":
        images, _ = datasets.imagenet_sample(0, 64 if quick else 256)
        return [{"input": images[i : i + 32]} for i in range(0, len(images), 32)]
    if model == "ppocr-rec":
        lines = datasets.ocr_lines(150, seed=1)
        return [{"x": batch} for batch, _ in datasets.ppocr_rec_batches(lines)]
    if model == "minilm":
        # both sides of the retrieval: queries (lemmas) and documents (definitions)
        pairs = datasets.wordnet_gloss_pairs(64, seed=1)
        texts = [lemma for lemma, _ in pairs] + [gloss for _, gloss in pairs]
        return [datasets._encode(texts[i : i + 16]) for i in range(0, len(texts), 16)]
    raise SystemExit(f"no calibration data for {model}")


def latency_feeds(model: str, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    if model == "effnet-lite0-bn":
        images, _ = datasets.imagenet_sample(256, batch)
        return {"input": images}
    if model == "ppocr-rec":
        return {"x": rng.uniform(-1, 1, (batch, 3, 48, 320)).astype(np.float32)}
    if model == "minilm":
        ids = rng.integers(1000, 30000, (batch, 64), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "token_type_ids": np.zeros_like(ids)}
    raise SystemExit(model)


class Evaluator:
    def __init__(self, model: str) -> None:
        self.model = model
        self.metric = METRIC[model]
        if model == "effnet-lite0-bn":
            self.images, self.labels = datasets.imagenet_sample(256, 244)
        elif model == "ppocr-rec":
            self.lines = datasets.ocr_lines(OCR_EVAL_LINES, seed=0)
        else:
            self.pairs = datasets.wordnet_gloss_pairs()
        self.reference: np.ndarray | None = None

    def __call__(self, path: Path) -> dict[str, float]:
        if self.model == "effnet-lite0-bn":
            logits = datasets.predictions(str(path), self.images)
            out = datasets.topk_from_logits(logits, self.labels)
            if self.reference is None:
                self.reference = logits
            out["agreement"] = datasets.agreement(logits, self.reference)
            return out
        if self.model == "ppocr-rec":
            return {"cer": datasets.ppocr_rec_cer(str(path), self.lines)}
        return {"r1": datasets.minilm_retrieval_r1(str(path), self.pairs)}


# --------------------------------------------------------------------------------------------------
# onnxruntime measurements
# --------------------------------------------------------------------------------------------------


def _options(optimize: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def _session(path: Path, optimize: bool = True):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), _options(optimize), providers=["CPUExecutionProvider"])


def latency_ms(path: Path, model: str, batch: int) -> float:
    """Median of several runs after warm-up (one round; see :func:`measure_latencies`)."""
    sess = _session(path)
    feeds = latency_feeds(model, batch)
    warmup, runs = (3, 15) if batch == 1 else (1, 3)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def measure_latencies(paths: dict[str, Path], model: str, rounds: int) -> dict[str, dict]:
    """Latency of every model in ``paths``, measured round-robin ``rounds`` times.

    Other processes on a shared machine come and go; interleaving the models spreads that noise
    over all of them, and the reported figure is the best round's median (all rounds are kept).
    """
    out: dict[str, dict] = {key: {"b1_rounds_ms": [], "b32_rounds_ms": []} for key in paths}
    for _ in range(rounds):
        for key, path in paths.items():
            out[key]["b1_rounds_ms"].append(latency_ms(path, model, 1))
            out[key]["b32_rounds_ms"].append(latency_ms(path, model, 32))
    for item in out.values():
        # --rounds 0: accuracy only, no latency
        item["latency_b1_ms"] = min(item["b1_rounds_ms"], default=None)
        item["latency_b32_ms"] = min(item["b32_rounds_ms"], default=None)
    return out


def fused_ops(path: Path, work: Path) -> dict[str, int]:
    """Op-type counts of the graph onnxruntime runs (optimizations on, saved to a file)."""
    import onnx
    import onnxruntime as ort

    out = work / f"{path.stem}.ort-optimized.onnx"
    options = _options()
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    proto = onnx.load(str(out), load_external_data=False)
    counts = collections.Counter(n.op_type for n in proto.graph.node)
    out.unlink(missing_ok=True)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def fp32_inference_s(path: Path, batches: list[dict[str, np.ndarray]], optimize: bool) -> float:
    """Plain FP32 inference over the calibration batches (after one warm-up run)."""
    sess = _session(path, optimize)
    names = {i.name for i in sess.get_inputs()}
    sess.run(None, {k: v for k, v in batches[0].items() if k in names})
    t = time.perf_counter()
    for feeds in batches:
        sess.run(None, {k: v for k, v in feeds.items() if k in names})
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------------------
# One quantization, in its own process
# --------------------------------------------------------------------------------------------------


def _status_bytes(key: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _onnxq_config(row: Row):
    import onnxq

    return onnxq.QuantConfig(
        weights=onnxq.QuantSpec(bits=8, symmetric=True, per_channel=row.per_channel,
                                range_method=row.method),
        activations=onnxq.QuantSpec(bits=8, symmetric=False, range_method=row.method),
        op_overrides=dict(row.overrides or {}),
        **dict(row.config or {}),
    )


def _quantize_onnxq(row: Row, batches: list, out: Path, timings: dict) -> Path:
    import onnxq
    from onnxq.quant import observers
    from onnxq.runtime import capture

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    # the calibration parts of onnxq.quantize (it imports these names at call time)
    capture.collect_statistics = timed("collect_statistics_s", capture.collect_statistics)
    for name in list(observers.RANGE_METHODS):
        observers.RANGE_METHODS[name] = timed("activation_ranges_s", observers.RANGE_METHODS[name])
    observers.weight_range = timed("weight_ranges_s", observers.weight_range)

    t = time.perf_counter()
    source = (asset_path(row.model) if row.source == "asset"
              else out / f"{row.model}.{row.source}.onnx")
    sim = onnxq.quantize(source, batches, config=_onnxq_config(row), passes=row.passes)
    timings["quantize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    target = out / f"{row.id.replace('/', '.')}.qdq.onnx"
    onnxq.save(sim.model, target, overwrite=True)
    timings["save_s"] = time.perf_counter() - t
    timings["calibration_s"] = timings.get("collect_statistics_s", 0.0) + timings.get(
        "activation_ranges_s", 0.0)
    return target


class _Reader:
    """An onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.index, self.stop = 0, len(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def get_next(self):
        if self.index >= self.stop:
            return None
        self.index += 1
        return self.batches[self.index - 1]

    def set_range(self, start_index: int, end_index: int) -> None:  # CalibStridedMinMax
        self.index, self.stop = start_index, min(end_index, len(self.batches))


def _in_scratch_dir(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a fresh temporary working directory: onnxruntime's ``quant_pre_process``
    and ``quantize_static`` leave files in the current one (``sym_shape_infer_temp.onnx``,
    uuid-named external data of up to 90 MB per call)."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-ort-") as scratch:
        os.chdir(scratch)
        try:
            return fn(*args)
        finally:
            os.chdir(here)


def _quantize_ort(row: Row, batches: list, work: Path, out: Path, timings: dict) -> Path:
    import onnxruntime.quantization as oq

    # the submodule, not the function of the same name that the package exports
    oq_quantize = sys.modules["onnxruntime.quantization.quantize"]
    from onnxruntime.quantization.shape_inference import quant_pre_process

    depth = [0]

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # MinMax's collect_data calls compute_data itself
                    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    original = oq_quantize.create_calibrator

    def create_calibrator(*args, **kwargs):
        calibrator = timed("calibrator_setup_s", original)(*args, **kwargs)
        calibrator.collect_data = timed("collect_data_s", calibrator.collect_data)
        calibrator.compute_data = timed("compute_data_s", calibrator.compute_data)
        return calibrator

    oq_quantize.create_calibrator = create_calibrator

    source = work / f"{row.model}.{row.float_variant}.onnx"
    stem = row.id.replace("/", ".")
    pre = out / f"{stem}.pre.onnx"
    target = out / f"{stem}.qdq.onnx"
    t0 = time.perf_counter()
    # onnxruntime's symbolic shape inference gives up on some models ("Incomplete symbolic shape
    # inference"); then the options its message suggests, in order (all attempts are timed)
    failures = []
    for options in ({}, {"auto_merge": True}, {"skip_symbolic_shape": True}):
        try:
            quant_pre_process(str(source), str(pre), **options)
        except Exception as exc:  # noqa: BLE001 - recorded, next option tried
            failures.append(f"{options or 'defaults'}: {type(exc).__name__}: {exc}"[:200])
            continue
        timings["pre_process_options"] = options
        break
    else:
        raise RuntimeError("quant_pre_process failed: " + "; ".join(failures))
    if failures:
        timings["pre_process_failed"] = failures
    t1 = time.perf_counter()
    method = {"minmax": oq.CalibrationMethod.MinMax,
              "entropy": oq.CalibrationMethod.Entropy}[row.method]
    oq.quantize_static(
        str(pre), str(target), _Reader(batches),
        quant_format=oq.QuantFormat.QDQ,
        per_channel=row.per_channel,
        activation_type=oq.QuantType.QUInt8,
        weight_type=oq.QuantType.QInt8,
        calibrate_method=method,
        extra_options=dict(row.ort_options or {}),
    )
    t2 = time.perf_counter()
    pre.unlink(missing_ok=True)
    timings.update(pre_process_s=t1 - t0, quantize_static_s=t2 - t1, quantize_s=t2 - t0)
    timings["calibration_s"] = sum(
        timings.get(k, 0.0) for k in ("calibrator_setup_s", "collect_data_s", "compute_data_s"))
    return target


def run_one(row_id: str, work: Path, out_json: Path, quick: bool, profile: bool) -> None:
    """Child process: quantize one row, write its timings and memory to ``out_json``."""
    import onnxruntime  # noqa: F401  (imported before the baseline, like onnxq's own import)

    import onnxq  # noqa: F401

    row = find_row(row_id)
    batches = calibration_batches(row.model, quick)
    rss_before = _status_bytes("VmRSS")
    hwm_before = _status_bytes("VmHWM")
    timings: dict[str, float] = {}
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    if row.tool == "onnxq":
        target = _quantize_onnxq(row, batches, work, timings)
    else:
        target = _in_scratch_dir(_quantize_ort, row, batches, work.resolve(), work.resolve(), timings)
    if profiler:
        profiler.disable()
    hwm = _status_bytes("VmHWM")
    result = {
        "row": row.id, "timings": timings, "rss_before_bytes": rss_before,
        "hwm_before_bytes": hwm_before, "vmhwm_bytes": hwm, "qdq": str(target),
        "qdq_bytes": target.stat().st_size,
        "calibration_samples": int(sum(next(iter(b.values())).shape[0] for b in batches)),
        "calibration_batches": len(batches),
    }
    if profiler:
        result["profile"] = _profile_summary(profiler)
    out_json.write_text(json.dumps(result, indent=1))


def _profile_summary(profiler: cProfile.Profile, top: int = 15) -> dict[str, Any]:
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc,
                     "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)})
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return {
        "by_tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:top],
        "by_cumtime": sorted(rows, key=lambda r: -r["cumtime_s"])[:top],
    }


def spawn(row: Row, work: Path, quick: bool, mem_limit: float, timeout: float,
          profile: bool = False) -> dict[str, Any]:
    """Run ``--one ROW`` in a fresh interpreter, watching its resident size."""
    out = work / f"{row.id.replace('/', '.')}{'.profile' if profile else ''}.json"
    cmd = [sys.executable, "-m", "benchmarks.quantize", "--one", row.id, "--workdir", str(work),
           "--out", str(out)] + (["--quick"] if quick else []) + (["--profile"] if profile else [])
    log_file = work / f"{out.stem}.log"
    start = time.perf_counter()
    with log_file.open("w") as log_f:
        proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent)
        peak, killed = 0, None
        while proc.poll() is None:
            try:
                rss = _status_bytes("VmRSS", proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                rss = 0
            peak = max(peak, rss)
            if rss > mem_limit:
                killed = f"killed: resident size {rss / 2**30:.1f} GiB > limit {mem_limit / 2**30:.1f} GiB"
            elif time.perf_counter() - start > timeout:
                killed = f"killed: still running after {timeout:.0f} s"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if killed or proc.returncode != 0 or not out.is_file():
        tail = log_file.read_text()[-2000:]
        error = killed or f"exit status {proc.returncode}: {tail.strip().splitlines()[-1:]}"
        log.warning("%s failed: %s\n%s", row.id, error, tail)
        return {"row": row.id, "error": error, "watched_peak_rss_bytes": peak,
                "process_wall_s": wall}
    result = json.loads(out.read_text())
    result["process_wall_s"] = wall
    return result


# --------------------------------------------------------------------------------------------------
# Parent: prepare, spawn, evaluate
# --------------------------------------------------------------------------------------------------


def prepare_floats(model: str, work: Path) -> dict[str, Path]:
    """The float models onnxruntime quantizes, written once (not part of any row's time)."""
    import onnxq

    src = asset_path(model)
    files = {"float": src}
    variants: dict[str, Any] = {}
    if model == "effnet-lite0-bn":
        variants = {"folded": ["fold-bn"], "dfq": "dfq"}
    elif model == "ppocr-rec":
        variants = {"lifted": [], "dfq": "dfq"}
    for name, passes in variants.items():
        files[name] = onnxq.save(onnxq.optimize(src, passes=passes),
                                 work / f"{model}.{name}.onnx", overwrite=True)
    if model == "ppocr-rec":  # opset 12 -> 13 (exact): see rows_for
        import onnx
        import onnx.version_converter

        for name in ("lifted", "dfq"):
            proto = onnx.version_converter.convert_version(onnx.load(str(files[name])), 13)
            files[f"{name}13"] = work / f"{model}.{name}13.onnx"
            onnx.save(proto, str(files[f"{name}13"]))
    link = work / f"{model}.float.onnx"
    if not link.exists():
        shutil.copyfile(src, link)
    return files


def _summarize_ops(ops: dict[str, int]) -> dict[str, int]:
    qlinear_other = sum(v for k, v in ops.items()
                        if k.startswith("QLinear") and k not in INT_KERNELS)
    out = {k: ops.get(k, 0) for k in INT_KERNELS}
    out["QLinear* other"] = qlinear_other
    out["DequantizeLinear"] = ops.get("DequantizeLinear", 0)
    out["QuantizeLinear"] = ops.get("QuantizeLinear", 0)
    out["float Conv/MatMul/Gemm"] = sum(ops.get(k, 0) for k in FLOAT_COMPUTE)
    return out


CALIBRATION_METHODS = ("minmax", "batch-median", "mse", "entropy")


def calibration_timing(model: str, float_path: Path, batches: list, reps: int) -> dict[str, Any]:
    """onnxq's calibration — the statistics pass of ``onnxq.quantize`` (``collect_statistics``
    over the tensors ``annotate`` chose) plus the range computation, exactly as ``quantize`` calls
    them — next to FP32 inference over the same batches, alternated ``reps`` times; the ratio is
    best calibration / best inference, so that load from other processes does not decide it."""
    import onnxq
    from onnxq.quant.annotate import annotate
    from onnxq.quant.observers import HISTOGRAM_FREE, RANGE_METHODS
    from onnxq.runtime.capture import collect_statistics

    float_model = onnxq.optimize(asset_path(model), passes=[] if model == "minilm" else ["fold-bn"])
    plans = {}
    for method in CALIBRATION_METHODS:
        config = _onnxq_config(Row("timing", model, "", "onnxq", True, method=method))
        plans[method] = annotate(float_model, config)
    runs: dict[str, list] = {"fp32": [], **{m: [] for m in CALIBRATION_METHODS}}
    for _ in range(reps):
        runs["fp32"].append(fp32_inference_s(float_path, batches, optimize=True))
        for method, plan in plans.items():
            names = sorted({v.name for g in plan.groups for v in g.members if v.name})
            histogram = any(g.spec.range_method not in HISTOGRAM_FREE for g in plan.groups
                            if g.fixed_range is None)
            t = time.perf_counter()
            observers = collect_statistics(float_model, names, batches, histogram=histogram)
            t_stats = time.perf_counter() - t
            for group in plan.groups:
                if group.fixed_range is None:
                    for v in group.members:
                        if v.name in observers:
                            RANGE_METHODS[method](observers[v.name], bits=8, symmetric=False)
            runs[method].append((time.perf_counter() - t, t_stats))
            del observers
    fp32 = min(runs["fp32"])
    out: dict[str, Any] = {"fp32_inference_s": fp32, "reps": reps,
                           "fp32_runs_s": runs["fp32"]}
    for method in CALIBRATION_METHODS:
        best = min(runs[method])
        out[method] = {"calibration_s": best[0], "statistics_s": best[1],
                       "ratio": best[0] / fp32, "runs_s": [r[0] for r in runs[method]],
                       "observed_tensors": len({v.name for g in plans[method].groups
                                                for v in g.members if v.name})}
    return out


def run_model(model: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    if args.timing_only:  # only the calibration-vs-FP32 timing (merged into the JSON's entry)
        batches = calibration_batches(model, args.quick)
        floats = {"float": asset_path(model)}
        return {"asset": model, "metric": METRIC[model], "commit": _commit(), "timing_only": True,
                "calibration_timing": calibration_timing(model, floats["float"], batches,
                                                         max(args.calib_reps, 1))}
    floats = prepare_floats(model, work)
    evaluate = Evaluator(model)
    metric = METRIC[model]
    batches = calibration_batches(model, args.quick)

    log.info("%s: FP32", model)
    fp32 = {"label": "FP32", **evaluate(floats["float"])}
    fp32["ops"] = fused_ops(floats["float"], work)
    inference = {  # best of 3 (the machine may be shared)
        "fp32_inference_s": min(fp32_inference_s(floats["float"], batches, optimize=True)
                                for _ in range(3)),
        "fp32_inference_noopt_s": min(fp32_inference_s(floats["float"], batches, optimize=False)
                                      for _ in range(3)),
        "samples": int(sum(next(iter(b.values())).shape[0] for b in batches)),
        "batches": len(batches),
    }
    timing = None
    if args.calib_reps > 0:
        log.info("%s: calibration timing, %d rounds", model, args.calib_reps)
        timing = calibration_timing(model, floats["float"], batches, args.calib_reps)
    rows: dict[str, Any] = {"fp32": fp32}
    wanted = [r for r in rows_for(model) if not args.rows or r.id in args.rows]
    for row in wanted:
        if row.fallback_for and "error" not in rows.get(row.fallback_for, {"error": ""}):
            continue  # the row it works around succeeded
        log.info("%s: quantizing in a subprocess", row.id)
        result = spawn(row, work, args.quick, args.mem_limit_gb * 2**30, args.timeout)
        result["label"] = row.label
        result["tool"] = row.tool
        if "error" not in result:
            qdq = Path(result["qdq"])
            result["calibration_vs_fp32"] = (
                result["timings"]["calibration_s"] / inference["fp32_inference_s"])
            try:
                result.update(evaluate(qdq))
                result["ops"] = fused_ops(qdq, work)
            except Exception as exc:  # noqa: BLE001 - e.g. onnxruntime refuses the QDQ model
                lines = [line for line in str(exc).splitlines() if line.strip()]
                result["error"] = (f"onnxruntime could not run the QDQ model: "
                                   f"{type(exc).__name__}: {lines[0] if lines else ''}")
                log.warning("%s: %s", row.id, result["error"])
            if "error" not in result:
                log.info("%s: %s %.4f, quantize %.1f s, peak %.0f MiB", row.id, metric,
                         result[metric], result["timings"]["quantize_s"],
                         result["vmhwm_bytes"] / 2**20)
        rows[row.id] = result

    log.info("%s: latency, %d rounds over %d models", model, args.rounds, len(rows))
    paths = {"fp32": floats["float"]}
    paths.update({k: Path(r["qdq"]) for k, r in rows.items() if k != "fp32" and "error" not in r})
    for key, lat in measure_latencies(paths, model, args.rounds).items():
        rows[key].update(lat)
    if not args.keep:
        for key, row in rows.items():
            if key != "fp32" and "qdq" in row:
                Path(row["qdq"]).unlink(missing_ok=True)
                row["qdq"] = Path(row["qdq"]).name

    profile = None
    onnxq_pc = [r for r in wanted if r.tool == "onnxq" and r.per_channel and not r.config
                and not r.fallback_for]
    prof_row = next((r for r in onnxq_pc if r.method == "mse"), None) or next(
        (r for r in onnxq_pc if r.method == "minmax"), None)  # histogram calibration if any
    if args.profile and prof_row is not None:
        log.info("%s: cProfile run", prof_row.id)
        prof = spawn(prof_row, work, args.quick, args.mem_limit_gb * 2**30, args.timeout,
                     profile=True)
        profile = {"row": prof_row.id, **{k: prof.get(k) for k in ("profile", "timings")}}
    return {"asset": model, "metric": metric, "commit": _commit(),
            "calibration_reference": inference, "calibration_timing": timing, "rows": rows,
            "profile": profile}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _print_timing(timing: dict[str, Any]) -> None:
    print(f"  calibration vs FP32 inference over the same batches (best of {timing['reps']}"
          f" alternated runs; FP32 {timing['fp32_inference_s']:.2f} s):")
    for method in CALIBRATION_METHODS:
        t = timing[method]
        print(f"    {method:<8} {t['calibration_s']:6.2f} s  ({t['ratio']:.2f}x; statistics "
              f"{t['statistics_s']:.2f} s, {t['observed_tensors']} tensors)")


def print_report(result: dict[str, Any]) -> None:
    if result.get("timing_only"):
        print(f"\n== {result['asset']} (onnxq {result.get('commit', '?')}) ==")
        _print_timing(result["calibration_timing"])
        return
    metric = result["metric"]
    ref = result["calibration_reference"]
    fp32 = result["rows"]["fp32"]
    print(f"\n== {result['asset']} (onnxq {result.get('commit', '?')}; {metric}; calibration {ref['samples']} samples in "
          f"{ref['batches']} batches; FP32 inference over them {ref['fp32_inference_s']:.2f} s, "
          f"{ref['fp32_inference_noopt_s']:.2f} s without graph optimizations) ==")
    head = (f"  {'row':<38} {metric:>6} {'Δ pt':>6} {'agree':>5} {'quant s':>7} {'calib s':>7}"
            f" {'cal/fp32':>8} {'peak MiB':>8} {'Δpeak':>6} {'b1 ms':>7} {'b32 ms':>8}")
    print(head)
    for key, row in result["rows"].items():
        if "error" in row:
            print(f"  {row['label']:<38} {row['error'][:160]}")
            continue
        value = row[metric]
        delta = (value - fp32[metric]) * 100
        agree = f"{row['agreement']:.3f}" if "agreement" in row else "-"
        if key == "fp32":
            quant = calib = ratio = peak = dpeak = "-"
        else:
            t = row["timings"]
            quant = f"{t['quantize_s']:.1f}"
            calib = f"{t['calibration_s']:.1f}"
            ratio = f"{row['calibration_vs_fp32']:.1f}x"
            peak = f"{row['vmhwm_bytes'] / 2**20:.0f}"
            dpeak = f"{(row['vmhwm_bytes'] - row['rss_before_bytes']) / 2**20:.0f}"
        b1, b32 = row.get("latency_b1_ms"), row.get("latency_b32_ms")
        b1 = "-" if b1 is None else f"{b1:.2f}"
        b32 = "-" if b32 is None else f"{b32:.1f}"
        print(f"  {row['label']:<38} {value:6.4f} {delta:+6.1f} {agree:>5} {quant:>7} {calib:>7}"
              f" {ratio:>8} {peak:>8} {dpeak:>6} {b1:>7} {b32:>8}")
    timing = result.get("calibration_timing")
    if timing:
        _print_timing(timing)
    cols = list(_summarize_ops({}).keys())
    short = {"MatMulIntegerToFloat": "MMIntToF", "DynamicQuantizeMatMul": "DynQMM",
             "DequantizeLinear": "DQ", "QuantizeLinear": "Q", "QLinear* other": "QLin*other",
             "float Conv/MatMul/Gemm": "fp Conv/MM/Gemm", "QLinearConv": "QLConv",
             "QLinearMatMul": "QLMatMul", "MatMulInteger": "MMInteger",
             "ConvInteger": "ConvInt"}
    print("  onnxruntime's optimized graph (ops after fusion):")
    print(f"  {'row':<38} " + " ".join(f"{short.get(c, c):>{max(6, len(short.get(c, c)))}}"
                                        for c in cols))
    for row in result["rows"].values():
        if "ops" not in row:
            continue
        ops = _summarize_ops(row["ops"])
        print(f"  {row['label']:<38} " + " ".join(
            f"{ops[c]:>{max(6, len(short.get(c, c)))}}" for c in cols))
    others = collections.Counter()
    for row in result["rows"].values():
        for k in row.get("ops", {}):
            if k.startswith("QLinear") and k not in INT_KERNELS:
                others[k] += 1
    if others:
        print("  (QLinear* other = " + ", ".join(sorted(others)) + ")")
    if result.get("profile") and result["profile"].get("profile"):
        prof = result["profile"]
        print(f"  cProfile of {prof['row']} (top by own time):")
        for item in prof["profile"]["by_tottime"][:8]:
            print(f"    {item['tottime_s']:8.2f} s own {item['cumtime_s']:8.2f} s cum "
                  f"{item['calls']:>8}x  {item['function'][:90]}")


def _write_results(path: Path, results: dict[str, Any], merge: bool, partial: bool) -> None:
    """Write ``results``; with ``merge``, models not run now keep their entries from the file
    (one model at a time can be re-run), and with ``partial`` (``--rows``) so do the rows of a
    model that were not run now (its FP32 row and calibration timing are the new ones)."""
    out = results
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        previous = {m.get("asset"): m for m in old.get("models", [])}
        fresh = []
        for model in results["models"]:
            before = previous.pop(model["asset"], None)
            if model.get("timing_only"):
                if before is None:
                    continue
                model = {**before, "calibration_timing": model["calibration_timing"]}
            elif partial and before is not None:
                rows = {**before.get("rows", {}), **model["rows"]}
                model = {**before, **model, "rows": rows}
                for key in ("calibration_timing", "profile"):
                    if model.get(key) is None:
                        model[key] = before.get(key)
            fresh.append(model)
        order = {m: i for i, m in enumerate(MODELS)}
        models = sorted(list(previous.values()) + fresh,
                        key=lambda m: order.get(m.get("asset"), 99))
        out = {**results, "models": models}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=float))


def _commit() -> str:
    """HEAD of the checkout, with ``+dirty`` when onnxq/ has uncommitted changes."""
    try:
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=root, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnxq"],
                               capture_output=True, text=True, cwd=root, check=False).stdout
        return head + ("+dirty" if any(not l.startswith("??") for l in dirty.splitlines()) else "")
    except OSError:
        return ""


def _environment() -> dict[str, Any]:
    import onnx
    import onnx_ir
    import onnxruntime

    import onnxq

    return {
        "onnxq": onnxq.__version__, "commit": _commit(), "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__, "onnx_ir": onnx_ir.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "threads": THREADS, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", default="", help="only these row ids (comma-separated)")
    parser.add_argument("--quick", action="store_true",
                        help="effnet-lite0-bn only, 64 calibration images")
    parser.add_argument("--json", default=None,
                        help="default benchmarks/results/quantize.json (--quick: no JSON unless given)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the cProfile run of onnxq's calibration")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="work in DIR and keep the float and QDQ models there")
    parser.add_argument("--rounds", type=int, default=3,
                        help="latency rounds (round-robin over the models; best round reported)")
    parser.add_argument("--mem-limit-gb", type=float, default=17.0,
                        help="kill a quantization subprocess above this resident size")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    parser.add_argument("--no-merge", dest="merge", action="store_false",
                        help="overwrite the JSON instead of replacing only the models run now")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the calibration timing; merged into the JSON's model entries")
    parser.add_argument("--calib-reps", type=int, default=3,
                        help="rounds of the calibration-vs-FP32 timing (0: skip it)")
    # child mode
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--profile", dest="child_profile", action="store_true",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for quiet in ("onnxq", "onnx_ir"):
        logging.getLogger(quiet).setLevel(logging.WARNING)

    if args.one:
        run_one(args.one, Path(args.workdir), Path(args.out), args.quick, args.child_profile)
        return 0

    args.rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    models = ["effnet-lite0-bn"] if args.quick else [m.strip() for m in args.models.split(",")]
    json_path = Path(args.json) if args.json else None if args.quick else RESULTS / "quantize.json"
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="onnxq-bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"environment": _environment(), "quick": args.quick, "models": []}
    try:
        for model in models:
            t = time.perf_counter()
            result = run_model(model, work, args)
            result["benchmark_wall_s"] = time.perf_counter() - t
            print_report(result)
            results["models"].append(result)
            if json_path is not None:
                _write_results(json_path, results, merge=args.merge or args.timing_only,
                               partial=bool(args.rows))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if json_path is not None:
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
