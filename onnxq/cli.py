"""The ``onnxq`` command line: flags → configs → the Python API. No logic lives here.

Errors onnxq raises on purpose print ``onnxq: error: <message>`` and exit 1; anything else is an
internal error, reported in one line (``--debug`` shows the traceback) with exit 3. An output is
written only when the whole command succeeded.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from onnxq import __version__
from onnxq.errors import ConfigError, OnnxqError
from onnxq.quant.config import RANGE_METHODS

log = logging.getLogger("onnxq")


def _add_pipeline_args(p: argparse.ArgumentParser, default: str | None) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--passes",
        default=default,
        help="comma-separated passes or presets, options after ':' separated by ';' "
        f"(e.g. 'fold-bn,cle:max_iterations=50', presets: dfq){'' if default is None else f'; default {default}'}",
    )
    group.add_argument("--recipe", help="a JSON or TOML recipe file")


def _weight_grid_flags(parser: argparse.ArgumentParser) -> None:
    """--w-asymmetric and --w-range (read by _quant_config)."""
    parser.add_argument("--w-asymmetric", action="store_true",
                        help="asymmetric weight grids (a zero point per tensor/channel)")
    parser.add_argument("--w-range", choices=("minmax", "mse"),
                        help="weight range method (mse: the clip minimizing the rounding error)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxq", description="Quantization and graph optimization for ONNX models."
    )
    parser.add_argument("--version", action="version", version=f"onnxq {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True)

    opt = sub.add_parser("optimize", help="rewrite a float model with output-preserving passes")
    opt.add_argument("model", help="input .onnx file")
    opt.add_argument("-o", "--output", required=True, help="output .onnx file")
    _add_pipeline_args(opt, "dfq")
    opt.add_argument("--overwrite", action="store_true", help="allow writing over the input")
    opt.add_argument("--external-data", action="store_true", help="write weights to <out>.data")

    ins = sub.add_parser("inspect", help="op counts and per-layer weight-range spread")
    ins.add_argument("model", help="input .onnx file")
    _add_pipeline_args(ins, None)
    ins.add_argument("--top", type=int, default=15, help="layers to list (worst spread first)")
    ins.add_argument("--json", dest="json_path", help="also write the summary as JSON")
    qua = sub.add_parser("quantize", help="calibrate and write a QDQ model + encodings")
    qua.add_argument("model", help="input float .onnx file")
    qua.add_argument("--calib", required=True,
                     help="calibration data: a folder of .npy/.npz, or of images (with --preprocess)")
    qua.add_argument("--preprocess", help="image preprocessing, e.g. 'resize=256,crop=224,mean=127,"
                     "std=128,layout=NCHW,color=RGB' or a preset ('imagenet')")
    qua.add_argument("--limit", type=int, help="use at most this many images")
    qua.add_argument("--config", default="default",
                     help="preset (default, per-channel, w8a16) or a JSON config file (onnxq's or AIMET's runtime config)")
    qua.add_argument("--per-channel", action="store_true", help="per-channel weights")
    qua.add_argument("--w-bits", type=int, choices=(4, 8, 16))
    _weight_grid_flags(qua)
    qua.add_argument("--a-bits", type=int, choices=(8, 16))
    qua.add_argument("--range", dest="range_method",
                     choices=RANGE_METHODS,
                     help="activation range method")
    qua.add_argument("--passes", default="fold-bn",
                     help="float passes first (e.g. dfq; default fold-bn); may also list the data "
                     "steps seq-mse, adaround, bias-correction with options, e.g. "
                     "'dfq,adaround:iterations=2000'")
    qua.add_argument("--seq-mse", action="store_true",
                     help="choose weight ranges by sequential MSE (per layer, on calibration data)")
    qua.add_argument("--adaround", action="store_true",
                     help="learn each weight's rounding (AdaRound, layer by layer on calibration data)")
    qua.add_argument("--adaround-iterations", type=int, metavar="N",
                     help="AdaRound iterations per layer (default 1000)")
    qua.add_argument("--bias-correction", choices=("empirical", "analytic", "measured", "hybrid", "none"),
                     help="correct the output mean shift of quantized weights (with --passes dfq: "
                          "measured unless set; 'none' turns it off)")
    qua.add_argument("-o", "--output", required=True, help="output folder")

    ana = sub.add_parser("analyze", help="diagnose a quantization, try fixes, write an HTML report and a plan")
    ana.add_argument("model", help="input float .onnx file")
    ana.add_argument("--calib", required=True,
                     help="calibration data: a folder of .npy/.npz, or of images (with --preprocess)")
    ana.add_argument("--preprocess", help="image preprocessing (as for quantize)")
    ana.add_argument("--limit", type=int, help="use at most this many images")
    ana.add_argument("--eval", dest="evaluate", metavar="MODULE:FUNCTION",
                     help="accuracy: a function taking an onnxruntime session and returning a number "
                     "or a dict (default: agreement with FP32 on held-out samples)")
    ana.add_argument("--metric", help="the key to use when --eval returns a dict")
    ana.add_argument("--lower-is-better", action="store_true", help="the metric is an error rate")
    ana.add_argument("--eval-data", help="held-out samples for the proxy (.npy/.npz folder); "
                     "default: the last fifth of the calibration batches")
    ana.add_argument("--target-drop", type=float, default=0.01,
                     help="allowed drop from FP32 in metric units (default 0.01 = 1 point)")
    ana.add_argument("--target", type=float, help="an absolute target for the metric instead")
    ana.add_argument("--config", default="default", help="starting config: preset or JSON file")
    ana.add_argument("--per-channel", action="store_true", help="per-channel weights")
    ana.add_argument("--w-bits", type=int, choices=(4, 8, 16))
    _weight_grid_flags(ana)
    ana.add_argument("--a-bits", type=int, choices=(8, 16))
    ana.add_argument("--range", dest="range_method",
                     choices=RANGE_METHODS)
    ana.add_argument("--passes", default="fold-bn", help="float passes first; default fold-bn")
    ana.add_argument("--fixes", help="fixes to try, comma-separated (default: per-channel,cle,range,"
                     "adaround,bias-correction,bits,float; 'none' to only diagnose)")
    ana.add_argument("--workers", type=int, default=0, help="worker processes (default: up to 2)")
    ana.add_argument("--no-cache", action="store_true", help="do not reuse earlier evaluations")
    ana.add_argument("--no-plots", action="store_true", help="a report without plots (faster)")
    ana.add_argument("-o", "--output", required=True, help="output folder (report, plan.json)")

    com = sub.add_parser("compress", help="reach a MAC target by SVD / channel pruning with per-layer ratios")
    com.add_argument("model", help="input float .onnx file")
    com.add_argument("--data", dest="calib", required=True,
                     help="calibration data: a folder of .npy/.npz, or of images (with --preprocess)")
    com.add_argument("--preprocess", help="image preprocessing (as for quantize)")
    com.add_argument("--limit", type=int, help="use at most this many images")
    com.add_argument("--target-macs", type=float, default=0.5,
                     help="MACs of the result as a fraction of the input's (default 0.5)")
    com.add_argument("--scheme", default="ssvd+cp",
                     help="techniques in order: ssvd (spatial SVD), wsvd (weight SVD), cp (channel pruning); default ssvd+cp")
    com.add_argument("--eval", dest="evaluate", metavar="MODULE:FUNCTION",
                     help="score: a function taking an onnxruntime session and returning a number or a dict "
                     "(default: agreement with the original on held-out samples)")
    com.add_argument("--metric", help="the key to use when --eval returns a dict")
    com.add_argument("--lower-is-better", action="store_true", help="the metric is an error rate")
    com.add_argument("--eval-data", help="held-out samples for the proxy (.npy/.npz folder); "
                     "default: the last fifth of --data")
    com.add_argument("--ratios", help="candidate per-layer ratios, comma-separated (default 0.1,...,0.9)")
    com.add_argument("--exclude", help="layer names (or glob patterns) never compressed, comma-separated")
    com.add_argument("--method", choices=("greedy", "lasso"), default="greedy",
                     help="channel selection for pruning (default greedy)")
    com.add_argument("--channel-multiple", type=int, default=8,
                     help="round pruned channel counts to a multiple of this (default 8: faster kernels)")
    com.add_argument("--calib-samples", type=int, default=64,
                     help="calibration samples used to fit channel pruning (default 64)")
    com.add_argument("--finetune-epochs", type=int, default=0,
                     help="fine-tune each stage by distillation (needs onnxq.train: pip install onnxq[train])")
    com.add_argument("--first-stage-shares", metavar="S1,S2,...",
                     help="try the first stage at these shares of the whole reduction (e.g. 0.3,0.5,0.7), "
                     "finish each with the other stages, keep the best (the seed's recipe); default: equal shares")
    com.add_argument("--finetune-lr", type=float, default=1e-4, help="fine-tuning learning rate (AdamW)")
    com.add_argument("--finetune-augment", choices=("auto", "match", "none"), default="auto",
                     help="fine-tuning augmentation of image inputs (as qat --augment)")
    com.add_argument("--finetune-features", action="store_true",
                     help="also distill the intermediate tensors the compressed model shares with the original")
    com.add_argument("--workers", type=int, default=0, help="sweep worker processes (default: up to 2)")
    com.add_argument("--ray", metavar="auto|ADDRESS", help="run the sweep as Ray tasks on a cluster (pip install onnxq[ray])")
    com.add_argument("--no-cache", action="store_true", help="do not reuse earlier sweep results")
    com.add_argument("--cache-dir", help="sweep cache folder (default ~/.cache/onnxq/compress)")
    com.add_argument("--summary", help="JSON summary path (default: beside the output, <stem>.json)")
    com.add_argument("--overwrite", action="store_true", help="allow writing over an existing output")
    com.add_argument("-o", "--output", required=True, help="output .onnx file")

    qat = sub.add_parser("qat", help="quantization-aware training by distillation from the FP32 "
                         "model (needs pip install onnxq[train])")
    qat.add_argument("model", help="input float .onnx file")
    qat.add_argument("--data", required=True,
                     help="training data: a folder of .npy/.npz, or of images (with --preprocess); "
                     "the first --calib-limit samples also calibrate")
    qat.add_argument("--labels", help="optional .npy of integer class labels, one per sample")
    qat.add_argument("--preprocess", help="image preprocessing (as for quantize)")
    qat.add_argument("--limit", type=int, help="use at most this many images")
    qat.add_argument("--config", default="default", help="preset or JSON config (as for quantize)")
    qat.add_argument("--per-channel", action="store_true", help="per-channel weights")
    qat.add_argument("--w-bits", type=int, choices=(4, 8, 16))
    _weight_grid_flags(qat)
    qat.add_argument("--a-bits", type=int, choices=(4, 8, 16))
    qat.add_argument("--range", dest="range_method",
                     choices=RANGE_METHODS)
    qat.add_argument("--passes", default="fold-bn", help="float passes first; default fold-bn")
    qat.add_argument("--adaround", action="store_true", help="start from AdaRound's rounding")
    qat.add_argument("--fixed-ranges", action="store_true",
                     help="keep the calibrated ranges (default: learn them too)")
    qat.add_argument("--features", type=float, default=0.0, metavar="WEIGHT",
                     help="also distill every Conv/Gemm/MatMul output (normalized MSE), with this "
                     "weight beside the loss on the outputs (default 0: outputs only)")
    qat.add_argument("--calib-limit", type=int, default=256, help="samples used to calibrate")
    qat.add_argument("--epochs", type=int, default=1)
    qat.add_argument("--batch-size", type=int, default=32)
    qat.add_argument("--lr", type=float, default=1e-4, help="weights' learning rate (AdamW)")
    qat.add_argument("--range-lr", type=float, default=1e-2,
                     help="ranges' learning rate (on log-scales: 1e-2 ≈ 1 %% per step)")
    qat.add_argument("--augment", choices=("auto", "match", "none"), default="auto",
                     help="image inputs: auto = flip + shift; match = flip + resized crop + mixup "
                     "(for few images); none")
    qat.add_argument("--no-augment", action="store_true", help="same as --augment none")
    qat.add_argument("--validation", type=float, default=0.0,
                     help="fraction of the data held out; the weights of the epoch with the lowest "
                     "held-out distillation loss are kept (default 0: the last epoch's)")
    qat.add_argument("--seed", type=int, default=0)
    qat.add_argument("--device", default="auto",
                     help="where the student trains: auto (a CUDA GPU when torch sees one), cpu, cuda, cuda:N")
    qat.add_argument("--checkpoint-dir", help="checkpoint after each epoch (default OUT/checkpoints)")
    qat.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    qat.add_argument("-o", "--output", required=True, help="output folder")

    demo = sub.add_parser("demo", help="optimize the bundled Fashion-MNIST model and compare accuracies")
    demo.add_argument("-o", "--output", default="onnxq-demo", help="folder for the written model")
    return parser


def _recipe(args: argparse.Namespace):
    from onnxq.passes.pipelines import Recipe, parse_passes

    if getattr(args, "recipe", None):
        return Recipe.load(args.recipe)
    return parse_passes(args.passes)


def _cmd_optimize(args: argparse.Namespace) -> int:
    import onnxq
    from onnxq.passes.pipelines import run_pipeline

    recipe = _recipe(args)
    model = onnxq.load(args.model)
    for name, report, modified in run_pipeline(model, recipe):
        if name not in ("lift-constants", "cleanup") or report.changed:
            print(report.summary())
    onnxq.save(
        model, args.output, overwrite=args.overwrite, external_data=True if args.external_data else None
    )
    print(f"wrote {args.output}")
    return 0


def _spread_table(summary, top: int, before=None) -> str:
    rows = summary.worst(top)
    old = {s.node: s.spread for s in before.layers} if before is not None else {}
    head = f"{'layer':<40} {'op':<13} {'shape':<18} {'spread':>8}"
    head += f" {'before':>8}" if before is not None else ""
    lines = [head + "  CLE", "-" * len(head)]
    for s in rows:
        shape = "x".join(map(str, s.shape)) + (f" g{s.groups}" if s.groups > 1 else "")
        line = f"{s.node[:40]:<40} {s.op_type:<13} {shape:<18} {s.spread:>8.1f}"
        if before is not None:
            line += f" {old.get(s.node, float('nan')):>8.1f}"
        cle = s.cle_next if s.cle_next.startswith("->") else (s.cle_prev or s.cle_next)
        flag = "  !" if s.spread > 10 else "   "
        lines.append(f"{line}{flag}{cle[:70]}")
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import onnxq
    from onnxq.analysis.inspect import SPREAD_WARNING
    from onnxq.passes.pipelines import run_pipeline

    model = onnxq.load(args.model)
    before = onnxq.inspect(model)
    print(f"{args.model}: {before.nodes} nodes, {before.weight_bytes / 2**20:.1f} MiB of weights")
    print("ops: " + ", ".join(f"{k} {v}" for k, v in before.op_counts.items()))
    summary, reference = before, None
    if args.passes or args.recipe:
        for name, report, _ in run_pipeline(model, _recipe(args)):
            if report.changed or report.skipped:
                print(report.summary())
        summary, reference = onnxq.inspect(model), before
    print()
    print(_spread_table(summary, args.top, reference))
    bad = [s for s in summary.layers if s.spread > SPREAD_WARNING]
    print(
        f"\n{len(bad)} of {len(summary.layers)} layers have a per-channel range spread > "
        f"{SPREAD_WARNING:g} (marked !): per-tensor weight quantization is likely to fail there; "
        "use CLE (where the CLE column shows a pair) or per-channel quantization."
    )
    if args.json_path:
        data = {"before": before.to_dict()}
        if reference is not None:
            data["after"] = summary.to_dict()
        with open(args.json_path, "w") as f:
            json.dump(data, f, indent=1, default=float)
    return 0


def _quant_config(args: argparse.Namespace):
    import dataclasses
    from pathlib import Path

    from onnxq.quant.config import QuantConfig, preset

    if Path(args.config).is_file():
        config = QuantConfig.load(args.config)
    else:
        config = preset(args.config)
    w, a = config.weights, config.activations
    if args.per_channel:
        w = dataclasses.replace(w, per_channel=True)
    if args.w_bits:
        w = dataclasses.replace(w, bits=args.w_bits)
    if getattr(args, "w_asymmetric", False):
        w = dataclasses.replace(w, symmetric=False)
    if getattr(args, "w_range", None):
        w = dataclasses.replace(w, range_method=args.w_range)
    if args.a_bits:
        a = dataclasses.replace(a, bits=args.a_bits)
    if args.range_method:
        a = dataclasses.replace(a, range_method=args.range_method)
    return config.replace(weights=w, activations=a)


def _calibration_data(args: argparse.Namespace):
    from pathlib import Path

    from onnxq.errors import ConfigError
    from onnxq.runtime.data import ImageFolder

    folder = Path(args.calib)
    if not folder.exists():
        raise ConfigError(f"{folder}: calibration data not found")
    arrays = folder.is_file() or any(folder.glob("*.np[yz]"))
    if arrays:
        return str(folder)
    if not args.preprocess:
        raise ConfigError(f"{folder}: holds no .npy/.npz; for images give --preprocess")
    return ImageFolder(folder, args.preprocess, limit=args.limit)


def _progress(total: int | None, what: str):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return None, lambda: None
    bar = tqdm(total=total, desc=what, unit="batch", leave=False)
    return bar.update, bar.close


@contextlib.contextmanager
def _layer_progress():
    """A progress bar per data-driven step, fed by the algorithms' per-layer log records."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield
        return
    bars: dict[str, Any] = {}

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            args = record.args if isinstance(record.args, tuple) else ()
            if record.msg.startswith("%s: layer %d/%d") and len(args) >= 3:
                what, i, n = args[0], args[1], args[2]
                bar = bars.get(what)
                if bar is None:
                    bar = bars[what] = tqdm(total=n, desc=what, unit="layer", leave=False)
                bar.update(i - bar.n)

    handler = _Handler(logging.INFO)
    logger = logging.getLogger("onnxq.algorithms")
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = True
        for bar in bars.values():
            bar.close()


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    import onnxq

    config = _quant_config(args)
    data = _calibration_data(args)
    steps: dict = {}
    if args.seq_mse:
        steps["seq_mse"] = True
    if args.adaround or args.adaround_iterations:
        steps["adaround"] = ({"iterations": args.adaround_iterations}
                             if args.adaround_iterations else True)
    if args.bias_correction == "none":
        steps["bias_correction"] = False
    elif args.bias_correction:
        steps["bias_correction"] = {"mode": args.bias_correction}
    update, close = _progress(len(data) if hasattr(data, "__len__") else None, "calibrating")
    try:
        with _layer_progress() if steps else contextlib.nullcontext():
            sim = onnxq.quantize(args.model, data, config=config, passes=args.passes,
                                 progress=update, **steps)
    finally:
        close()
    paths = sim.export(args.output, Path(args.model).stem)
    n_act = sum(e.kind == "activation" for e in sim.encodings)
    n_par = sum(e.kind == "param" for e in sim.encodings)
    print(f"quantized {args.model}: {n_act} activation and {n_par} parameter encodings "
          f"(weights {config.weights.bits}-bit {'per-channel' if config.weights.per_channel else 'per-tensor'}, "
          f"activations {config.activations.bits}-bit {config.activations.range_method})")
    for kind, path in paths.items():
        print(f"  {kind:<9} {path}")
    return 0


class _Bar:
    """A tqdm bar per analysis stage (none when tqdm is missing)."""

    def __init__(self, stage: str, total: int | None) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
            return
        self.bar = tqdm(total=total, desc=stage, leave=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_analyze(args: argparse.Namespace) -> int:
    from onnxq.analysis import AnalysisConfig, analyze
    from onnxq.analysis.analyzer import DEFAULT_FIXES

    fixes = DEFAULT_FIXES if not args.fixes else tuple(
        f.strip() for f in args.fixes.split(",") if f.strip() and f.strip() != "none")
    options = AnalysisConfig(
        target_drop=args.target_drop, target_value=args.target, metric=args.metric,
        higher_is_better=not args.lower_is_better, fixes=fixes, workers=args.workers,
        cache=not args.no_cache, plots=0 if args.no_plots else AnalysisConfig.plots,
    )
    result = analyze(
        args.model, _calibration_data(args), args.evaluate, config=_quant_config(args),
        passes=args.passes, eval_data=args.eval_data, options=options, output_dir=args.output,
        progress=_Bar,
    )
    print(result.summary())
    for kind, path in result.paths.items():
        print(f"  {kind:<6} {path}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from onnxq.compress import CompressConfig, compress

    options: dict[str, Any] = {
        "target_macs": args.target_macs, "scheme": args.scheme, "method": args.method,
        "calib_samples": args.calib_samples, "finetune_epochs": args.finetune_epochs,
        "finetune_lr": args.finetune_lr, "finetune_augment": args.finetune_augment,
        "finetune_features": args.finetune_features,
        "channel_multiple": args.channel_multiple,
        "workers": args.workers, "cache": not args.no_cache, "cache_dir": args.cache_dir,
        "metric": args.metric, "higher_is_better": not args.lower_is_better, "ray": args.ray,
    }
    for key, text in (("ratios", args.ratios), ("first_stage_shares", args.first_stage_shares)):
        if text:
            try:
                options[key] = tuple(float(r) for r in text.split(",") if r.strip())
            except ValueError:
                raise ConfigError(f"--{key.replace('_', '-')} takes numbers separated by commas, "
                                  f"got '{text}'") from None
    if args.exclude:
        options["exclude"] = tuple(e.strip() for e in args.exclude.split(",") if e.strip())
    config = CompressConfig(**options)
    result = compress(args.model, _calibration_data(args), config=config, evaluate=args.evaluate,
                      eval_data=args.eval_data, progress=_Bar)
    paths = result.save(args.output, args.summary, overwrite=args.overwrite)
    print(result.table())
    for kind, path in paths.items():
        print(f"  {kind:<8} {path}")
    return 0


def _cmd_qat(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from onnxq.train import TrainConfig, run_qat

    args.calib = args.data
    labels = np.load(args.labels) if args.labels else None
    train = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, range_lr=args.range_lr,
        augment="none" if args.no_augment else args.augment, seed=args.seed, resume=args.resume,
        validation=args.validation, device=args.device,
        checkpoint_dir=args.checkpoint_dir or str(Path(args.output) / "checkpoints"),
    )
    result = run_qat(args.model, _calibration_data(args), args.output, labels=labels,
                     config=_quant_config(args), passes=args.passes, adaround=args.adaround or None,
                     learn_ranges=not args.fixed_ranges, train=train,
                     features=args.features > 0, feature_weight=args.features,
                     calibration_limit=args.calib_limit)
    last = result["history"][-1] if result["history"] else {}
    print(f"trained {args.model}: {len(result['history'])} epoch(s), final loss "
          f"{last.get('loss', float('nan')):.4g}, ranges "
          f"{'fixed' if args.fixed_ranges else 'learned'}")
    for kind, path in result["paths"].items():
        print(f"  {kind:<12} {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from onnxq.demo import run_demo

    run_demo(args.output)
    return 0


COMMANDS = {
    "optimize": _cmd_optimize,
    "inspect": _cmd_inspect,
    "quantize": _cmd_quantize,
    "demo": _cmd_demo,
    "analyze": _cmd_analyze,
    "compress": _cmd_compress,
    "qat": _cmd_qat,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except OnnxqError as exc:
        print(f"onnxq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onnxq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a bare traceback for the user
        if args.debug:
            raise
        print(
            f"onnxq: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
            "traceback and report it)",
            file=sys.stderr,
        )
        return 3
