"""Reference figures from AIMET-ONNX: AdaRound and sequential MSE on EfficientNet-Lite0, W4A8.

Not part of onnxq and not run by its tests: it needs ``aimet-onnx`` (which pulls torch) in a
separate virtual environment, e.g.::

    python -m venv /work/aimet-venv
    /work/aimet-venv/bin/pip install torch==2.13.0     # CPU file on this machine's disk
    /work/aimet-venv/bin/pip install aimet-onnx        # 2.42.0 (its torchvision raises torch to 2.14.1)

Inputs are made once with the *main* environment's python, from the repository root::

    python -c "import onnxq; onnxq.save(onnxq.optimize('~/.cache/onnxq/models/effnet-lite0-bn.onnx', passes=['fold-bn']), '/tmp/effnet_folded.onnx')"
    python -c "from benchmarks import datasets; import numpy as np; x,y=datasets.imagenet_sample(0,256); np.savez('/tmp/calib.npz',x=x,y=y); x,y=datasets.imagenet_sample(256,244); np.savez('/tmp/test.npz',x=x,y=y)"

(``/tmp/effnet_folded.onnx`` is only used with ``--model onnxq-folded``; by default the BN model is
folded with ``aimet_onnx.batch_norm_fold.fold_all_batch_norms_to_weight``.) Then, from the
repository root::

    OMP_NUM_THREADS=2 flock /tmp/onnxq-bench.lock /work/aimet-venv/bin/python -m benchmarks.aimet_ref \
        [--methods fp32,nearest,adaround,seqmse] [--adaround-iters N] [--json PATH]

Settings (AIMET's own defaults wherever the brief allows):

* ``QuantizationSimModel(model, param_type=int4, activation_type=int8, quant_scheme="min_max",
  config_file="default")``. AIMET's ``default`` config is ``default_config_per_channel.json``:
  per-channel symmetric weights for Conv/Gemm/MatMul, asymmetric activations, bias not quantized,
  model input quantized, supergroups Conv+Relu / Conv+Clip / Add+Relu / Gemm+Relu (no quantizer
  between the members). ``min_max`` is the scheme ``apply_seq_mse`` requires.
* calibration: images 0..255 of the ImageNet sample as 8 batches of 32 (``{"input": x}`` dicts);
  test: images 256..499 (244), top-1/top-5 of the sim's onnxruntime session, batch 32.
* nearest: ``sim.compute_encodings(calib)``.
* AdaRound: ``aimet_onnx.apply_adaround(sim, calib, num_iterations=N)`` (AIMET default N=10000;
  its other hyper-parameters are module constants: Adam lr 1e-3, 32 samples per step, warm start
  0.2, beta 20→2, reg 0.01), then ``sim.compute_encodings(calib)`` for the activations.
* SeqMSE: ``aimet_onnx.apply_seq_mse(sim, calib)`` (defaults: 20 candidates, loss "mse",
  inp_symmetry "symqt", all batches), then ``sim.compute_encodings(calib)``.

Every method runs in a fresh interpreter (``--one METHOD``), which reports its wall time and its
peak resident size (``VmHWM`` of ``/proc/self/status``, reset by exec, unlike ``ru_maxrss``). Each
AdaRound layer is timed (``adaround_module`` wrapped) and its optimisation loop is timed from the
first to the last reconstruction-loss call, so a run with few iterations extrapolates to the
default: ``sum(overhead_layer + 10000 * per_iteration_layer)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BN_MODEL = Path("~/.cache/onnxq/models/effnet-lite0-bn.onnx").expanduser()
ONNXQ_FOLDED = Path("/tmp/effnet_folded.onnx")
CALIB = Path("/tmp/calib.npz")
TEST = Path("/tmp/test.npz")
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "aimet_ref.json"
BATCH = 32
DEFAULT_ADAROUND_ITERS = 10000
METHODS = ("fp32", "nearest", "adaround", "seqmse")


def _vmhwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return -1


def _batches(x: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"input": np.ascontiguousarray(x[s : s + BATCH])} for s in range(0, len(x), BATCH)]


def _topk(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    order = np.argsort(-logits, axis=1, kind="stable")
    return {
        f"top{k}": float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1))) for k in (1, 5)
    }


def _run(session, x: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(None, b)[0] for b in _batches(x)]).astype(np.float32)


def _load_model(which: str):
    import onnx

    if which == "onnxq-folded":
        return onnx.load(str(ONNXQ_FOLDED)), {"bn_fold": "onnxq fold-bn (/tmp/effnet_folded.onnx)"}
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

    model = onnx.load(str(BN_MODEL))
    t = time.perf_counter()
    conv_bns, bn_convs = fold_all_batch_norms_to_weight(model)
    left = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    return model, {
        "bn_fold": "aimet_onnx.batch_norm_fold.fold_all_batch_norms_to_weight",
        "bn_folded": len(conv_bns) + len(bn_convs),
        "bn_left": left,
        "bn_fold_s": time.perf_counter() - t,
    }


class _AdaroundTimer:
    """Wraps AdaroundOptimizer.adaround_module and AdaroundLoss.compute_recon_loss to time layers."""

    def __init__(self) -> None:
        from aimet_onnx.adaround import adaround_loss, adaround_optimizer

        self.layers: list[dict] = []
        self._current: dict | None = None
        opt = adaround_optimizer.AdaroundOptimizer
        loss = adaround_loss.AdaroundLoss
        orig_module = opt.adaround_module.__func__
        orig_recon = loss.compute_recon_loss
        timer = self

        def adaround_module(cls, module, *args, **kwargs):
            rec = {"layer": module.outputs[0] if module.outputs else "?", "type": module.type, "calls": 0}
            timer._current = rec
            t = time.perf_counter()
            try:
                return orig_module(cls, module, *args, **kwargs)
            finally:
                rec["total_s"] = time.perf_counter() - t
                timer.layers.append(rec)
                timer._current = None

        def compute_recon_loss(*args, **kwargs):
            rec = timer._current
            if rec is not None:
                now = time.perf_counter()
                rec.setdefault("first", now)
                rec["last"] = now
                rec["calls"] += 1
            return orig_recon(*args, **kwargs)

        opt.adaround_module = classmethod(adaround_module)
        loss.compute_recon_loss = staticmethod(compute_recon_loss)

    def summary(self, iters: int, target_iters: int) -> dict:
        layers = []
        est = 0.0
        for rec in self.layers:
            calls = rec["calls"]
            per_iter = (rec["last"] - rec["first"]) / (calls - 1) if calls > 1 else 0.0
            # loop ~ calls * per_iter; everything else (activation sampling, setup) is overhead
            overhead = rec["total_s"] - per_iter * calls
            est += overhead + per_iter * target_iters
            layers.append(
                {
                    "layer_output": rec["layer"],
                    "type": rec["type"],
                    "total_s": round(rec["total_s"], 4),
                    "iterations": calls,
                    "per_iteration_ms": round(per_iter * 1e3, 4),
                    "overhead_s": round(overhead, 4),
                }
            )
        return {
            "layers_optimized": len(layers),
            "iterations_run": iters,
            "layers_total_s": sum(r["total_s"] for r in self.layers),
            "overhead_total_s": sum(r["overhead_s"] for r in layers),
            "per_iteration_all_layers_ms": sum(r["per_iteration_ms"] for r in layers),
            f"extrapolated_s_at_{target_iters}_iters": est,
            "layers": layers,
        }


def run_one(method: str, args: argparse.Namespace) -> dict:
    """One method in this process; returns its figures."""
    import onnxruntime as ort
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    calib = np.load(CALIB)
    test = np.load(TEST)
    xc, xt, yt = calib["x"], test["x"], test["y"]
    calib_batches = _batches(xc)
    out: dict = {"method": method, "rss_before_bytes": _rss_bytes(), "hwm_before_bytes": _vmhwm_bytes()}
    t0 = time.perf_counter()
    model, fold_info = _load_model(args.model)
    out.update(fold_info)

    if method == "fp32":
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        t = time.perf_counter()
        logits = _run(sess, xt)
        out["eval_s"] = time.perf_counter() - t
        out.update(_topk(logits, yt))
        out["quantize_s"] = 0.0
        out["process_wall_s"] = time.perf_counter() - t0
        out["vmhwm_bytes"] = _vmhwm_bytes()
        return out

    import aimet_onnx
    from aimet_onnx import QuantizationSimModel

    timer = _AdaroundTimer() if method == "adaround" else None
    t = time.perf_counter()
    sim = QuantizationSimModel(
        model,
        param_type=aimet_onnx.int4,
        activation_type=aimet_onnx.int8,
        quant_scheme="min_max",
        config_file="default",
        session_options_kwargs={"intra_op_num_threads": threads},
    )
    out["sim_build_s"] = time.perf_counter() - t
    t_q = time.perf_counter()
    if method == "adaround":
        t = time.perf_counter()
        aimet_onnx.apply_adaround(sim, calib_batches, num_iterations=args.adaround_iters)
        out["adaround_s"] = time.perf_counter() - t
        out["adaround_iters"] = args.adaround_iters
    elif method == "seqmse":
        t = time.perf_counter()
        aimet_onnx.apply_seq_mse(sim, calib_batches)
        out["seqmse_s"] = time.perf_counter() - t
        out["seqmse_num_candidates"] = 20
    elif method != "nearest":
        raise SystemExit(f"unknown method {method}")
    t = time.perf_counter()
    sim.compute_encodings(calib_batches)
    out["compute_encodings_s"] = time.perf_counter() - t
    # quantization time: sim construction + algorithm + calibration (BN fold excluded: see bn_fold_s)
    out["quantize_s"] = time.perf_counter() - t_q + out["sim_build_s"]
    t = time.perf_counter()
    logits = _run(sim.session, xt)
    out["eval_s"] = time.perf_counter() - t
    out.update(_topk(logits, yt))
    # check the config really gave W4 per-channel symmetric / A8 asymmetric
    params = [sim.qc_quantize_op_dict[n] for n in sim.param_names]
    enabled = [q for q in params if q.enabled]
    out["weight_quantizers"] = {
        "enabled": len(enabled),
        "bitwidths": sorted({int(q.bitwidth) for q in enabled}),
        "per_channel": sum(bool(q.quant_info.usePerChannelMode) for q in enabled),
        "symmetric": sum(bool(q.use_symmetric_encodings) for q in enabled),
    }
    acts = [sim.qc_quantize_op_dict[n] for n in sim.activation_names if n in sim.qc_quantize_op_dict]
    act_on = [q for q in acts if q.enabled]
    out["activation_quantizers"] = {
        "enabled": len(act_on),
        "bitwidths": sorted({int(q.bitwidth) for q in act_on}),
        "symmetric": sum(bool(q.use_symmetric_encodings) for q in act_on),
    }
    if timer is not None:
        out["adaround_timing"] = timer.summary(args.adaround_iters, DEFAULT_ADAROUND_ITERS)
    out["process_wall_s"] = time.perf_counter() - t0
    out["vmhwm_bytes"] = _vmhwm_bytes()
    return out


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    for pkg in ("aimet-onnx", "torch", "onnxruntime", "onnx", "numpy"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    v["threads"] = int(os.environ.get("OMP_NUM_THREADS", "2"))
    v["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return v


def _child(method: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [
        sys.executable, "-m", "benchmarks.aimet_ref", "--one", method, "--one-out", path,
        "--model", args.model, "--adaround-iters", str(args.adaround_iters),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    wall = time.perf_counter() - t
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        res = {"method": method, "error": f"child exited {proc.returncode} without a result"}
    finally:
        Path(path).unlink(missing_ok=True)
    res["subprocess_wall_s"] = wall
    return res


def _label(method: str, r: dict) -> str:
    if method == "adaround":
        n = r.get("adaround_iters")
        tag = "default" if n == DEFAULT_ADAROUND_ITERS else "REDUCED"
        return f"AdaRound ({n} it/layer, {tag})"
    return {"fp32": "FP32", "nearest": "W4A8 nearest", "seqmse": "W4A8 SeqMSE (20 cand.)"}.get(method, method)


def _table(rows: dict) -> str:
    lines = [f"{'method':36s} {'top1':>7s} {'top5':>7s} {'quant s':>9s} {'proc s':>8s} {'peak MiB':>9s}"]
    for key, r in rows.items():
        if "error" in r:
            lines.append(f"{key:36s} ERROR {r['error']}")
            continue
        lines.append(
            f"{_label(r['method'], r):36s} {r['top1']:7.4f} {r['top5']:7.4f} {r['quantize_s']:9.1f} "
            f"{r['process_wall_s']:8.1f} {r['vmhwm_bytes'] / 2**20:9.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--adaround-iters", type=int, default=DEFAULT_ADAROUND_ITERS)
    p.add_argument("--model", choices=("aimet-fold", "onnxq-folded"), default="aimet-fold")
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--merge", action="store_true", help="keep rows of an existing --json file")
    p.add_argument("--row-suffix", default="", help="appended to row keys (e.g. '-probe100')")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        res = run_one(args.one, args)
        Path(args.one_out).write_text(json.dumps(res))
        return 0

    path = Path(args.json)
    doc = {}
    if args.merge and path.exists():
        doc = json.loads(path.read_text())
    doc["environment"] = _versions()
    doc.setdefault("settings", {}).update(
        {
            "model": str(BN_MODEL) if args.model == "aimet-fold" else str(ONNXQ_FOLDED),
            "bn_fold": args.model,
            "param_type": "int4, per-channel (Conv/Gemm), symmetric (AIMET 'default' config)",
            "activation_type": "int8, asymmetric, per-tensor",
            "quant_scheme": "min_max",
            "config_file": "default (default_config_per_channel.json)",
            "calibration": "imagenet_sample(0, 256), 8 batches of 32",
            "test": "imagenet_sample(256, 244), batch 32",
            "adaround_default_iters": DEFAULT_ADAROUND_ITERS,
            "seqmse": "apply_seq_mse defaults: num_candidates=20, loss mse, inp_symmetry symqt",
            "peak_memory": "VmHWM of a fresh subprocess per method",
        }
    )
    rows = doc.setdefault("rows", {})
    for method in [m for m in args.methods.split(",") if m]:
        key = method + (f"-{args.adaround_iters}it" if method == "adaround" else "") + args.row_suffix
        print(f"[aimet_ref] running {key} ...", flush=True)
        rows[key] = _child(method, args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
    for key, r in rows.items():
        t = r.get("adaround_timing")
        if t and r.get("adaround_iters") != DEFAULT_ADAROUND_ITERS:
            est = t[f"extrapolated_s_at_{DEFAULT_ADAROUND_ITERS}_iters"]
            doc["adaround_default_extrapolation"] = {
                "from_row": key,
                "iterations_measured": r["adaround_iters"],
                "layers": t["layers_optimized"],
                "overhead_s": t["overhead_total_s"],
                "per_iteration_all_layers_s": t["per_iteration_all_layers_ms"] / 1e3,
                "estimated_s": est,
                "estimated_h": est / 3600,
                "note": "sum over layers of (measured overhead + 10000 x measured per-iteration time); "
                "compute_encodings and evaluation not included",
            }
            print(f"AdaRound at the default {DEFAULT_ADAROUND_ITERS} it/layer, extrapolated from {key}: "
                  f"{est:.0f} s = {est / 3600:.1f} h")
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(_table(rows))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
