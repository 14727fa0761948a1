"""Scaling benchmark: memory on a >2 GB model and time against graph size.

Two acceptance criteria of onnxq's I/O and pass pipeline are measured on generated models (no
downloads, fixed seeds):

**(a) big model, untouched weights stay unread.** A model with ~2.4 GB of float32 weights is
written tensor by tensor straight into its external data file (never more than one large tensor
in memory): a chain of ``layers`` Gemm layers of ``dim × dim`` (default 9 × 8192², 2.42 GB),
joined by ``Tanh`` (which does not commute with a per-channel scale, so CLE leaves the chain
alone and its weights are never read), beside a small ``Conv → BN → Relu → Conv → BN → Relu →
Conv`` branch that fold-bn and CLE do edit. In a **fresh subprocess** the benchmark times
``onnxq.load`` → each pass of ``fold-bn, cle`` (run exactly as :func:`onnxq.optimize` runs them,
``lift-constants`` first and ``cleanup`` last) → ``onnxq.save`` with external data to a new
path, and records memory per phase:

* ``VmHWM`` (the kernel's peak resident set of the worker, exact). ``ru_maxrss`` is recorded
  too but is not used: Linux carries the *parent's* peak across ``vfork``/``exec`` into the
  child's ``ru_maxrss``, so in a worker started by a process that generated 256 MB tensors it
  reads ~400 MB whatever the worker does;
* peaks of ``VmRSS``, ``RssAnon`` (heap: what the process allocated) and ``RssFile`` (pages of
  memory-mapped files: onnx-ir memory-maps external data, so weights a pass reads show up here)
  sampled from ``/proc/self/status`` every ``10 ms`` by a thread (a sampled peak can miss a
  spike shorter than that; ``VmHWM`` cannot);
* minor/major page faults (a weight page read through the mmap costs one fault per 4 KiB) and
  ``rchar`` from ``/proc/self/io``.

The output is then checked: every Gemm weight and bias in the output data file is compared
byte for byte with the input (streamed in 64 MiB chunks), the edited Conv weights must differ,
no BatchNormalization may remain, and (unless ``--no-ort``) onnxruntime runs both models with
graph optimizations disabled on one random batch in another subprocess (it loads the whole
model, which is fine there) and compares all outputs.

A second, smaller model (``--edit-all``, default 5 × 4096², 0.34 GB) joins its Gemms with
``Relu`` instead, so CLE pairs, reads and rewrites every large weight: the worst case, where
memory follows the edited bytes (``--big-link Relu`` does the same to the big model).

**(b) time against graph size.** MobileNetV2-like conv nets of ``~1.25k … 20k`` nodes (8/16
channels, 8×8 maps; each block ``Conv1x1 → BN → Clip(0,6) → DWConv3x3 → BN → Clip → Conv1x1 →
BN → Add``) are saved as single ``.onnx`` files; for each size a fresh subprocess times
``onnxq.load``, every pass of the ``dfq`` preset and ``onnxq.save`` (best of ``--repeats``
runs per phase). Growth is fitted as the slope of log(time) against log(nodes) over all sizes
and between the two largest (1 = linear, 2 = quadratic). A phase whose slope between the two
largest sizes exceeds ``--superlinear`` (default 1.25) is profiled with cProfile on the
largest model; the top functions go to the log and the JSON (``--profile`` profiles every
phase).

Command line::

    python -m benchmarks.scaling                 # full: sizes 1.25k…20k and the 2.4 GB model
    python -m benchmarks.scaling --quick         # small sizes only, no big model (smoke check)
    python -m benchmarks.scaling --no-big --sizes 1000,4000 --repeats 1
    python -m benchmarks.scaling --json out.json --keep

Generated models go to ``$ONNXQ_CACHE/bench`` (default ``~/.cache/onnxq/bench``), removed
afterwards unless ``--keep``. Results: ``benchmarks/results/scaling.json`` (``--quick``:
``scaling.quick.json``) and a table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import io
import json
import logging
import math
import os
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger("benchmarks.scaling")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_SIZES = (1250, 2500, 5000, 10000, 20000)
QUICK_SIZES = (300, 600, 1200)
OPSET = 17
#: clock name → the key of a phase record ("gc": wall time spent in CPython's cyclic GC)
CLOCKS = {"cpu": "cpu_seconds", "wall": "seconds", "gc": "gc_seconds"}
MIB = 2**20
#: nodes outside the repeated blocks: stem Conv/BN/Clip, head GlobalAveragePool/Flatten/Gemm
_FIXED_NODES = 6
_NODES_PER_BLOCK = 9


# ---- (b) conv nets of a given node count ---------------------------------------------------


def blocks_for_nodes(nodes: int) -> int:
    """Blocks of :func:`build_convnet` that give about ``nodes`` nodes."""
    return max(1, round((nodes - _FIXED_NODES) / _NODES_PER_BLOCK))


class _Builder:
    """Accumulates nodes and initializers of a generated graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, group: int = 1) -> str:
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * math.sqrt(2.0 / fan_in)
        w *= np.exp(self.rng.uniform(-1.5, 1.5, size=(cout, 1, 1, 1)))  # uneven channel ranges
        b = self.rng.standard_normal(cout) * 0.1
        self.init(f"{name}.w", w.astype(np.float32))
        self.init(f"{name}.b", b.astype(np.float32))
        pad = k // 2
        return self.node("Conv", [x, f"{name}.w", f"{name}.b"], name, group=group,
                         kernel_shape=[k, k], pads=[pad] * 4)

    def bn(self, x: str, name: str, c: int, gamma_scale: float = 1.0) -> str:
        rng = self.rng
        params = {
            "gamma": rng.uniform(0.5, 1.5, c) * gamma_scale,
            "beta": rng.normal(0.5, 1.0, c),  # some positive: high-bias fold has work
            "mean": rng.normal(0.0, 0.2, c),
            "var": rng.uniform(0.5, 1.5, c),
        }
        names = [self.init(f"{name}.{k}", v.astype(np.float32)) for k, v in params.items()]
        return self.node("BatchNormalization", [x, *names], name, epsilon=1e-5)

    def clip6(self, x: str, name: str) -> str:
        return self.node("Clip", [x, "relu6.lo", "relu6.hi"], name)


def build_convnet(
    blocks: int, channels: int = 8, expand: int = 16, spatial: int = 8, seed: int = 0
) -> onnx.ModelProto:
    """A MobileNetV2-like net with ``6 + 9·blocks`` nodes (shapes inferred, opset 17)."""
    g = _Builder(seed)
    g.init("relu6.lo", np.array(0.0, np.float32))
    g.init("relu6.hi", np.array(6.0, np.float32))
    x = g.conv("x", "stem.conv", 3, channels, 3)
    x = g.clip6(g.bn(x, "stem.bn", channels), "stem.clip")
    for i in range(blocks):
        p = f"b{i}"
        y = g.clip6(g.bn(g.conv(x, f"{p}.expand", channels, expand, 1), f"{p}.bn1", expand),
                    f"{p}.clip1")
        y = g.clip6(g.bn(g.conv(y, f"{p}.dw", expand, expand, 3, group=expand), f"{p}.bn2",
                         expand), f"{p}.clip2")
        y = g.bn(g.conv(y, f"{p}.project", expand, channels, 1), f"{p}.bn3", channels, 0.2)
        x = g.node("Add", [x, y], f"{p}.add")
    x = g.node("GlobalAveragePool", [x], "head.pool")
    x = g.node("Flatten", [x], "head.flatten", axis=1)
    w = g.rng.standard_normal((10, channels)).astype(np.float32)
    g.init("head.w", w)
    g.init("head.b", np.zeros(10, np.float32))
    g.node("Gemm", [x, "head.w", "head.b"], "logits", transB=1)
    graph = helper.make_graph(
        g.nodes, "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, spatial, spatial])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="benchmarks.scaling")
    return onnx.shape_inference.infer_shapes(model)


# ---- (a) the >2 GB model, written tensor by tensor ------------------------------------------


@dataclasses.dataclass(frozen=True)
class BigModel:
    path: Path
    data_path: Path
    #: bytes of the external data file (all Gemm weights and biases)
    data_bytes: int
    #: initializer names of the Gemm chain (never edited when the link is Tanh)
    gemm_tensors: tuple[str, ...]
    #: initializer names of the Conv weights fold-bn and CLE edit
    conv_weights: tuple[str, ...]


def _external_tensor(name: str, shape: Sequence[int], location: str, offset: int,
                     length: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _write_aligned(file: Any, array: np.ndarray, align: int = 4096) -> int:
    """Append ``array`` at the next ``align``-byte offset of ``file``; returns the offset."""
    offset = -(-file.tell() // align) * align
    file.seek(offset)
    array.tofile(file)
    return offset


def _conv_branch(g: _Builder) -> tuple[str, tuple[str, ...]]:
    """Conv → BN → Relu → Conv → BN → Relu → Conv on input ``x``: what fold-bn and CLE edit."""
    y = g.node("Relu", [g.bn(g.conv("x", "c0", 3, 16, 3), "bn0", 16)], "r0")
    y = g.node("Relu", [g.bn(g.conv(y, "c1", 16, 32, 3), "bn1", 32)], "r1")
    g.conv(y, "y", 32, 16, 1)
    return "y", ("c0.w", "c1.w", "y.w")


def write_big_model(folder: Path, layers: int = 9, dim: int = 8192, link: str = "Tanh",
                    seed: int = 0) -> BigModel:
    """Write ``big.onnx`` + ``big.onnx.data``: ``layers`` Gemms of ``dim²`` and a conv branch.

    Each Gemm weight is generated, appended to the data file and freed before the next one,
    so at most one ``dim²`` float32 tensor (plus a same-size temporary) is ever in memory.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path, data_path = folder / "big.onnx", folder / "big.onnx.data"
    rng = np.random.default_rng(seed)
    g = _Builder(seed + 1)
    _, conv_weights = _conv_branch(g)
    gemm_tensors: list[str] = []
    h = "h"
    with open(data_path, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((dim, dim), dtype=np.float32)
            w *= np.float32(1.5 / math.sqrt(dim))
            b = (rng.standard_normal(dim, dtype=np.float32) * np.float32(0.1))
            for name, arr in ((f"fc{i}.w", w), (f"fc{i}.b", b)):
                offset = _write_aligned(f, arr)
                g.inits.append(_external_tensor(name, arr.shape, data_path.name, offset,
                                                arr.nbytes))
                gemm_tensors.append(name)
            del w, b
            out = "z" if i == layers - 1 else f"fc{i}"
            h = g.node("Gemm", [h, f"fc{i}.w", f"fc{i}.b"], out, transB=1)
            if i < layers - 1:
                h = g.node(link, [h], f"act{i}")
            logger.debug("wrote Gemm %d/%d", i + 1, layers)
        data_bytes = f.tell()
    graph = helper.make_graph(
        g.nodes, "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, dim])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="benchmarks.scaling")
    path.write_bytes(model.SerializeToString())
    return BigModel(path, data_path, data_bytes, tuple(gemm_tensors), conv_weights)


# ---- memory and time measurement (runs inside the worker subprocess) -----------------------


def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _proc_io() -> dict[str, int]:
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


class GcTimer:
    """Wall time spent in CPython's cyclic garbage collector, and full (gen-2) collections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._start
        self.full += info["generation"] == 2

    def snapshot(self) -> tuple[float, int]:
        return self.seconds, self.full


class MemorySampler:
    """Samples ``/proc/self/status`` in a thread; keeps the peak of each field per phase.

    Also times the garbage collector (:class:`GcTimer`) per phase.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.gc = GcTimer()

    def __enter__(self) -> MemorySampler:  # noqa: PYI034 (Self needs Python 3.11)
        self._thread.start()
        gc.callbacks.append(self.gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self.gc)
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        status = _proc_status()
        with self._lock:
            peak = self.peaks.setdefault(self.phase, {})
            for key, value in status.items():
                peak[key] = max(peak.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    @contextlib.contextmanager
    def measure(self, name: str, record: dict[str, Any]) -> Iterator[None]:
        """Time the block and record its memory peaks and page faults under ``name``."""
        self.sample()
        with self._lock:
            self.phase = name
        before = resource.getrusage(resource.RUSAGE_SELF)
        io_before = _proc_io()
        gc_start, full_start = self.gc.snapshot()
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        gc_seconds, full = self.gc.snapshot()
        self.sample()
        after = resource.getrusage(resource.RUSAGE_SELF)
        io_after = _proc_io()
        status = _proc_status()
        record[name] = {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "gc_seconds": gc_seconds - gc_start,
            "gc_full_collections": full - full_start,
            "peak_sampled": dict(self.peaks.get(name, {})),
            "vm_hwm_after": status.get("VmHWM", 0),
            "ru_maxrss_after": after.ru_maxrss * 1024,
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "major_faults": after.ru_majflt - before.ru_majflt,
            "rchar": io_after.get("rchar", 0) - io_before.get("rchar", 0),
            "wchar": io_after.get("wchar", 0) - io_before.get("wchar", 0),
        }


def _pass_summary(report: Any) -> dict[str, Any]:
    return {"changed": report.changed, "skipped": len(report.skipped),
            "reasons": dict(report.reasons().most_common(3))}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, optimize pass by pass, save; all phases timed and memory-sampled.

    ``spec``: ``model``, ``out``, ``passes`` (recipe string), optional ``external_data``,
    ``profile`` (phase names to run under cProfile: ``load``, ``pass:<name>``, ``save``).
    """
    record: dict[str, Any] = {}
    profiles: dict[str, str] = {}
    with MemorySampler() as sampler:
        import onnx_ir as ir

        import onnxq
        from onnxq.passes.pipelines import build, parse_passes

        baseline = _proc_status()
        to_profile = set(spec.get("profile", ()))

        def phase(name: str) -> contextlib.AbstractContextManager[None]:
            return _profiled(sampler.measure(name, record), name in to_profile, name, profiles)

        with phase("load"):
            model = onnxq.load(spec["model"])
        nodes_in = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        reports = {}
        for p in build(parse_passes(spec["passes"])):
            with phase(f"pass:{p.name}"):
                p(model)
            reports[p.name] = _pass_summary(p.report)
        nodes_out = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        with phase("save"):
            onnxq.save(model, spec["out"], external_data=spec.get("external_data"))
    final = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "baseline": baseline,
        "phases": record,
        "passes": reports,
        "nodes_in": nodes_in,
        "nodes_out": nodes_out,
        "ru_maxrss": final.ru_maxrss * 1024,
        "vm_hwm": _proc_status().get("VmHWM", 0),
        "profiles": profiles,
    }


@contextlib.contextmanager
def _profiled(inner: contextlib.AbstractContextManager[None], enabled: bool, name: str,
              out: dict[str, str]) -> Iterator[None]:
    with inner:
        if not enabled:
            yield
            return
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            out[name] = _profile_text(profiler)


def _profile_text(profiler: cProfile.Profile, top: int = 18) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def run_ort_check(spec: dict[str, Any]) -> dict[str, Any]:
    """Run both models under onnxruntime (no graph optimizations) on one random batch."""
    import onnxruntime as ort

    rng = np.random.default_rng(spec.get("seed", 1))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    results = []
    feeds: dict[str, np.ndarray] | None = None
    for path in (spec["reference"], spec["candidate"]):
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        if feeds is None:
            feeds = {
                i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
                .astype(np.float32)
                for i in session.get_inputs()
            }
        names = [o.name for o in session.get_outputs()]
        results.append(dict(zip(names, session.run(None, feeds))))
        del session
    diffs = {}
    for name, ref in results[0].items():
        got = results[1][name]
        scale = float(ref.max() - ref.min()) or 1.0
        diffs[name] = float(np.max(np.abs(ref.astype(np.float64) - got))) / scale
    return {"max_rel_diff": diffs, "vm_hwm": _proc_status().get("VmHWM", 0)}


def _subprocess(mode: str, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``mode`` (``worker`` / ``ort``) in a fresh interpreter; returns its JSON result."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tmp:
        result_path = Path(tmp.name)
    try:
        cmd = [sys.executable, "-m", "benchmarks.scaling", f"--_{mode}", json.dumps(spec),
               "--_result", str(result_path)]
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        subprocess.run(cmd, check=True, cwd=root, env=env, timeout=timeout)
        return json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)


# ---- (a) run and verify --------------------------------------------------------------------


def _tensor_locations(model_path: Path) -> dict[str, TensorProto]:
    proto = onnx.load(str(model_path), load_external_data=False)
    return {t.name: t for t in proto.graph.initializer}


def _extent(tensor: TensorProto, folder: Path) -> tuple[Path, int, int] | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    return folder / info["location"], int(info.get("offset", 0)), int(info["length"])


def _same_bytes(a: tuple[Path, int, int], b: tuple[Path, int, int], chunk: int = 64 * MIB) -> bool:
    if a[2] != b[2]:
        return False
    with open(a[0], "rb") as fa, open(b[0], "rb") as fb:
        fa.seek(a[1])
        fb.seek(b[1])
        left = a[2]
        while left:
            n = min(chunk, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def _tensor_array(tensor: TensorProto, folder: Path) -> np.ndarray:
    return numpy_helper.to_array(tensor, base_dir=str(folder))


def verify_big(big: BigModel, out: Path) -> dict[str, Any]:
    """Byte-compare the Gemm tensors, check the conv weights changed and BN is gone."""
    before, after = _tensor_locations(big.path), _tensor_locations(out)
    identical, differing, missing = 0, [], []
    for name in big.gemm_tensors:
        if name not in after:
            missing.append(name)
            continue
        a, b = _extent(before[name], big.path.parent), _extent(after[name], out.parent)
        if a is not None and b is not None:
            same = _same_bytes(a, b)
        else:  # stored inline (tiny test models): small enough to compare in memory
            same = (_tensor_array(before[name], big.path.parent).tobytes()
                    == _tensor_array(after[name], out.parent).tobytes())
        if same:
            identical += 1
        else:
            differing.append(name)
    edited = [
        name for name in big.conv_weights
        if name in after and not np.array_equal(_tensor_array(before[name], big.path.parent),
                                                _tensor_array(after[name], out.parent))
    ]
    graph = onnx.load(str(out), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    return {
        "gemm_tensors": len(big.gemm_tensors),
        "gemm_identical": identical,
        "gemm_differing": len(differing),
        "gemm_missing": missing,
        "edited_conv_weights_changed": f"{len(edited)}/{len(big.conv_weights)}",
        "batchnorm_left": ops.count("BatchNormalization"),
        "gemm_count": ops.count("Gemm"),
    }


def bench_big(folder: Path, layers: int, dim: int, link: str, passes: str, ort_check: bool
              ) -> dict[str, Any]:
    t0 = time.perf_counter()
    big = write_big_model(folder, layers, dim, link)
    generate_s = time.perf_counter() - t0
    logger.info("generated %s: %.2f GB of external data in %.1f s", big.path,
                big.data_bytes / 1e9, generate_s)
    out = folder / "out" / "big.opt.onnx"
    spec = {"model": str(big.path), "out": str(out), "passes": passes, "external_data": True}
    measured = _subprocess("worker", spec)
    t0 = time.perf_counter()
    verified = verify_big(big, out)
    verified["byte_check_seconds"] = time.perf_counter() - t0
    if ort_check:
        t0 = time.perf_counter()
        verified["onnxruntime"] = _subprocess("ort", {"reference": str(big.path),
                                                       "candidate": str(out)})
        verified["onnxruntime"]["seconds"] = time.perf_counter() - t0
    return {
        "layers": layers, "dim": dim, "link": link, "passes": passes,
        "model_bytes": big.data_bytes + big.path.stat().st_size,
        "output_bytes": out.stat().st_size + (out.parent / (out.name + ".data")).stat().st_size,
        "generate_seconds": generate_s,
        "measured": measured,
        "verified": verified,
    }


# ---- (b) run and fit -----------------------------------------------------------------------


def _phase_names(result: dict[str, Any]) -> list[str]:
    return list(result["phases"])


def bench_size(folder: Path, target: int, repeats: int, passes: str,
               profile: Sequence[str] = ()) -> dict[str, Any]:
    blocks = blocks_for_nodes(target)
    path = folder / f"convnet-{target}.onnx"
    t0 = time.perf_counter()
    model = build_convnet(blocks)
    onnx.save(model, str(path))
    generate_s = time.perf_counter() - t0
    runs = []
    for r in range(repeats):
        spec = {"model": str(path), "out": str(folder / f"convnet-{target}.opt.onnx"),
                "passes": passes, "profile": list(profile) if r == 0 else []}
        runs.append(_subprocess("worker", spec))
    best = {clock: {name: min(run["phases"][name][key] for run in runs)
                    for name in _phase_names(runs[0])}
            for clock, key in CLOCKS.items()}
    return {
        "target_nodes": target, "blocks": blocks, "nodes": runs[0]["nodes_in"],
        "nodes_out": runs[0]["nodes_out"], "file_bytes": path.stat().st_size,
        "generate_seconds": generate_s, "best": best,
        "total": {clock: sum(best[clock].values()) for clock in CLOCKS},
        "vm_hwm": min(run["vm_hwm"] for run in runs),
        "passes": runs[0]["passes"], "profiles": runs[0]["profiles"],
        "runs": [{k: {c: v[key] for c, key in CLOCKS.items()} for k, v in run["phases"].items()}
                 for run in runs],
    }


def loglog_slope(nodes: Sequence[float], seconds: Sequence[float]) -> float:
    """Least-squares slope of log(seconds) against log(nodes)."""
    x, y = np.log(np.asarray(nodes, float)), np.log(np.maximum(np.asarray(seconds, float), 1e-9))
    return float(np.polyfit(x, y, 1)[0]) if len(x) > 1 else float("nan")


def fit_growth(rows: Sequence[dict[str, Any]], clock: str) -> dict[str, dict[str, float]]:
    """Per phase (and total): log-log slope over all sizes and between the two largest."""
    nodes = [row["nodes"] for row in rows]
    series = {name: [row["best"][clock][name] for row in rows] for name in rows[0]["best"][clock]}
    series["total"] = [row["total"][clock] for row in rows]
    if clock != "gc":
        series["total_without_gc"] = [max(row["total"][clock] - row["total"]["gc"], 1e-9)
                                      for row in rows]
    return {
        name: {"slope_all": loglog_slope(nodes, secs),
               "slope_last": loglog_slope(nodes[-2:], secs[-2:])}
        for name, secs in series.items()
    }


def superlinear_phases(fit: dict[str, dict[str, float]], rows: Sequence[dict[str, Any]],
                       threshold: float, clock: str, min_seconds: float = 0.05) -> list[str]:
    last = rows[-1]["best"][clock]
    return [name for name, f in fit.items()
            if not name.startswith("total") and f["slope_last"] > threshold and last[name] >= min_seconds]


# ---- report --------------------------------------------------------------------------------


def _short(phase: str) -> str:
    return phase.removeprefix("pass:")


def scaling_table(rows: Sequence[dict[str, Any]], fit: dict[str, dict[str, float]],
                  clock: str) -> str:
    phases = list(rows[0]["best"][clock])
    other = "wall" if clock == "cpu" else "cpu"
    head = (["nodes"] + [_short(p) for p in phases]
            + ["total", "µs/node", f"total {other}", "in GC", "peak MiB"])
    lines = [head]
    for row in rows:
        total = row["total"][clock]
        cells = [str(row["nodes"])] + [f"{row['best'][clock][p]:.3f}" for p in phases]
        cells += [f"{total:.2f}", f"{1e6 * total / row['nodes']:.0f}",
                  f"{row['total'][other]:.2f}", f"{row['total']['gc']:.2f}",
                  f"{row['vm_hwm'] / MIB:.0f}"]
        lines.append(cells)
    for key in ("slope_all", "slope_last"):
        lines.append([key.replace("_", " ")] + [f"{fit[p][key]:.2f}" for p in phases]
                     + [f"{fit['total'][key]:.2f}", "", "", "", ""])
    return _format(lines)


def big_table(big: dict[str, Any]) -> str:
    measured, size = big["measured"], big["model_bytes"]
    lines = [["phase", "seconds", "VmHWM MiB", "peak RssAnon MiB", "peak RssFile MiB",
              "minor faults", "% of model"]]
    base = measured["baseline"]
    lines.append(["imports (baseline)", "", f"{base['VmHWM'] / MIB:.0f}",
                  f"{base['RssAnon'] / MIB:.0f}", f"{base['RssFile'] / MIB:.0f}", "",
                  f"{100 * base['VmHWM'] / size:.1f}"])
    for name, ph in measured["phases"].items():
        peak = ph["peak_sampled"]
        lines.append([name, f"{ph['seconds']:.2f}", f"{ph['vm_hwm_after'] / MIB:.0f}",
                      f"{peak.get('RssAnon', 0) / MIB:.0f}", f"{peak.get('RssFile', 0) / MIB:.0f}",
                      str(ph["minor_faults"]), f"{100 * ph['vm_hwm_after'] / size:.1f}"])
    total = sum(ph["seconds"] for ph in measured["phases"].values())
    lines.append(["total", f"{total:.2f}", f"{measured['vm_hwm'] / MIB:.0f}", "", "", "",
                  f"{100 * measured['vm_hwm'] / size:.1f}"])
    return _format(lines)


def _format(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def environment() -> dict[str, Any]:
    import onnx_ir
    import onnxruntime

    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "numpy": np.__version__, "onnx": onnx.__version__,
        "onnx_ir": onnx_ir.__version__, "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ---- command line --------------------------------------------------------------------------


def bench_root() -> Path:
    from benchmarks.assets import cache_dir

    return cache_dir() / "bench"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"sizes {QUICK_SIZES}, one repeat, no big model")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=None,
                    help="run the >2 GB model (default: on, off with --quick)")
    ap.add_argument("--sizes", help=f"comma-separated node counts (default {FULL_SIZES})")
    ap.add_argument("--repeats", type=int, help="runs per size, best per phase (default 3)")
    ap.add_argument("--passes", default="dfq", help="pipeline for the scaling runs")
    ap.add_argument("--big-passes", default="fold-bn,cle", help="pipeline for the big model")
    ap.add_argument("--big-layers", type=int, default=9)
    ap.add_argument("--big-dim", type=int, default=8192)
    ap.add_argument("--big-link", default="Tanh", choices=["Tanh", "Relu"],
                    help="op between the big Gemms: Tanh blocks CLE (weights untouched), "
                         "Relu lets CLE edit them all")
    ap.add_argument("--edit-all", default="5x4096", metavar="LAYERSxDIM",
                    help="with the big model, also a Relu-joined Gemm chain whose weights CLE "
                    "all edits (memory then follows the edited bytes); 'none' skips it")
    ap.add_argument("--ort", action=argparse.BooleanOptionalAction, default=True,
                    help="compare big input/output models under onnxruntime")
    ap.add_argument("--profile", action="store_true", help="cProfile every phase at the "
                    "largest size (default: only superlinear phases)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="time fitted and tabled: process CPU time (robust on a shared "
                    "machine) or wall time (both are recorded)")
    ap.add_argument("--superlinear", type=float, default=1.25,
                    help="slope between the two largest sizes above which a phase is profiled")
    ap.add_argument("--json", type=Path, help="results file (default benchmarks/results/"
                    "scaling.json, --quick: scaling.quick.json)")
    ap.add_argument("--workdir", type=Path, help="where models are generated "
                    "(default $ONNXQ_CACHE/bench)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_ort", help=argparse.SUPPRESS)
    ap.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run_scaling(args: argparse.Namespace, folder: Path, sizes: Sequence[int],
                repeats: int) -> dict[str, Any]:
    rows = []
    for target in sizes:
        row = bench_size(folder, target, repeats, args.passes)
        logger.info("%d nodes: %.2f s total %s time (%s)", row["nodes"],
                    row["total"][args.clock], args.clock,
                    ", ".join(f"{_short(k)} {v:.3f}" for k, v in row["best"][args.clock].items()))
        rows.append(row)
    fits = {clock: fit_growth(rows, clock) for clock in CLOCKS}
    fit = fits[args.clock]
    superlinear = superlinear_phases(fit, rows, args.superlinear, args.clock)
    to_profile = list(rows[0]["best"][args.clock]) if args.profile else superlinear
    profiles: dict[str, str] = {}
    if to_profile and len(rows) > 1:
        logger.info("profiling %s at %d nodes", ", ".join(to_profile), rows[-1]["nodes"])
        prof = bench_size(folder, sizes[-1], 1, args.passes, profile=to_profile)
        profiles = prof["profiles"]
        for name, text in profiles.items():
            logger.info("cProfile of %s at %d nodes:\n%s", name, prof["nodes"], text)
    for row in rows:
        row.pop("profiles", None)
    return {"passes": args.passes, "repeats": repeats, "clock": args.clock, "rows": rows,
            "fit": fits, "superlinear": superlinear, "profiles": profiles}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args._worker or args._ort:
        for name in ("onnxq", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
        spec = json.loads(args._worker or args._ort)
        result = run_worker(spec) if args._worker else run_ort_check(spec)
        args._result.write_text(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        list(QUICK_SIZES) if args.quick else list(FULL_SIZES))
    repeats = args.repeats or (1 if args.quick else 3)
    run_big = args.big if args.big is not None else not args.quick
    out_json = args.json or RESULTS_DIR / ("scaling.quick.json" if args.quick else "scaling.json")
    root = args.workdir or bench_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="scaling-", dir=root))
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(), "workdir": str(folder)}
    try:
        results["scaling"] = run_scaling(args, folder, sizes, repeats)
        if run_big:
            results["big"] = bench_big(folder / "big", args.big_layers, args.big_dim,
                                       args.big_link, args.big_passes, args.ort)
            if not args.keep:
                shutil.rmtree(folder / "big", ignore_errors=True)
            if args.edit_all != "none":
                layers, _, dim = args.edit_all.partition("x")
                results["big_edit_all"] = bench_big(folder / "edit-all", int(layers), int(dim),
                                                    "Relu", args.big_passes, args.ort)
    finally:
        if args.keep:
            logger.info("kept generated models in %s", folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    results["wall_seconds"] = time.perf_counter() - started
    print(report(results))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    logger.info("wrote %s (%.0f s in all)", out_json, results["wall_seconds"])
    return 0


def report(results: dict[str, Any]) -> str:
    scaling = results["scaling"]
    clock = scaling["clock"]
    parts = [(f"\n(b) {scaling['passes']} pipeline against graph size ({clock} seconds per "
              f"phase, best of {scaling['repeats']}; slope = d log t / d log n)"),
             scaling_table(scaling["rows"], scaling["fit"][clock], clock)]
    no_gc = scaling["fit"][clock].get("total_without_gc")
    if no_gc:
        parts.append(f"total without the time spent in the GC: slope all {no_gc['slope_all']:.2f},"
                     f" slope last {no_gc['slope_last']:.2f}")
    if scaling["superlinear"]:
        parts += [_superlinear_note(scaling["rows"], name, clock) for name in scaling["superlinear"]]
    big = results.get("big")
    if big:
        parts += _big_report("(a) big model", big)
    edit_all = results.get("big_edit_all")
    if edit_all:
        parts += _big_report("(a') every big weight edited (CLE pairs the Gemms)", edit_all)
    return "\n".join(parts)


def _superlinear_note(rows: Sequence[dict[str, Any]], phase: str, clock: str) -> str:
    """The phase at the two largest sizes, with and without the time the GC took in it."""
    (n0, n1) = (rows[-2]["nodes"], rows[-1]["nodes"])
    t0, t1 = (rows[-2]["best"][clock][phase], rows[-1]["best"][clock][phase])
    g0, g1 = (rows[-2]["best"]["gc"][phase], rows[-1]["best"]["gc"][phase])
    without = loglog_slope([n0, n1], [max(t0 - g0, 1e-6), max(t1 - g1, 1e-6)])
    return (f"superlinear: {_short(phase)} {t0:.3f} → {t1:.3f} s from {n0} to {n1} nodes, of "
            f"which in the GC {g0:.3f} → {g1:.3f} s; slope without GC time {without:.2f}")


def _big_report(title: str, big: dict[str, Any]) -> list[str]:
    v = big["verified"]
    cle_pairs = big["measured"]["passes"].get("cle", {}).get("changed")
    lines = [(f"\n{title}: {big['layers']}×Gemm[{big['dim']}²] joined by {big['link']} + conv "
              f"branch, model {big['model_bytes'] / 1e9:.2f} GB, passes {big['passes']}; "
              f"CLE pairs: {cle_pairs}"),
             big_table(big),
             (f"Gemm tensors byte-identical to the input: {v['gemm_identical']}/"
              f"{v['gemm_tensors']}; conv weights changed: {v['edited_conv_weights_changed']}; "
              f"BatchNormalization left: {v['batchnorm_left']}")]
    if "onnxruntime" in v:
        diffs = ", ".join(f"{k} {d:.1e}" for k, d in v["onnxruntime"]["max_rel_diff"].items())
        lines.append(f"onnxruntime (no graph optimizations) max |Δ|/range: {diffs}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
