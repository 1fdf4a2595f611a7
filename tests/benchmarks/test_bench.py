"""The benchmark command on a reduced shape: every figure present, positive and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    # Sampled before each batch size and at the end; the fastest sample is the peak.
    assert len(report["read_bandwidth_samples_gb_per_s"]) == len(report["results"]) + 1
    assert report["read_bandwidth_gb_per_s"] == max(report["read_bandwidth_samples_gb_per_s"])
    assert report["matmul_gflop_per_s"] == max(report["matmul_gflop_samples_per_s"])
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


# A stand-in for vLLM with the surface the peer script uses: each generate sleeps
# FAKE_STEP_S per new token, and every engine start and call is logged.
FAKE_VLLM = '''
import json, os, time
STEP_S = float(os.environ["FAKE_STEP_S"])

def _log(*entry):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

class SamplingParams:
    def __init__(self, max_tokens, **kwargs):
        self.max_tokens = max_tokens

class LLM:
    def __init__(self, model, **kwargs):
        if os.environ.get("FAKE_VLLM_FAIL"):
            raise RuntimeError("fake vLLM refused to start")
        print("INFO a log line on stdout, as vLLM writes them")
        _log("start", kwargs["max_num_seqs"])

    def generate(self, prompts, params, use_tqdm=True):
        time.sleep(STEP_S * params.max_tokens)
        _log("generate", len(prompts), params.max_tokens)
'''


@pytest.fixture(scope="module")
def fake_vllm(tmp_path_factory):
    """An interpreter path whose `import vllm` finds the stand-in (PYTHONPATH set by a wrapper:
    the bench clears the variable for its peer)."""
    root = tmp_path_factory.mktemp("fake_vllm")
    (root / "vllm").mkdir()
    (root / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    python = root / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{root}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return python


def test_vllm_peer_runs_each_batch_size_in_one_engine(fake_vllm, tmp_path):
    log, out = tmp_path / "calls.jsonl", tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "runner", "bench", "--vocab-size", "256", "--hidden-size", "32",
           "--intermediate-size", "64", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1",
           "--head-dim", "16", "--prompt-len", "8", "--max-tokens", "16", "--batch-sizes", "1", "3",
           "--repeats", "2", "--no-reference", "--vllm-python", str(fake_vllm), "--output", str(out)]
    env = {**os.environ, "FAKE_VLLM_LOG": str(log), "FAKE_STEP_S": "0.01"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0] == ["start", 3]  # one engine, sized for the largest batch
    assert [c[0] for c in calls[1:]] == ["generate"] * (len(calls) - 1)
    sizes = [c[1] for c in calls[1:]]
    assert sizes == sorted(sizes) and set(sizes) == {1, 3}  # batch 1's runs, then batch 3's
    report = json.loads(out.read_text())
    for row in report["results"]:
        v = row["vllm"]
        # 10 ms per token: the step, and the whole run of 16 tokens.
        assert v["decode_ms_per_step"] == pytest.approx(10.0, rel=0.2)
        assert v["total_s"] == pytest.approx(0.16, rel=0.2)
        assert row["ratio_vllm"] == pytest.approx(row["ours"]["tokens_per_s"] / v["tokens_per_s"])
        assert v["mbu"] == pytest.approx(report["weight_bytes"] / (v["decode_ms_per_step"] / 1000)
                                         / (report["read_bandwidth_gb_per_s"] * 1e9))


def test_a_peer_that_fails_to_start_names_its_error(fake_vllm, monkeypatch):
    from benchmarks.bench import VllmPeer, Workload

    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    monkeypatch.setenv("FAKE_STEP_S", "0")
    with pytest.raises(RuntimeError, match="fake vLLM refused to start"):
        VllmPeer(str(fake_vllm), Path("unused"), Workload())
