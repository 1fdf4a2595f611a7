"""Parallel samples and equal prompts compute their shared prompt once.

A waiting request whose next prompt block a running request is still computing waits for
it and then takes it from the prefix cache, so `n` samples of a prompt, or equal prompts
in one call, compute it once: the first request the whole prompt, each other only the part
after its last full block, in a later step (never beside the writer: a step's attention
would read the long prompt once per copy).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runner import LLM, SamplingParams
from tests.models.test_flash_attention import _compare, tiny_model
from tests.runner.engine.test_scheduler import MODEL, drive, make_request, make_scheduler

BLOCK = 16
N = 8
MAX_TOKENS = 8
PROMPT = np.random.default_rng(0).integers(5, 4000, size=300).tolist()  # 18 full blocks + 12
TAIL = len(PROMPT) % BLOCK
# Each of the N requests decodes MAX_TOKENS - 1 tokens after the step that samples its first.
DECODES = N * (MAX_TOKENS - 1)
SHARED = len(PROMPT) + (N - 1) * TAIL + DECODES
UNSHARED = N * len(PROMPT) + DECODES


def computed(llm: LLM, prompts, params: SamplingParams) -> tuple[int, int, list]:
    """(tokens the steps ran through the model, prompt tokens served cached, outputs) of
    one generate call on an empty prefix cache."""
    llm.reset_prefix_cache()
    stats = llm.scheduler.stats
    before = stats.num_computed_tokens, stats.num_cached_prompt_tokens
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks
    return stats.num_computed_tokens - before[0], stats.num_cached_prompt_tokens - before[1], outs


def completions(outs) -> list[list[int]]:
    return [list(c.token_ids) for o in outs for c in o.outputs]


# -- the scheduler alone -------------------------------------------------------------------


def _run(prompt: list[int], copies: int, *, budget: int = 1024, caching: bool = True, **params):
    sched = make_scheduler(block_size=BLOCK, num_blocks=256, max_model_len=512, max_num_seqs=copies,
                           max_num_batched_tokens=budget, caching=caching,
                           model=dataclasses.replace(MODEL, max_position_embeddings=512))
    reqs = [make_request(i, prompt, max_tokens=MAX_TOKENS, ignore_eos=True, **params) for i in range(copies)]
    drive(sched, [(0, r) for r in reqs])
    return sched.stats, reqs


def test_scheduler_computes_a_prompt_shared_by_eight_requests_once():
    stats, reqs = _run(PROMPT, N)
    assert stats.num_computed_tokens == SHARED  # 440, not 2,456
    assert stats.num_cached_prompt_tokens == (N - 1) * (len(PROMPT) - TAIL)
    assert [r.num_cached_tokens for r in reqs] == [0] + [len(PROMPT) - TAIL] * (N - 1)


def test_a_prompt_of_whole_blocks_recomputes_its_last_block_per_follower():
    """One token must run to give logits: as on a prefix-cache hit, the last block is
    recomputed, never written into a block the first request holds."""
    prompt = PROMPT + PROMPT[:BLOCK - TAIL]  # 19 full blocks
    stats, _ = _run(prompt, N)
    assert stats.num_computed_tokens == len(prompt) + (N - 1) * BLOCK + DECODES


def test_followers_wait_for_the_writer_and_never_share_its_step():
    sched = make_scheduler(block_size=BLOCK, num_blocks=256, max_model_len=512, max_num_seqs=N,
                           max_num_batched_tokens=1024, model=dataclasses.replace(MODEL, max_position_embeddings=512))
    for i in range(N):
        sched.add_request(make_request(i, PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True))
    first = sched.schedule()
    assert [s.num_tokens for s in first.scheduled] == [len(PROMPT)]  # the others wait for it
    assert len(sched.waiting) == N - 1


def test_chunked_prompt_shares_the_blocks_each_chunk_completes():
    """The first chunk takes the whole budget; the others wait until the writer's last
    chunk has run, then find the whole prompt cached: the prompt still runs once."""
    stats, _ = _run(PROMPT, N, budget=128)
    assert stats.num_computed_tokens == SHARED


@pytest.mark.parametrize("why", ["caching off", "prompt logprobs"])
def test_no_sharing_without_the_prefix_cache_or_with_prompt_logprobs(why):
    caching = why != "caching off"
    extra = {"prompt_logprobs": 0} if why == "prompt logprobs" else {}
    stats, _ = _run(PROMPT, N, caching=caching, **extra)
    assert stats.num_computed_tokens == UNSHARED
    assert stats.num_cached_prompt_tokens == 0


def test_shared_blocks_survive_the_writer_finishing_or_the_reader_being_preempted():
    """A tight pool: readers are preempted and recompute, writers finish first; `drive`
    checks every read against the KV each block really holds and that no block leaks."""
    sched = make_scheduler(block_size=4, num_blocks=12, max_model_len=32, max_num_seqs=4,
                           max_num_batched_tokens=32)
    prompt = list(range(1, 19))
    reqs = [make_request(i, prompt, max_tokens=4 if i == 0 else 12, ignore_eos=True) for i in range(4)]
    trace = drive(sched, [(0, r) for r in reqs], max_steps=500)
    assert trace.preemptions > 0
    assert sched.stats.num_cached_prompt_tokens >= 3 * 16


# -- the engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines():
    """The built-in model with prefix caching on and off (one step admits all N)."""
    settings = dict(max_model_len=512, num_kv_blocks=256, max_num_seqs=N, block_size=BLOCK)
    return LLM(**settings), LLM(**settings, enable_prefix_caching=False)


# Greedy n > 1 is refused (identical outputs): top_k=1 samples greedily at any temperature.
GREEDY = SamplingParams(n=N, temperature=1.0, top_k=1, max_tokens=MAX_TOKENS, ignore_eos=True)
SEEDED = SamplingParams(n=N, temperature=0.8, top_p=0.95, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_n_samples_compute_the_prompt_once_and_match_the_unshared_run(engines, params):
    on, off = engines
    shared, cached, outs_on = computed(on, {"prompt_token_ids": PROMPT}, params)
    unshared, _, outs_off = computed(off, {"prompt_token_ids": PROMPT}, params)
    assert (shared, unshared) == (SHARED, UNSHARED)
    assert cached == (N - 1) * (len(PROMPT) - TAIL)
    assert completions(outs_on) == completions(outs_off)
    if params is SEEDED:
        assert len({tuple(c) for c in completions(outs_on)}) > 1, "the samples should differ"


def test_seeded_samples_equal_each_request_run_alone(engines):
    on, _ = engines
    _, _, outs = computed(on, {"prompt_token_ids": PROMPT}, SEEDED)
    alone = []
    for i in range(N):
        single = SamplingParams(temperature=0.8, top_p=0.95, seed=SEEDED.seed + i, max_tokens=MAX_TOKENS,
                                ignore_eos=True)
        alone += completions(computed(on, {"prompt_token_ids": PROMPT}, single)[2])
    assert completions(outs) == alone


def test_equal_prompts_in_one_call_compute_the_prompt_once(engines):
    on, off = engines
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT}] * N
    shared, _, outs_on = computed(on, prompts, params)
    unshared, _, outs_off = computed(off, prompts, params)
    assert (shared, unshared) == (SHARED, UNSHARED)
    assert completions(outs_on) == completions(outs_off)
    assert len({tuple(c) for c in completions(outs_on)}) == 1


# -- the pallas backend's tiled reader -----------------------------------------------------


def test_flash_attention_reads_a_block_listed_under_two_sequences():
    """Sequence 1 reuses sequence 0's first three blocks (as a follower does in its step):
    the tiled reader must see them under both owners, as the reference reader does."""
    spans, blocks = [(0, 14), (12, 15)], [[5, 2, 9, 7], [5, 2, 9, 11]]
    for tiles in ({}, {"q_tile": 8, "key_tile_keys": 4}):
        got, expected = _compare(4, 2, jnp.float32, spans, seed=1, blocks=blocks, **tiles)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_pallas_backend_shares_the_prompt_and_matches_reference():
    cfg, params = tiny_model()
    prompt = np.random.default_rng(2).integers(0, 101, 30).tolist()  # 7 full blocks of 4 + 2
    sampling = SamplingParams(n=4, temperature=0.8, seed=3, max_tokens=4, ignore_eos=True)
    outs = {}
    for backend, caching in [("reference", False), ("pallas", True), ("pallas", False)]:
        llm = LLM(model_config=cfg, params=params, attention_backend=backend, block_size=4,
                  num_kv_blocks=64, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64,
                  enable_prefix_caching=caching)
        n, _, out = computed(llm, {"prompt_token_ids": prompt}, sampling)
        assert n == (30 + 3 * 2 if caching else 4 * 30) + 4 * 3
        outs[backend, caching] = completions(out)
    assert outs["pallas", True] == outs["pallas", False] == outs["reference", False]
    assert jax.devices()[0].platform == "cpu"  # the decode kernel ran in interpret mode


def test_a_one_token_tail_reads_the_blocks_its_step_writes(engines):
    # Prompts of two full blocks and one token of their own: the followers compute that one
    # token, a chunk the decode program runs, and it must run after the prefill that writes
    # the blocks it reads.
    on, off = engines
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT[:2 * BLOCK] + [t]} for t in (7, 8, 9)]
    shared, cached, outs_on = computed(on, prompts, params)
    assert cached == 2 * 2 * BLOCK  # both followers took the two blocks
    alone = [completions(computed(off, p, params)[2])[0] for p in prompts]
    assert completions(outs_on) == alone
