"""`benchmarks/gpu_check.py --smoke`: the prepared GPU check runs end to end on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("environment", "parity", "lifecycle", "weight_sync", "benchmark")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(out), "--smoke"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "gpu_check.log").read_text().strip()
    return json.loads((out / "gpu_check.json").read_text())


def test_every_section_is_recorded(report):
    assert set(report["sections"]) == set(SECTIONS)
    for name in SECTIONS:
        section = report["sections"][name]
        assert section["status"] in ("passed", "failed")
        assert section["error"] is None, f"{name}: {section['error']}"


def test_parity_on_cpu(report):
    parity = report["sections"]["parity"]
    assert parity["status"] == "passed", parity["checks"]
    for family in ("qwen3", "llama"):
        for backend in ("reference", "pallas"):
            figures = parity["figures"][family][f"float32_{backend}"]
            assert figures["greedy_identical"]
            assert figures["max_logprob_diff"] <= 1e-3
        assert 0 <= parity["figures"][family]["bfloat16_pallas"]["greedy_agreement"] <= 1


def test_lifecycle_reload_and_sleep(report):
    lifecycle = report["sections"]["lifecycle"]
    assert lifecycle["checks"]["reload_equals_fresh_load"]
    assert lifecycle["checks"]["no_compiles_after_reload"]
    assert lifecycle["status"] == "passed", lifecycle["checks"]
    memory = lifecycle["figures"]["memory"]
    assert memory["sleep1"]["live_array_bytes"] < memory["awake"]["live_array_bytes"]
    assert memory["swap_awake_s"] > 0


def test_weight_sync_figures(report):
    sync = report["sections"]["weight_sync"]
    assert sync["status"] == "passed", sync["checks"]
    figures = sync["figures"]["weight_sync"]
    for label in ("device tree", "streamed device", "donated", "host tree", "wake 1", "sleep 2 + reload"):
        assert figures[label]["s"] > 0 and figures[label]["ratio"] > 0
    peak = figures["streamed peak"]
    assert 0 < peak["largest_bucket_bytes"] < figures["weight_bytes"]
    assert "allocator" not in peak  # the CPU client reports no allocator statistics


def test_benchmark_rows(report):
    bench = report["sections"]["benchmark"]
    assert bench["figures"]["bandwidth_gb_per_s"] > 0
    rows = bench["figures"]["results"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for row in rows:
        assert row["ours"]["tokens_per_s"] > 0 and row["ours"]["compiles_while_timed"] == 0
        assert row["transformers"]["tokens_per_s"] > 0
