"""The sweep executor: worker processes, an on-disk cache keyed by inputs, failures kept apart."""

from __future__ import annotations

import os

from sweep_helpers import SquareRunner

from onnxq.analysis.sweep import ResultCache, WorkerPool, digest, run_sweep


def test_in_process_run_and_incremental_rerun(tmp_path):
    cache = ResultCache(tmp_path, digest("model-a"))
    jobs = [(f"j{i}", i) for i in range(5)]
    first = run_sweep(SquareRunner(), jobs, cache=cache)
    assert [first[f"j{i}"]["y"] for i in range(5)] == [0, 1, 4, 9, 16]
    assert not any(r["cached"] for r in first.values())
    again = ResultCache(tmp_path, digest("model-a"))
    second = run_sweep(SquareRunner(), jobs + [("j5", 5)], cache=again)
    assert again.hits == 5 and again.misses == 1
    assert [k for k, r in second.items() if not r["cached"]] == ["j5"]
    other = ResultCache(tmp_path, digest("model-b"))  # other inputs: nothing reused
    run_sweep(SquareRunner(), jobs[:2], cache=other)
    assert other.hits == 0


def test_a_failing_job_is_reported_not_cached(tmp_path):
    cache = ResultCache(tmp_path, "ns")
    out = run_sweep(SquareRunner(), [("ok", 3), ("bad", "boom")], cache=cache)
    assert out["ok"]["y"] == 9
    assert out["bad"]["error"] == "ValueError: planted failure"
    assert cache.get("bad") is None and cache.get("ok") == {"y": 9, "pid": os.getpid()}


def test_worker_processes_give_the_same_results():
    jobs = [(f"j{i}", i) for i in range(6)]
    with WorkerPool(SquareRunner(), 2) as pool:
        out = run_sweep(SquareRunner(), jobs, workers=2, pool=pool)
        again = run_sweep(SquareRunner(), [("k", 7)], workers=2, pool=pool)  # pool reused
    assert [out[f"j{i}"]["y"] for i in range(6)] == [i * i for i in range(6)]
    assert again["k"]["y"] == 49
    assert all(r["pid"] != os.getpid() for r in out.values())
    assert list(out) == [k for k, _ in jobs]
