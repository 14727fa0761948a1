"""Smoke test of benchmarks/scaling.py: the generators and the measured pipeline on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks import scaling


def test_convnet_has_the_requested_node_count(tmp_path: Path) -> None:
    model = scaling.build_convnet(scaling.blocks_for_nodes(200))
    onnx.checker.check_model(model)
    assert abs(len(model.graph.node) - 200) <= scaling._NODES_PER_BLOCK
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == ops.count("Conv")


def test_worker_runs_dfq_and_folds_every_batchnorm(tmp_path: Path) -> None:
    path, out = tmp_path / "net.onnx", tmp_path / "net.opt.onnx"
    model = scaling.build_convnet(scaling.blocks_for_nodes(200))
    onnx.save(model, str(path))
    result = scaling.run_worker({"model": str(path), "out": str(out), "passes": "dfq"})
    bns = [n.op_type for n in model.graph.node].count("BatchNormalization")
    assert result["passes"]["fold-bn"]["changed"] == bns
    assert result["passes"]["cle"]["changed"] > 0
    assert set(result["phases"]) >= {"load", "pass:fold-bn", "pass:cle", "save"}
    assert all(p["seconds"] >= 0 and p["vm_hwm_after"] > 0 for p in result["phases"].values())
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" not in ops


def test_exact_passes_keep_outputs_under_onnxruntime(tmp_path: Path) -> None:
    path, out = tmp_path / "net.onnx", tmp_path / "net.opt.onnx"
    onnx.save(scaling.build_convnet(scaling.blocks_for_nodes(200)), str(path))
    scaling.run_worker({"model": str(path), "out": str(out), "passes": "fold-bn,cle"})
    check = scaling.run_ort_check({"reference": str(path), "candidate": str(out)})
    assert max(check["max_rel_diff"].values()) < 1e-4


def test_big_model_generator_and_verification(tmp_path: Path) -> None:
    big = scaling.write_big_model(tmp_path / "big", layers=3, dim=64)
    assert big.data_path.stat().st_size == big.data_bytes
    out = tmp_path / "out" / "big.opt.onnx"
    result = scaling.run_worker({"model": str(big.path), "out": str(out),
                                 "passes": "fold-bn,cle", "external_data": True})
    assert result["passes"]["cle"]["changed"] == 2  # the conv branch only; Tanh blocks the Gemms
    verified = scaling.verify_big(big, out)
    assert verified["gemm_identical"] == verified["gemm_tensors"] == 6
    assert verified["edited_conv_weights_changed"] == "3/3"
    assert verified["batchnorm_left"] == 0
    diffs = scaling.run_ort_check({"reference": str(big.path), "candidate": str(out)})
    assert max(diffs["max_rel_diff"].values()) < 1e-4


def test_loglog_slope_of_linear_and_quadratic_growth() -> None:
    n = np.array([1000, 2000, 4000])
    assert scaling.loglog_slope(n, 3e-4 * n) == pytest.approx(1.0)
    assert scaling.loglog_slope(n, 1e-7 * n**2) == pytest.approx(2.0)


def test_command_line_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    argv = ["--sizes", "100,200", "--repeats", "1", "--no-big", "--json", str(out),
            "--workdir", str(tmp_path / "work")]
    assert scaling.main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["scaling"]["rows"]
    assert [r["target_nodes"] for r in rows] == [100, 200]
    assert "total" in data["scaling"]["fit"]["cpu"]
    assert not any((tmp_path / "work").iterdir())  # generated models removed
