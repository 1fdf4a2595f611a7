"""The benchmark command on a reduced shape: every figure present, positive and consistent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FIELDS = ("tokens_per_s", "total_s", "ttft_s", "decode_ms_per_step", "prefill_tokens_per_s", "mbu")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, "-m", "runner", "bench", "--vocab-size", "512", "--hidden-size", "64",
           "--intermediate-size", "128", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
           "--head-dim", "16", "--prompt-len", "16", "--max-tokens", "32", "--batch-sizes", "1", "4",
           "--repeats", "2", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout  # the transformers reference ran side by side
    return json.loads(out.read_text())


def test_report_holds_every_field(report):
    assert report["read_bandwidth_gb_per_s"] > 0 and report["weight_bytes"] > 0
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        for side in ("ours", "reference"):
            assert all(row[side][f] > 0 for f in FIELDS), row[side]
        ours = row["ours"]
        assert ours["compiles"] > 0 and ours["compiles_after_warmup"] == 0
        assert ours["warmup_s"] > 0 and ours["peak_memory_bytes"] > 0
        # Matmul FLOPs of a step at the measured matmul rate, over the step time.
        flops_s = row["batch_size"] * report["matmul_flops_per_row"] / (report["matmul_gflop_per_s"] * 1e9)
        assert ours["flop_share"] == pytest.approx(flops_s / (ours["decode_ms_per_step"] / 1000))
        assert row["ratio"] == pytest.approx(ours["tokens_per_s"] / row["reference"]["tokens_per_s"])


def test_figures_are_consistent(report):
    w = report["workload"]
    for row in report["results"]:
        for side in ("ours", "reference"):
            r = row[side]
            b = row["batch_size"]
            # tokens/s x time = tokens generated; prefill rate x TTFT = prompt tokens.
            assert r["tokens_per_s"] * r["total_s"] == pytest.approx(b * w["max_tokens"])
            assert r["prefill_tokens_per_s"] * r["ttft_s"] == pytest.approx(b * w["prompt_len"])
            step_s = r["decode_ms_per_step"] / 1000
            # The step is measured between the one-token run and the run of min(49, max_tokens).
            assert r["ttft_s"] + (min(49, w["max_tokens"]) - 1) * step_s == pytest.approx(r["step_run_s"])
            assert r["mbu"] == pytest.approx(report["weight_bytes"] / step_s
                                             / (report["read_bandwidth_gb_per_s"] * 1e9))
