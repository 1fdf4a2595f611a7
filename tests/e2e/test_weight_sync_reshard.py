"""Resharding on simulated CPU devices: a trainer's tree sharded over 4 other devices goes
to a runner with tensor parallel 2, a replicated one to tensor parallel 4, each leaf device
to device (`tests/e2e/weight_sync_worker.py` runs them in a process with 8 devices)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.test_tensor_parallel import ROOT, worker_env


def test_a_trainers_tree_on_another_mesh_serves_what_a_load_of_the_same_weights_serves(hf_checkpoint, tmp_path):
    folder = hf_checkpoint("qwen3_heads8_gqa2")[0]
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"folder": str(folder)}))
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.weight_sync_worker", str(spec), str(out)],
                          cwd=ROOT, env=worker_env(8), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    record = json.loads(out.read_text())
    for layout, tp in (("sharded4", 2), ("replicated", 4)):
        r = record[layout]
        assert r["dummy"] != r["expected"]  # the runner really served other weights before
        assert r["reload"] == r["expected"], layout
        assert r["streamed"] == r["expected"], layout
        assert r["on_runner_shardings"] and r["caller_kept"] and r["kept_after_refusal"]
        # Only finiteness flags and KV-scale scalars come back to the host, never a weight.
        assert r["reload_host_bytes"] < 1024 and r["streamed_host_bytes"] < 1024, r
        assert r["weight_bytes"] > 100_000
    refusal = record["sharded4"]["donate_refusal"]
    assert refusal is not None and refusal.startswith(
        "donate=True: leaf 'embed' is placed as P('fsdp',) over mesh {'fsdp': 4} of devices [4, 5, 6, 7]; "
        "the runner places it as P('model',) over mesh {'data': 1, 'model': 2} of devices [0, 1]")
