"""Tensor parallelism over a device mesh, and multi-process serving with jax.distributed.

JAX fixes its device count when it starts, so the runs on several (simulated CPU) devices
happen in subprocesses (`tests/e2e/tp_worker.py`) started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`; this file builds the checkpoints,
starts them with a timeout and asserts on what they report. The rules-table tests run here,
on abstract meshes, with no devices at all.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from runner.device import sharding
from state.config import CacheConfig, ModelConfig, ParallelConfig, RunnerConfig, SchedulerConfig

ROOT = Path(__file__).resolve().parents[2]
LOGPROB_TOL = 1e-4
M = "model"

# (variant, tensor_parallel_size, data_parallel_size, attention backend); both variants have
# eight query heads and a vocabulary of 128, so every size up to 8 splits them.
RUNS = [("qwen3_heads8_gqa2", 1, 1, "reference"), ("qwen3_heads8_gqa2", 2, 1, "reference"),
        ("qwen3_heads8_gqa2", 4, 1, "reference"), ("qwen3_heads8_gqa2", 8, 1, "reference"),
        ("qwen3_heads8_gqa2", 2, 1, "pallas"), ("qwen3_heads8_gqa2", 2, 2, "reference"),
        ("llama_heads8", 1, 1, "reference"), ("llama_heads8", 2, 1, "reference"),
        ("llama_heads8", 4, 1, "reference"), ("llama_heads8", 8, 1, "reference")]

# Which weight groups each run splits over "model", worked out by hand from the rules:
# query heads (q), KV heads (kv) unless tp is a multiple of their count (4 for the Qwen3
# variant, 8 for the Llama one), MLP width (mlp) and the vocabulary (vocab).
ALL = {"q", "kv", "mlp", "vocab"}
SPLIT_GROUPS = {
    ("qwen3_heads8_gqa2", 1): set(), ("qwen3_heads8_gqa2", 2): ALL, ("qwen3_heads8_gqa2", 4): ALL,
    ("qwen3_heads8_gqa2", 8): {"q", "mlp", "vocab"},
    ("llama_heads8", 1): set(), ("llama_heads8", 2): ALL, ("llama_heads8", 4): ALL, ("llama_heads8", 8): ALL,
}
# leaf field -> (group, spec when the group is split); any other leaf is replicated.
SPLIT_SPECS = {"wq": ("q", [None, M]), "wo": ("q", [M]), "wk": ("kv", [None, M]), "wv": ("kv", [None, M]),
               "w_gate": ("mlp", [None, M]), "w_up": ("mlp", [None, M]), "w_down": ("mlp", [M]),
               "embed": ("vocab", [M]), "lm_head": ("vocab", [None, M])}
KV_SPLIT_SPEC = {"reference": [None, None, M], "pallas": [M]}  # K is axis 2 of [P,S,K,Dh], 0 of [K,P,S,Dh]


def expected_param_spec(path: str, groups: set[str]) -> list[Any]:
    group, spec = SPLIT_SPECS.get(path.rsplit(".", 1)[-1], (None, []))
    return spec if group in groups else []


def run_worker(mode: str, spec: dict[str, Any], tmp: Path, devices: int, timeout: int) -> dict[str, Any]:
    spec_file, out_file = tmp / f"{mode}_spec.json", tmp / f"{mode}_out.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.tp_worker", mode, str(spec_file), str(out_file)],
                          cwd=ROOT, env=worker_env(devices), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{mode} worker failed:\n{proc.stderr[-6000:]}"
    return json.loads(out_file.read_text())


def worker_env(devices: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def assert_same_outputs(ours: list[dict], reference: list[dict], what: str) -> None:
    """Identical tokens; log-probabilities (sampled and prompt) within float tolerance."""
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert a["tokens"] == b["tokens"], f"{what}, prompt {i}"
        for field in ("logprobs", "prompt_logprobs"):
            if b[field] is None:
                assert a[field] is None
                continue
            for x, y in zip(a[field], b[field], strict=True):
                if y is None:
                    assert x is None
                    continue
                x, y = np.array(x), np.array(y)
                assert (x[:, 0] == y[:, 0]).all(), f"{what}, prompt {i}: other top {field} tokens"
                np.testing.assert_allclose(x[:, 1], y[:, 1], atol=LOGPROB_TOL, err_msg=f"{what} {field}")


@pytest.fixture(scope="module")
def folders(hf_checkpoint) -> dict[str, str]:
    return {name: str(hf_checkpoint(name)[0]) for name in ("qwen3_tied", "llama_heads8", "qwen3_heads8_gqa2")}


@pytest.fixture(scope="module")
def parity(folders, tmp_path_factory) -> dict[tuple, dict]:
    runs = [{"name": n, "folder": folders[n], "tp": tp, "dp": dp, "backend": b} for n, tp, dp, b in RUNS]
    out = run_worker("parity", {"runs": runs}, tmp_path_factory.mktemp("parity"), devices=8, timeout=170)
    results = {(r["name"], r["tp"], r["dp"], r["backend"]): r for r in out["runs"]}
    for r in out["runs"]:
        print(f"\n{r['name']} tp={r['tp']} dp={r['dp']} {r['backend']}: {r['tokens_per_s']:.0f} tokens/s, "
              f"{r['warmup_compiles']} compilations in the first generate, "
              f"{r['compiles_after_warmup']} in the second", end="")
    return results


# -- the rules table (no devices needed) ----------------------------------------------------

def mesh(tp: int, dp: int = 1) -> AbstractMesh:
    return AbstractMesh((dp, tp), ("data", M), axis_types=(AxisType.Auto, AxisType.Auto))


def model_config(**overrides: Any) -> ModelConfig:
    fields = dict(architecture="Qwen3ForCausalLM", vocab_size=128, hidden_size=40, intermediate_size=72,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=10)
    return ModelConfig(**{**fields, **overrides})


def test_rules_split_heads_mlp_and_vocab_and_replicate_the_rest():
    specs = sharding.param_shardings(model_config(tie_word_embeddings=False), mesh(2))
    layer = specs.layers[1]
    assert {name: getattr(layer, name).spec for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down",
                                                         "attn_norm", "q_norm", "k_scale")} == {
        "wq": P(None, M), "wk": P(None, M), "wv": P(None, M), "wo": P(M), "w_gate": P(None, M),
        "w_up": P(None, M), "w_down": P(M), "attn_norm": P(), "q_norm": P(), "k_scale": P()}
    assert (specs.embed.spec, specs.lm_head.spec, specs.final_norm.spec) == (P(M), P(None, M), P())
    # Nothing maps to "data": a data axis replicates.
    assert sharding.param_shardings(model_config(), mesh(2, dp=4)).layers[0].wq.spec == P(None, M)


def test_axes_that_do_not_divide_fall_back_to_replication():
    cfg = model_config(vocab_size=97, num_key_value_heads=2)
    specs = sharding.param_shardings(cfg, mesh(4))
    assert specs.embed.spec == P()  # 97 entries do not split 4 ways
    assert specs.layers[0].wk.spec == P()  # tp=4 is a multiple of the 2 KV heads: replicated
    assert specs.layers[0].wq.spec == P(None, M)
    # Heads are never cut: 6 heads of 10 values (60 values, divisible by 4) stay whole on 4 devices.
    units = sharding.axis_units(model_config(num_attention_heads=6, num_key_value_heads=2))
    assert sharding.partition_spec(("embed", "q_heads"), units, mesh(4)) == P()
    assert sharding.partition_spec(("embed", "q_heads"), units, mesh(3)) == P(None, M)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.partition_spec(("stages",), units, mesh(2))


@pytest.mark.parametrize("backend, spec_tp2, spec_tp4", [("reference", P(None, None, M), P()),
                                                          ("pallas", P(M), P())])
def test_kv_cache_splits_kv_heads_at_the_layouts_head_axis(backend, spec_tp2, spec_tp4):
    def kv(tp: int) -> Any:
        config = RunnerConfig(model_config=model_config(), cache_config=CacheConfig(attention_backend=backend),
                              scheduler_config=SchedulerConfig(max_model_len=256, max_num_batched_tokens=512),
                              parallel_config=ParallelConfig(tensor_parallel_size=tp))
        return sharding.kv_cache_shardings(config, mesh(tp), num_blocks=10)

    tp2, tp4 = kv(2), kv(4)
    assert len(tp2) == 2 and {c.k.spec for c in tp2} == {c.v.spec for c in tp2} == {spec_tp2}
    assert {c.k.spec for c in tp4} == {spec_tp4}  # 2 KV heads on 4 devices: replicated


def test_a_mesh_larger_than_the_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 4 devices; 1 cpu device"):
        sharding.make_mesh(ParallelConfig(tensor_parallel_size=2, data_parallel_size=2), devices=jax.devices()[:1])
    one = sharding.make_mesh(ParallelConfig(), devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, M: 1}


# -- several devices in one process -----------------------------------------------------------

@pytest.mark.parametrize("name, tp, dp, backend", [r for r in RUNS if r[1:] != (1, 1, "reference")])
def test_tensor_parallel_outputs_match_one_device(parity, name, tp, dp, backend):
    one, run = parity[(name, 1, 1, "reference")], parity[(name, tp, dp, backend)]
    assert run["mesh"] == {"data": dp, M: tp}
    assert_same_outputs(run["outputs"], one["outputs"], f"{name} tp={tp} dp={dp} {backend}")


@pytest.mark.parametrize("name, tp, dp, backend", RUNS)
def test_shardings_follow_the_rules_and_the_cache_stays_donated(parity, name, tp, dp, backend):
    run = parity[(name, tp, dp, backend)]
    groups = SPLIT_GROUPS[(name, tp)]
    assert run["param_specs"] == {path: expected_param_spec(path, groups) for path in run["param_specs"]}
    kv_spec = KV_SPLIT_SPEC[backend] if "kv" in groups else []
    assert set(map(json.dumps, run["kv_specs"].values())) == {json.dumps(kv_spec)}
    assert run["placed_as_recorded"]  # the arrays sit on the shardings RunnerState records
    # Output shardings do not drift: a second generate of the same shapes compiles nothing,
    # and the cache was donated (updated in place) without a warning.
    assert run["compiles_after_warmup"] == 0
    assert run["kv_donated"] and run["donation_warnings"] == []


# -- lifecycle under tensor parallelism ---------------------------------------------------------

def test_reload_and_sleep_keep_outputs_shardings_and_compiled_programs(folders, tmp_path):
    record = run_worker("lifecycle", {"folder": folders["qwen3_tied"], "tp": 2}, tmp_path, devices=2, timeout=100)
    assert record["rpc_reload"] == [None]  # one process: one worker
    # 4 heads, 2 KV heads, a vocabulary of 97 on 2 devices: heads split, vocabulary replicated.
    specs = record["param_specs"]
    assert (specs["layers.0.wq"], specs["layers.0.wk"], specs["embed"]) == ([None, M], [None, M], [])
    assert record["kv_specs"]["0.k"] == [None, None, M]
    for step in ("reload", "sleep1", "sleep2"):
        after = record[step]
        print(f"\ncompilations in the generate after {step}: {after['compiles']}", end="")
        assert after["compiles"] == 0, step
        assert_same_outputs(after["outputs"], record["before"], step)
        assert after["outputs"] == record["before"], step  # bit for bit: same programs, same weights
        assert (after["param_specs"], after["kv_specs"]) == (record["param_specs"], record["kv_specs"]), step
        assert after["placed_as_recorded"], step


# -- several processes ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_what_one_process_does(folders, parity, tmp_path):
    """Two processes of two CPU devices each, one mesh of four (gloo collectives): both
    produce the single-process outputs; collective_rpc answers once per process."""
    spec = {"coordinator": f"127.0.0.1:{free_port()}", "num_processes": 2, "folder": folders["llama_heads8"], "tp": 4}
    procs, logs = [], [tmp_path / f"log{i}.txt" for i in range(2)]
    deadline = time.monotonic() + 120
    try:
        for i in range(2):
            (tmp_path / f"spec{i}.json").write_text(json.dumps({**spec, "process_id": i}))
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tests.e2e.tp_worker", "distributed", str(tmp_path / f"spec{i}.json"),
                     str(tmp_path / f"out{i}.json")],
                    cwd=ROOT, env=worker_env(2), stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i].read_text()[-6000:]}"
    single = parity[("llama_heads8", 1, 1, "reference")]["outputs"]
    for i in range(2):
        record = json.loads((tmp_path / f"out{i}.json").read_text())
        assert (record["process_index"], record["process_count"]) == (i, 2)
        assert (record["local_devices"], record["devices"]) == (2, 4)
        assert record["fully_addressable"] == [False] * 3  # the weights really span both processes
        assert_same_outputs(record["outputs"], single, f"process {i}")
        assert record["rpc_reset"] == [True, True]  # reset_prefix_cache returns True, as vLLM's
        assert record["rpc_update_config"] == [False, False]
        assert record["rpc_reload"] == [None, None]
        assert record["after_reload"] == record["outputs"] and record["compiles_after_reload"] == 0
