"""The whole analysis on a tiny classifier: diagnosis, the automatic fix, the plan round trip
through ``onnxq quantize --config plan.json``, the CLI, and an incremental rerun."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from tiny_models import batches, classifier_eval, classifier_model

from onnxq.analysis import AnalysisConfig, analyze
from onnxq.cli import main


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    result = analyze(classifier_model(), batches(4), classifier_eval, eval_data=batches(2, seed=3),
                     options=AnalysisConfig(metric="acc", workers=1, plots=0), output_dir=out)
    return result, out


def test_diagnosis_names_the_weights_and_the_layer(analysis):
    result, _ = analysis
    s = result.data["summary"]
    assert s["fp32"]["score"] == 1.0 and s["quantized"]["score"] < 0.5
    assert s["weights_only"]["score"] < 0.5 and s["activations_only"]["score"] >= 0.99
    assert result.data["sensitivity"][0]["id"] == "w:gemm_4"
    text = " ".join(result.data["diagnosis"])
    assert "comes from the weights" in text and "gemm_4" in text
    assert result.data["sanity"]["ok"]


def test_the_fix_meets_the_target_with_per_channel_weights(analysis):
    result, _ = analysis
    plan = result.data["plan"]
    assert plan["met"] and plan["changes"] == ["per-channel weights for gemm_4"]
    assert plan["high_precision"] == []
    assert result.plan.weight_spec("gemm_4", "Gemm").per_channel
    assert result.data["summary"]["plan"]["score"] == result.data["summary"]["plan"]["search_score"] == 1.0


def test_plan_round_trip_through_onnxq_quantize(analysis, tmp_path):
    result, out = analysis
    model = tmp_path / "m.onnx"
    ir.save(classifier_model(), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, b in enumerate(batches(4)):
        np.save(calib / f"{i}.npy", b["x"])
    rc = main(["quantize", str(model), "--calib", str(calib), "--config", str(out / "plan.json"),
               "--passes", ",".join(result.passes), "-o", str(tmp_path / "q")])
    assert rc == 0
    written = json.loads((tmp_path / "q" / "m.encodings.json").read_text())
    from onnxq.quant.encodings import to_aimet_v1

    want = to_aimet_v1(result.sim.encodings, {})
    assert written["param_encodings"] == want["param_encodings"]
    assert written["activation_encodings"] == want["activation_encodings"]


def test_report_files(analysis):
    _, out = analysis
    for name in ("report.html", "analysis.json", "plan.json"):
        assert (out / name).is_file()
    data = json.loads((out / "analysis.json").read_text())
    assert data["version"] == 1 and data["timing_s"]["total"] > 0
    html = (out / "report.html").read_text()
    assert all(f"id='{s}'" in html for s in ("summary", "diagnosis", "sanity", "sensitivity",
                                             "weight-ranges", "activation-ranges", "plan"))


def test_rerun_is_served_from_the_cache(analysis):
    _, out = analysis
    again = analyze(classifier_model(), batches(4), classifier_eval, eval_data=batches(2, seed=3),
                    options=AnalysisConfig(metric="acc", workers=1, plots=0), output_dir=out)
    assert again.data["cache"]["misses"] == 0 and again.data["cache"]["hits"] > 10
    assert again.data["plan"]["changes"] == ["per-channel weights for gemm_4"]


def test_cli_analyze_in_worker_processes(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    ir.save(classifier_model(), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, b in enumerate(batches(5)):
        np.save(calib / f"{i}.npy", b["x"])
    rc = main(["analyze", str(model), "--calib", str(calib), "--eval", "tiny_models:classifier_eval",
               "--metric", "acc", "--workers", "2", "--fixes", "per-channel", "--no-plots",
               "-o", str(tmp_path / "a")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "automatic fix" in text and "target met" in text and "per-channel weights for gemm_4" in text
    data = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert data["workers"] == 2 and data["data"]["held_out_from_calibration_batches"] == 1


def test_cli_analyze_bad_eval_is_a_one_line_error(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    ir.save(classifier_model(), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "0.npy", batches(1)[0]["x"])
    rc = main(["analyze", str(model), "--calib", str(calib), "--eval", "no_such_module:f",
               "--no-plots", "-o", str(tmp_path / "a")])
    assert rc == 1
    assert "cannot import 'no_such_module'" in capsys.readouterr().err


def test_proxy_metric_and_a_local_callable():
    seen = []

    def evaluate(session):  # a closure: cannot go to worker processes, runs in this process
        seen.append(1)
        return 0.5

    result = analyze(classifier_model(), batches(3), evaluate,
                     options=AnalysisConfig(workers=2, fixes=()))
    assert seen and result.data["workers"] == 1
    assert result.data["summary"]["fp32"]["score"] == 0.5
    proxy = analyze(classifier_model(), batches(3), options=AnalysisConfig(workers=1, fixes=()))
    assert proxy.data["metric"]["name"] == "agreement" and proxy.data["metric"]["source"] == "proxy"
