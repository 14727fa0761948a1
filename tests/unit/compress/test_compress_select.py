"""Ratio selection (hand-computed cases), the sweep through the executor with its disk cache, the
end-to-end ``compress`` API and the ``onnxq compress`` command."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import conv_classifier_text, model_from_text, random_feeds

from onnxq.cli import main
from onnxq.compress.api import CompressConfig, compress, parse_scheme
from onnxq.compress.macs import count_macs
from onnxq.compress.select import candidate_layers, choose_ratios
from onnxq.errors import ConfigError

TEXT = conv_classifier_text(12)


def tiny():
    model = model_from_text(TEXT, seed=1)
    for i, node in enumerate(model.graph):
        node.name = f"{node.op_type.lower()}{i}"
    return model


def data_for(model, batches=5, n=8):
    return [random_feeds(model, seed=i, batch=n) for i in range(batches)]


# ---- selection ------------------------------------------------------------------------------
def _curve(points):
    return [{"ratio": r, "score": s, "macs": m} for r, s, m in points]


CURVES = {
    # layer A is cheap to compress, B is sensitive; total MACs 1000
    "A": _curve([(0.2, 0.95, 700), (0.5, 0.99, 800), (0.8, 1.0, 900)]),
    "B": _curve([(0.2, 0.50, 750), (0.5, 0.90, 850), (0.8, 0.97, 950)]),
}


def test_choose_ratios_highest_threshold_reaching_the_target():
    sel = choose_ratios(CURVES, 1000, 800, baseline=1.0)
    # τ = 0.99 → A at 0.5 (saves 200), B untouched: exactly 800
    assert sel.reached and sel.ratios == {"A": 0.5} and sel.predicted_macs == 800
    sel = choose_ratios(CURVES, 1000, 650, baseline=1.0)
    # τ = 0.95: A 0.2 (300) + B 0.8 (50) = 650
    assert sel.ratios == {"A": 0.2, "B": 0.8} and sel.predicted_macs == 650
    assert sel.threshold == pytest.approx(0.95)


def test_choose_ratios_relaxes_saturated_scores_and_handles_unreachable():
    flat = {"A": _curve([(0.2, 1.0, 600), (0.5, 1.0, 800)]), "B": _curve([(0.2, 1.0, 600), (0.5, 1.0, 800)])}
    sel = choose_ratios(flat, 1000, 750, baseline=1.0)
    # τ = 1 takes both at 0.2 (200 MACs); relaxing gives back what the target allows
    assert sel.reached and sel.predicted_macs <= 750 and sel.predicted_macs >= 600
    unreachable = choose_ratios(CURVES, 1000, 100, baseline=1.0)
    assert not unreachable.reached and unreachable.ratios == {"A": 0.2, "B": 0.2}
    floored = choose_ratios(CURVES, 1000, 100, baseline=1.0, min_score=0.96)
    assert floored.ratios == {"A": 0.5, "B": 0.8}
    # an error rate: lower is better
    errors = {k: [{**p, "score": 1 - p["score"]} for p in v] for k, v in CURVES.items()}
    assert choose_ratios(errors, 1000, 800, higher_is_better=False, baseline=0.0).ratios == {"A": 0.5}


def test_candidates_and_exclusions():
    model = tiny()
    names, skipped = candidate_layers(model, "ssvd", exclude=("conv2",))
    assert names == ["conv0"]
    reasons = dict(skipped)
    assert reasons["conv2"] == "excluded by name" and "nothing to split" in reasons["conv4"]
    names, skipped = candidate_layers(model, "cp")
    assert names == ["conv2", "conv4"] and "graph input" in dict(skipped)["conv0"]
    assert candidate_layers(model, "wsvd", exclude=("gemm*",))[0] == ["conv0", "conv2", "conv4"]


def test_parse_scheme_and_config():
    assert parse_scheme("ssvd+cp") == ("ssvd", "cp")
    assert parse_scheme(["spatial-svd", "channel-pruning"]) == ("ssvd", "cp")
    with pytest.raises(ConfigError, match="unknown compression technique"):
        parse_scheme("ssvd+magic")
    with pytest.raises(ConfigError, match="target MACs"):
        CompressConfig(target_macs=1.5)
    config = CompressConfig(target_macs=0.6, scheme="cp", exclude=("a",))
    assert CompressConfig.from_dict(config.to_dict()) == config


# ---- end to end -----------------------------------------------------------------------------
def test_compress_reaches_the_target_and_resumes_from_cache(tmp_path, caplog):
    model = tiny()
    before = ir.to_proto(model).SerializeToString()
    config = CompressConfig(target_macs=0.5, workers=1, cache_dir=str(tmp_path / "cache"), latency_repeats=3,
                            channel_multiple=1)  # 16-24 channels: multiples of 8 are too coarse
    result = compress(model, data_for(model), config=config)
    assert ir.to_proto(model).SerializeToString() == before  # input untouched
    out = result.model
    onnx.checker.check_model(ir.to_proto(out))
    assert [v.name for v in out.graph.inputs] == ["x"] and [v.name for v in out.graph.outputs] == ["y"]
    macs0, macs1 = count_macs(model).macs, count_macs(out).macs
    assert macs1 <= 0.5 * macs0 * 1.005
    s = result.summary
    assert s["after"]["macs"] == macs1 and s["before"]["macs"] == macs0
    assert [st["technique"] for st in s["stages"]] == ["spatial-svd", "channel-pruning"]
    cp = s["stages"][1]
    assert {"conv2", "conv4"} <= set(cp["curves"]) and len(cp["curves"]["conv2"]) == 9
    scores = [p["score"] for p in cp["curves"]["conv2"]]  # output SQNR (dB): more channels, less noise
    assert all(np.isfinite(scores)) and scores[-1] > scores[0]
    assert cp["layers"] and all(v["kept_channels"] for v in cp["layers"].values())
    # a second run reads every sweep job back from the cache and gives the same model
    files = list((tmp_path / "cache").glob("*.json"))
    assert len(files) >= 4  # two baselines + one job per candidate layer
    again = compress(model, data_for(model), config=config)
    assert again.summary["after"]["macs"] == macs1
    feeds = random_feeds(model, seed=9)
    from onnxq.runtime import run

    np.testing.assert_allclose(run(out, feeds)[0], run(again.model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_compress_with_user_evaluator_in_workers(tmp_path):
    from pathlib import Path

    model = tiny()
    spec = f"{Path(__file__).with_name('compress_helpers.py')}:mean_logit"
    config = CompressConfig(target_macs=0.7, scheme="cp", workers=2, cache=False, metric="m",
                            latency_repeats=2, ratios=(0.3, 0.6))
    result = compress(model, data_for(model), config=config, evaluate=spec)
    assert result.summary["score_name"] == spec
    curve = result.summary["stages"][0]["curves"]["conv2"]
    assert [p["ratio"] for p in curve] == [0.3, 0.6]
    assert count_macs(result.model).macs <= 0.7 * count_macs(model).macs * 1.005


def test_compress_with_a_local_callable_runs_in_process():
    model = tiny()
    held = data_for(model, batches=1, n=16)[0]
    seen = []

    def evaluate(session):  # a closure: cannot go to worker processes
        seen.append(1)
        return float(np.abs(session.run(None, held)[0]).mean())

    config = CompressConfig(target_macs=0.8, scheme="cp", workers=2, cache=False, latency_repeats=2,
                            ratios=(0.5,))
    result = compress(model, data_for(model), config=config, evaluate=evaluate, eval_data=[held])
    assert seen and result.summary["stages"][0]["curves"]["conv2"][0]["ratio"] == 0.5


def test_ray_sweep_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    model = tiny()
    config = CompressConfig(target_macs=0.8, scheme="cp", cache=False, ray="local", workers=2,
                            latency_repeats=2, ratios=(0.5,))
    result = compress(model, data_for(model), config=config)
    assert result.summary["stages"][0]["curves"]["conv2"][0]["ratio"] == 0.5


# ---- CLI ------------------------------------------------------------------------------------
def _cli_inputs(tmp_path):
    """The tiny model as a file and its calibration samples as a folder of .npy."""
    model = tiny()
    src = tmp_path / "tiny.onnx"
    ir.save(model, src)
    data_dir = tmp_path / "calib"
    data_dir.mkdir()
    for i, feeds in enumerate(data_for(model)):
        np.save(data_dir / f"{i}.npy", feeds["x"])
    return src, data_dir


def test_cli_compress_writes_model_and_summary(tmp_path, capsys):
    src, data_dir = _cli_inputs(tmp_path)
    src_bytes = src.read_bytes()
    out = tmp_path / "small.onnx"
    code = main(["compress", str(src), "--target-macs", "0.6", "--scheme", "ssvd+cp", "--data", str(data_dir),
                 "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--ratios", "0.3,0.6",
                 "--exclude", "conv4", "-o", str(out)])
    assert code == 0
    assert src.read_bytes() == src_bytes
    summary = json.loads((tmp_path / "small.json").read_text())
    page = (tmp_path / "small.html").read_text()
    assert page.count("<svg") == sum(len(st["curves"]) for st in summary["stages"]) and "conv2" in page
    assert summary["after"]["macs"] <= 0.6 * summary["before"]["macs"] * 1.005
    assert "conv4" not in summary["stages"][-1]["curves"]
    onnx.checker.check_model(onnx.load(out))
    printed = capsys.readouterr().out
    assert "MACs" in printed and str(out) in printed


def test_cli_compress_bad_scheme_is_a_clean_error(tmp_path, capsys):
    src = tmp_path / "tiny.onnx"
    ir.save(tiny(), src)
    code = main(["compress", str(src), "--scheme", "zip", "--data", str(tmp_path), "-o", str(tmp_path / "o.onnx")])
    assert code == 1
    assert "unknown compression technique" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


# ---- fine-tuning ----------------------------------------------------------------------------
def test_distillation_brings_the_pruned_model_closer_to_the_original():
    pytest.importorskip("torch")
    from onnxq.compress.finetune import finetune_available

    if finetune_available():
        pytest.skip(finetune_available())
    from onnxq.compress.channel_pruning import ChannelPruning
    from onnxq.passes.cleanup import Cleanup
    from onnxq.runtime import run
    from onnxq.train import TrainConfig, distill

    model = tiny()
    data = data_for(model, batches=4, n=16)
    student = model.clone()
    ChannelPruning(keep={"conv2": 4}, data=data)(student)
    Cleanup()(student)

    def log_softmax(z):
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    def gap(m):  # the distillation objective: KL(teacher ‖ student) on the training samples
        kl = []
        for f in data:
            t, s = log_softmax(run(model, f)[0]), log_softmax(run(m, f)[0])
            kl.append(np.mean(np.sum(np.exp(t) * (t - s), -1)))
        return float(np.mean(kl))

    before = gap(student)
    tuned, info = distill(student, model, data, TrainConfig(epochs=5, lr=3e-3, batch_size=16, progress=False))
    assert info["status"] == "done" and info["weights"] > 0
    assert tuned is student
    assert gap(tuned) < 0.8 * before


def test_cli_compress_fine_tunes_each_stage_with_the_options_given(tmp_path):
    pytest.importorskip("torch")
    src, data_dir = _cli_inputs(tmp_path)
    out = tmp_path / "small.onnx"
    code = main(["compress", str(src), "--target-macs", "0.6", "--scheme", "cp", "--data", str(data_dir),
                 "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--ratios", "0.3,0.6",
                 "--finetune-epochs", "1", "--finetune-lr", "1e-3", "--finetune-augment", "none",
                 "--finetune-features", "-o", str(out)])
    assert code == 0
    summary = json.loads((tmp_path / "small.json").read_text())
    assert summary["config"]["finetune_lr"] == 1e-3 and summary["config"]["finetune_features"] is True
    tuned = summary["stages"][-1]["finetune"]
    assert tuned["status"] == "done" and tuned["epochs"] == 1 and tuned["features"] >= 1
    onnx.checker.check_model(onnx.load(out))


def test_first_stage_at_a_few_shares_keeps_the_best_candidate(tmp_path, monkeypatch):
    import onnxq.compress.select as select

    model = tiny()
    data = data_for(model, batches=6)
    base = {"target_macs": 0.6, "scheme": "ssvd+cp", "workers": 1, "cache": False,
            "ratios": (0.3, 0.6, 0.9), "stage_min_sqnr": 0.0}
    sweeps = []
    real_sweep = select.run_ratio_sweep
    monkeypatch.setattr(select, "run_ratio_sweep",
                        lambda spec, *a, **k: sweeps.append(spec.technique) or real_sweep(spec, *a, **k))
    result = compress(model, data, config=CompressConfig(**base, first_stage_shares=(0.2, 0.8)))
    assert sweeps == ["ssvd", "cp", "cp"]  # the first stage's sweep is shared by the candidates
    cands = result.summary["candidates"]
    assert [c["first_stage_share"] for c in cands] == [0.2, 0.8]
    best = max(cands, key=lambda c: c["score"])
    assert result.summary["first_stage_share"] == best["first_stage_share"]
    assert result.summary["after"]["score"] == pytest.approx(best["score"])
    # each candidate is the run with that share alone; the first stage aims at C^s of the MACs
    for cand in cands:
        alone = compress(model, data, config=CompressConfig(**base, first_stage_shares=(cand["first_stage_share"],)))
        assert alone.summary["after"]["score"] == pytest.approx(cand["score"])
        first = alone.summary["stages"][0]
        assert first["target_macs"] == int(max(0.6, 0.6 ** cand["first_stage_share"]) * first["macs_before"])
    assert len(cands) == 2 and cands[0]["score"] != cands[1]["score"]


def test_cli_bad_first_stage_shares_is_a_clean_error(tmp_path, capsys):
    src = tmp_path / "tiny.onnx"
    ir.save(tiny(), src)
    code = main(["compress", str(src), "--first-stage-shares", "half", "--data", str(tmp_path),
                 "-o", str(tmp_path / "o.onnx")])
    assert code == 1
    assert "--first-stage-shares takes numbers" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
