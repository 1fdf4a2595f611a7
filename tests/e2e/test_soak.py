"""Soak: thousands of mixed requests through a KV pool too small for them, with sleep/wake
(both levels), weight reloads and interrupted calls between batches.

Every request must finish, greedy requests must equal their isolated outputs (computed once
per distinct prompt, alone, on a fresh engine without prefix caching or chunking), seeded
requests that repeat must repeat their tokens, and the block pool must be whole at the end.

The request count comes from SOAK_REQUESTS. The default (500) keeps the test under a minute
on a 2-core CPU, which is what the default test run uses; the full soak is

    SOAK_REQUESTS=2000 python -m pytest -q tests/e2e/test_soak.py
"""

from __future__ import annotations

import os
import time
from collections import Counter

import jax
import numpy as np
import pytest

from runner import LLM, SamplingParams
from runner.formats.tokenizer import Tokenizer

NUM_REQUESTS = int(os.environ.get("SOAK_REQUESTS", "500"))
BATCH = 50  # requests per generate call; a lifecycle action runs between calls
# The settings of test_engine.py (one pytest process then compiles once for both modules),
# with four sequences a step: the six blocks cannot hold them, so requests get preempted.
LLM_ARGS = dict(num_kv_blocks=6, block_size=16, max_model_len=64, max_num_batched_tokens=8, max_num_seqs=4)
VOCAB, MAX_NEW = 97, 16

_rng = np.random.default_rng(2024)
SHARED = _rng.integers(3, 94, size=32).tolist()
# Distinct greedy prompts, some behind a shared head (prefix-cache hits), lengths 1..40.
GREEDY_PROMPTS = [(SHARED[:int(_rng.integers(0, 33))] if i % 2 else [])
                  + _rng.integers(3, 94, size=int(_rng.integers(1, 9))).tolist() for i in range(24)]
# Seeded sampled requests drawn from a small pool, so that each one repeats.
SEEDED = [(_rng.integers(3, 94, size=int(_rng.integers(1, 30))).tolist(),
           SamplingParams(temperature=float(_rng.uniform(0.5, 1.3)), top_k=int(_rng.integers(0, 40)),
                          top_p=float(_rng.uniform(0.6, 1.0)), seed=int(_rng.integers(0, 2**32)),
                          max_tokens=int(_rng.integers(1, MAX_NEW + 1)), ignore_eos=True))
          for _ in range(12)]


def ids(prompt: list[int]) -> dict:
    return {"prompt_token_ids": prompt}


@pytest.fixture(scope="module")
def tied(hf_checkpoint):
    return hf_checkpoint("qwen3_tied")[0]


@pytest.fixture(scope="module")
def isolated(tied) -> list[list[int]]:
    """Greedy outputs of each distinct prompt, run alone: nothing cached, nothing chunked."""
    alone = LLM(str(tied), **{**LLM_ARGS, "max_num_seqs": 2, "max_num_batched_tokens": 64},
                enable_prefix_caching=False, enable_chunked_prefill=False)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    return [alone.generate([ids(p)], params, use_tqdm=False)[0].outputs[0].token_ids for p in GREEDY_PROMPTS]


def random_request(rng: np.random.Generator) -> tuple[str, int, list[int], SamplingParams]:
    """(kind, pool index, prompt, params): greedy from its pool, seeded from its pool, or
    sampled with random settings (penalties, bias, stops, min_tokens, logprobs, n)."""
    kind = str(rng.choice(["greedy", "seeded", "sampled"], p=[0.45, 0.15, 0.4]))
    if kind == "greedy":
        i = int(rng.integers(len(GREEDY_PROMPTS)))
        return kind, i, GREEDY_PROMPTS[i], SamplingParams(temperature=0, max_tokens=int(rng.integers(1, MAX_NEW + 1)),
                                                          ignore_eos=True)
    if kind == "seeded":
        i = int(rng.integers(len(SEEDED)))
        return kind, i, *SEEDED[i]
    prompt = rng.integers(3, 94, size=int(rng.integers(1, 41))).tolist()
    max_tokens = int(rng.integers(1, MAX_NEW + 1))
    extra = {}
    if rng.random() < 0.3:
        extra["logit_bias"] = {int(t): float(rng.uniform(-5, 5)) for t in rng.integers(0, VOCAB, size=3)}
    if rng.random() < 0.2:
        extra["stop_token_ids"] = [int(t) for t in rng.integers(0, VOCAB, size=2)]
    if rng.random() < 0.2:
        extra["stop"] = ["a", "Z0"]
    if rng.random() < 0.2:
        extra["min_tokens"] = int(rng.integers(0, max_tokens + 1))
    if rng.random() < 0.2:
        extra["logprobs"] = int(rng.integers(0, 4))
    if rng.random() < 0.1:
        extra["prompt_logprobs"] = int(rng.integers(0, 3))
    n, temperature = int(rng.integers(1, 3)), float(rng.choice([0.0, rng.uniform(0.2, 1.5)]))
    params = SamplingParams(
        n=n if temperature > 0 else 1, temperature=temperature,  # greedy n > 1 is refused, as in vLLM
        top_k=int(rng.choice([0, rng.integers(1, 60)])), top_p=float(rng.choice([1.0, rng.uniform(0.3, 1.0)])),
        min_p=float(rng.choice([0.0, 0.05])), seed=None if rng.random() < 0.5 else int(rng.integers(0, 2**32)),
        max_tokens=max_tokens, ignore_eos=bool(rng.random() < 0.5), **extra)
    return "sampled", -1, prompt, params


def check_finished(out, prompt: list[int], params: SamplingParams) -> None:
    assert out.finished and out.prompt_token_ids == prompt
    assert len(out.outputs) == params.n
    for c in out.outputs:
        assert c.finish_reason in ("length", "stop"), c.finish_reason
        assert 1 <= len(c.token_ids) <= params.max_tokens
        assert c.finish_reason == "stop" or len(c.token_ids) == params.max_tokens
        assert all(0 <= t < VOCAB for t in c.token_ids)
        if params.logprobs is not None:
            assert len(c.logprobs) == len(c.token_ids)
    if params.prompt_logprobs is not None:
        assert len(out.prompt_logprobs) == len(prompt)


@pytest.mark.slow
def test_soak(tied, isolated, monkeypatch):
    llm = LLM(str(tied), tokenizer=Tokenizer.byte_level(), **LLM_ARGS)
    host_params = jax.tree.map(np.asarray, llm.runner.params)
    rng = np.random.default_rng(7)

    def sleep1():
        llm.sleep(level=1)
        llm.wake_up()

    def sleep2_reload_between_wake_ups():
        llm.sleep(level=2)
        llm.wake_up(["weights"])
        llm.reload_weights()
        llm.wake_up(["kv_cache"])

    def sleep2_wake_then_reload():
        llm.sleep(level=2)
        llm.wake_up()
        llm.reload_weights(params=host_params)

    def reload():
        llm.reload_weights()

    def reload_from_path():
        llm.reload_weights(weights_path=str(tied))

    actions = [sleep1, sleep2_reload_between_wake_ups, reload, sleep2_wake_then_reload, reload_from_path,
               llm.reset_prefix_cache]
    seeded_seen: dict[int, list[list[int]]] = {}
    done, calls, faults, actions_run = Counter(), 0, 0, Counter()
    start = time.perf_counter()
    while sum(done.values()) < NUM_REQUESTS:
        batch = [random_request(rng) for _ in range(min(BATCH, NUM_REQUESTS - sum(done.values())))]
        prompts, params = [ids(p) for _, _, p, _ in batch], [s for _, _, _, s in batch]
        if calls % 3 == 1:  # an interrupt at a random step: the batch is then sent again
            real, at, seen = llm.runner.execute_model, int(rng.integers(1, 40)), []

            def interrupted(out, real=real, at=at, seen=seen):
                seen.append(1)
                if len(seen) == at:
                    raise KeyboardInterrupt
                return real(out)

            monkeypatch.setattr(llm.runner, "execute_model", interrupted)
            try:
                llm.generate(prompts, params, use_tqdm=False)
            except KeyboardInterrupt:
                faults += 1
            monkeypatch.undo()
            assert not llm.scheduler.has_unfinished()
            assert llm.scheduler.pool.num_free_blocks == llm.runner.num_blocks
        outs = llm.generate(prompts, params, use_tqdm=False)
        calls += 1
        for (kind, i, prompt, p), out in zip(batch, outs):
            check_finished(out, prompt, p)
            tokens = out.outputs[0].token_ids
            if kind == "greedy":
                assert tokens == isolated[i][:p.max_tokens], f"greedy prompt {i} differs from its isolated output"
            elif kind == "seeded":
                seeded_seen.setdefault(i, []).append(tokens)
            done[kind] += 1
        action = actions[calls % len(actions)]
        action()
        actions_run[action.__name__] += 1
    elapsed = time.perf_counter() - start

    stats = llm.scheduler.stats
    print(f"\nsoak: {sum(done.values())} requests ({dict(done)}) in {calls} calls, {elapsed:.1f}s; "
          f"{faults} interrupted calls, lifecycle actions {dict(actions_run)}; {stats.num_steps} steps, "
          f"{stats.num_preemptions} preemptions, {stats.num_cached_prompt_tokens}/{stats.num_prompt_tokens} "
          f"prompt tokens from the prefix cache")
    assert sum(done.values()) == NUM_REQUESTS
    for i, runs in seeded_seen.items():
        assert all(r == runs[0] for r in runs), f"seeded request {i} did not repeat its tokens"
    assert sum(len(r) > 1 for r in seeded_seen.values()) > 0
    assert stats.num_preemptions > 0 and stats.num_cached_prompt_tokens > 0 and faults > 0
    assert not llm.scheduler.has_unfinished()
    assert llm.scheduler.pool.num_free_blocks == llm.runner.num_blocks
    llm.scheduler.pool.check_invariants([])
