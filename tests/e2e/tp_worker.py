"""Subprocess side of `test_tensor_parallel.py`: runs the LLM on simulated CPU devices.

JAX fixes its device count when it initialises, so tensor-parallel runs need a process of
their own, started with `XLA_FLAGS=--xla_force_host_platform_device_count=N` and
`JAX_PLATFORMS=cpu`. Usage:

    python -m tests.e2e.tp_worker parity SPEC.json OUT.json
    python -m tests.e2e.tp_worker lifecycle SPEC.json OUT.json
    python -m tests.e2e.tp_worker distributed SPEC.json OUT.json

Each writes a JSON record of what it saw (tokens, log-probabilities, shardings, compile
counts); the test asserts on it. This module imports no torch: checkpoints come ready-made.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from typing import Any

LLM_ARGS = dict(num_kv_blocks=32, block_size=16, max_model_len=64)
PROMPTS = [{"prompt_token_ids": [5, 17, 42, 8, 91, 33]}, {"prompt_token_ids": [9, 9, 4]}]
MAX_TOKENS = 8


def sampling() -> list[Any]:
    """Greedy with prompt log-probabilities, and seeded top-k sampling, in one batch."""
    from runner import SamplingParams

    return [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3, prompt_logprobs=2),
            SamplingParams(temperature=0.8, top_k=20, seed=123, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)]


def generate(llm: Any) -> list[dict[str, Any]]:
    """Tokens and log-probabilities, computed from scratch (no cached prefix)."""
    llm.reset_prefix_cache()
    outs = llm.generate(PROMPTS, sampling(), use_tqdm=False)

    def entries(d: dict[int, Any] | None) -> list[list[float]] | None:
        return None if d is None else sorted([int(k), float(v.logprob)] for k, v in d.items())

    return [{"tokens": o.outputs[0].token_ids,
             "logprobs": [entries(d) for d in o.outputs[0].logprobs],
             "prompt_logprobs": None if o.prompt_logprobs is None else [entries(d) for d in o.prompt_logprobs]}
            for o in outs]


def specs(tree: Any) -> dict[str, list[Any]]:
    """Leaf path -> its PartitionSpec as a list."""
    import jax
    from state.params import path_str

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec] for p, x in flat}


def placed_as_recorded(llm: Any) -> bool:
    """The live arrays sit exactly on the shardings the runner state records."""
    import jax

    state = llm.runner.state
    pairs = list(zip(jax.tree.leaves(state.params), jax.tree.leaves(state.param_shardings)))
    pairs += list(zip(jax.tree.leaves(state.kv_cache), jax.tree.leaves(state.kv_shardings)))
    return all(x.sharding == s for x, s in pairs)


def parity(spec: dict[str, Any]) -> dict[str, Any]:
    """Per run (folder, tp, dp, backend): outputs, shardings, compile counts, speed."""
    from runner import LLM
    from runner.device.compilation import CompileCounter

    results = []
    for run in spec["runs"]:
        llm = LLM(run["folder"], tensor_parallel_size=run["tp"], data_parallel_size=run.get("dp", 1),
                  attention_backend=run.get("backend", "reference"), **LLM_ARGS)
        first_k = llm.runner.state.kv_cache[0].k
        with warnings.catch_warnings(record=True) as caught, CompileCounter() as warmup:
            warnings.simplefilter("always")
            generate(llm)
        donated = first_k.is_deleted()
        start = time.perf_counter()
        with CompileCounter() as again:
            outputs = generate(llm)
        elapsed = time.perf_counter() - start
        results.append({
            **run, "outputs": outputs, "warmup_compiles": warmup.count, "compiles_after_warmup": again.count,
            "tokens_per_s": len(PROMPTS) * MAX_TOKENS / elapsed, "kv_donated": donated,
            "donation_warnings": [str(w.message) for w in caught if "donat" in str(w.message)],
            "param_specs": specs(llm.runner.params), "kv_specs": specs(llm.runner.state.kv_cache),
            "placed_as_recorded": placed_as_recorded(llm),
            "mesh": dict(llm.runner.mesh.shape)})
    return {"runs": results}


def lifecycle(spec: dict[str, Any]) -> dict[str, Any]:
    """reload_weights and sleep/wake_up at one tensor-parallel size: outputs, compile
    counts and shardings after each."""
    from runner import LLM
    from runner.device.compilation import CompileCounter

    llm = LLM(spec["folder"], tensor_parallel_size=spec["tp"], **LLM_ARGS)
    record: dict[str, Any] = {"before": generate(llm), "param_specs": specs(llm.runner.params),
                              "kv_specs": specs(llm.runner.state.kv_cache)}

    def after(name: str) -> None:
        with CompileCounter() as c:
            outputs = generate(llm)
        record[name] = {"outputs": outputs, "compiles": c.count, "param_specs": specs(llm.runner.params),
                        "kv_specs": specs(llm.runner.state.kv_cache), "placed_as_recorded": placed_as_recorded(llm)}

    record["rpc_reload"] = llm.collective_rpc("reload_weights")
    after("reload")
    llm.sleep(level=1)
    llm.wake_up()
    after("sleep1")
    llm.sleep(level=2)
    llm.wake_up(["weights"])
    llm.reload_weights()
    llm.wake_up(["kv_cache"])
    after("sleep2")
    return record


def distributed(spec: dict[str, Any]) -> dict[str, Any]:
    """One process of a multi-process run: join the cluster, generate, reload, generate."""
    from runner.device import distributed as dist

    dist.initialize(spec["coordinator"], spec["num_processes"], spec["process_id"], initialization_timeout=60)
    import jax

    from runner import LLM
    from runner.device.compilation import CompileCounter

    llm = LLM(spec["folder"], tensor_parallel_size=spec["tp"], **LLM_ARGS)
    record: dict[str, Any] = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(), "devices": jax.device_count(),
        "fully_addressable": [x.is_fully_addressable for x in jax.tree.leaves(llm.runner.params)][:3],
        "outputs": generate(llm)}
    record["rpc_reset"] = llm.collective_rpc("reset_prefix_cache")
    configs = llm.collective_rpc("update_config", args=({"load_config": {"check_finite": False}},))
    record["rpc_update_config"] = [c.load_config.check_finite for c in configs]
    record["rpc_reload"] = llm.collective_rpc("reload_weights")
    with CompileCounter() as c:
        record["after_reload"] = generate(llm)
    record["compiles_after_reload"] = c.count
    dist.shutdown()
    return record


def main() -> None:
    mode, spec_path, out_path = sys.argv[1:4]
    with open(spec_path) as f:
        spec = json.load(f)
    result = {"parity": parity, "lifecycle": lifecycle, "distributed": distributed}[mode](spec)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
