"""The engine end to end: `LLM.generate` over a tiny random Qwen3 checkpoint.

Compilation dominates the cost of these tests on a CPU, so every engine shares one block
size, one KV pool size and (but for the unchunked ones) a token budget of 8: every prefill
step is then one token bucket, and the jitted steps see few distinct shapes, compiled once
each for the whole module. Preemption comes from admitting more requests at once
(max_num_seqs 4 instead of 2), not from a smaller pool. A byte-level tokenizer stands in
for the checkpoint's (it has none): token ids below 94 decode to printable ASCII.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from runner import LLM, SamplingParams
from runner.formats.tokenizer import Tokenizer

BLOCK = 16
NUM_BLOCKS = 6  # a request here takes at most 3 blocks: two fit at once, four do not
MAX_LEN = 64
BUDGET = 8  # max_num_batched_tokens of most engines: prompts run in chunks
WHOLE = 32  # the budget of engines without chunked prefill: any prompt here fits one step
EOS = 2  # the checkpoint's eos_token_id
VOCAB = 97

_rng = np.random.default_rng(0)
SHARED = _rng.integers(3, 94, size=40).tolist()
# Shared heads of several lengths (one whole block, or not), then distinct tails; at most
# WHOLE tokens each, so that without chunked prefill every prompt runs in one step.
PROMPTS = [SHARED[:n] + _rng.integers(3, 94, size=m).tolist()
           for n, m in [(24, 5), (24, 8), (17, 2), (0, 7), (8, 17), (24, 1), (3, 3)]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def ids(prompt: list[int]) -> dict:
    return {"prompt_token_ids": prompt}


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint):
    folder, model = hf_checkpoint("qwen3_tied")
    return str(folder), model


@pytest.fixture(scope="module")
def make_llm(checkpoint):
    def make(**kwargs) -> LLM:
        settings = dict(num_kv_blocks=NUM_BLOCKS, block_size=BLOCK, max_model_len=MAX_LEN,
                        max_num_batched_tokens=BUDGET, max_num_seqs=2, tokenizer=Tokenizer.byte_level())
        return LLM(checkpoint[0], **{**settings, **kwargs})
    return make


@pytest.fixture(scope="module")
def llm(make_llm):
    """The shared default engine (prefix caching and chunked prefill on)."""
    return make_llm()


@pytest.fixture(scope="module")
def reference(make_llm):
    """Greedy outputs of PROMPTS, each run alone with nothing cached or chunked."""
    plain = make_llm(enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=WHOLE)
    return [plain.generate([ids(p)], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def assert_idle(llm: LLM) -> None:
    """Nothing queued, nothing held: every block is back in the pool."""
    sched = llm.scheduler
    assert not sched.has_unfinished()
    assert sched.pool.num_free_blocks == llm.runner.num_blocks
    sched.pool.check_invariants([])


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# -- greedy outputs do not depend on how the work is scheduled -------------------------------


@pytest.mark.parametrize("mode", ["chunked_prefill", "prefix_cache", "preemption"])
def test_greedy_outputs_identical_whatever_the_scheduling(mode, make_llm, reference):
    # The reference ran one request at a time, unchunked, uncached: each mode differs from
    # it in batching plus one more thing.
    engines = {
        "chunked_prefill": dict(enable_prefix_caching=False),
        "prefix_cache": dict(),
        "preemption": dict(max_num_seqs=4),
    }
    engine = make_llm(**engines[mode])
    rounds = 2 if mode == "prefix_cache" else 1  # the second round runs from the cache
    for _ in range(rounds):
        outs = engine.generate([ids(p) for p in PROMPTS], GREEDY, use_tqdm=False)
        assert token_ids(outs) == reference
        assert all(o.outputs[0].finish_reason == "length" for o in outs)
    stats = engine.scheduler.stats
    if mode == "chunked_prefill":  # 8 tokens a step: prompts took several
        assert stats.num_steps >= sum(len(p) for p in PROMPTS) // BUDGET
    if mode == "prefix_cache":  # second round: the prompts opening with SHARED[:16] reuse it
        cached = [o.num_cached_tokens for o in outs]
        assert all(c % BLOCK == 0 and c < len(p) for c, p in zip(cached, PROMPTS))
        assert [c for c, p in zip(cached, PROMPTS) if p[:BLOCK] == SHARED[:BLOCK]] == [BLOCK] * 4
    if mode == "preemption":
        assert stats.num_preemptions > 0
    else:
        assert stats.num_preemptions == 0
    assert_idle(engine)


def test_prefix_cache_reuse_is_real(make_llm, llm):
    head = SHARED[:32]  # two full blocks
    first = llm.generate([ids(head + [5])], GREEDY, use_tqdm=False)[0]
    before = llm.scheduler.stats.num_cached_prompt_tokens
    second = llm.generate([ids(head + [6, 7])], GREEDY, use_tqdm=False)[0]
    gained = llm.scheduler.stats.num_cached_prompt_tokens - before
    assert second.num_cached_tokens == gained == 32
    cold = make_llm(enable_prefix_caching=False)
    expected = [cold.generate([ids(p)], GREEDY, use_tqdm=False)[0] for p in (head + [5], head + [6, 7])]
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == token_ids(expected)
    assert [e.num_cached_tokens for e in expected] == [0, 0]
    assert_idle(llm)


def test_prefix_cache_share_on_a_shared_system_prompt(make_llm):
    """Eight requests behind one 32-token system prompt: all but the first skip it."""
    engine = make_llm()
    system = SHARED[:32]
    prompts = [system + [10 + i] * (1 + i % 4) for i in range(8)]
    engine.generate([ids(prompts[0])], GREEDY, use_tqdm=False)
    engine.generate([ids(p) for p in prompts[1:]], GREEDY, use_tqdm=False)
    stats = engine.scheduler.stats
    share = stats.num_cached_prompt_tokens / stats.num_prompt_tokens
    print(f"prefix cache: {stats.num_cached_prompt_tokens}/{stats.num_prompt_tokens} prompt tokens "
          f"skipped ({share:.0%})")
    assert stats.num_cached_prompt_tokens == 7 * 32
    assert_idle(engine)


# -- sampling through the engine ---------------------------------------------------------------


def test_seeded_sampling_reproducible_across_batch_compositions(make_llm, llm):
    params = SamplingParams(temperature=0.9, top_k=30, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([ids(PROMPTS[1])], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0, max_tokens=4), SamplingParams(temperature=1.2, seed=5, top_p=0.7),
              SamplingParams(temperature=0.7, top_k=30, max_tokens=12)]
    crowded = make_llm(max_num_seqs=4)
    for engine in (llm, crowded):
        outs = engine.generate([ids(PROMPTS[0]), ids(PROMPTS[1]), ids(PROMPTS[3]), ids(PROMPTS[2])],
                               [others[0], params, others[1], others[2]], use_tqdm=False)
        assert outs[1].outputs[0].token_ids == alone
    assert len(set(alone)) > 1
    # Another seed gives another sequence (the seed is really used).
    other_seed = SamplingParams(temperature=0.9, top_k=30, seed=4321, max_tokens=10, ignore_eos=True)
    assert llm.generate([ids(PROMPTS[1])], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone
    assert_idle(llm)


def test_n_completions_each_follow_their_own_seed(llm):
    params = SamplingParams(n=3, temperature=1.0, top_k=30, seed=77, max_tokens=8, ignore_eos=True)
    out = llm.generate([ids(PROMPTS[2])], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for i, c in enumerate(out.outputs):  # completion i is the seed + i request
        single = SamplingParams(temperature=1.0, top_k=30, seed=77 + i, max_tokens=8, ignore_eos=True)
        assert llm.generate([ids(PROMPTS[2])], single, use_tqdm=False)[0].outputs[0].token_ids == c.token_ids
    assert_idle(llm)


def test_stop_token_ids_ignore_eos_and_min_tokens(llm, reference):
    plain = reference[0]
    stop = plain[3]
    first = plain.index(stop)
    out = llm.generate([ids(PROMPTS[0])], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == plain[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == llm.tokenizer.decode(plain[:first])  # the stop token's text is left out

    force_eos = {EOS: 100.0}  # EOS becomes every step's greedy choice
    out = llm.generate([ids(PROMPTS[0])], SamplingParams(temperature=0, max_tokens=6, logit_bias=force_eos),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [EOS] and (out.finish_reason, out.stop_reason) == ("stop", None)
    out = llm.generate([ids(PROMPTS[0])], SamplingParams(temperature=0, max_tokens=6, logit_bias=force_eos,
                                                         ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [EOS] * 6 and out.finish_reason == "length"
    out = llm.generate([ids(PROMPTS[0])], SamplingParams(temperature=0, max_tokens=6, min_tokens=3,
                                                         logit_bias=force_eos), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and EOS not in out.token_ids[:3] and out.token_ids[3] == EOS
    assert out.finish_reason == "stop"
    # min_tokens holds back stop token ids too.
    out = llm.generate([ids(PROMPTS[0])], SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 2,
                                                         stop_token_ids=[stop]), use_tqdm=False)[0].outputs[0]
    assert stop not in out.token_ids[:first + 2] and len(out.token_ids) > first + 1
    assert_idle(llm)


def _stop_case(llm, reference):
    plain = reference[3]
    text = llm.tokenizer.decode(plain)
    assert "\ufffd" not in text[:8]
    stop = text[3:5]
    cut = text.find(stop)
    # The fewest tokens whose text holds the stop string.
    k = next(k for k in range(1, len(plain) + 1) if stop in llm.tokenizer.decode(plain[:k]))
    return plain, text, stop, cut, k


def test_stop_strings_are_cut_from_the_text(llm, reference):
    plain, text, stop, cut, k = _stop_case(llm, reference)
    params = SamplingParams(temperature=0, max_tokens=12, stop=["never seen", stop])
    out = llm.generate([ids(PROMPTS[3])], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == plain[:k]
    assert out.text == text[:cut] and stop not in out.text
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    params = SamplingParams(temperature=0, max_tokens=12, stop=stop, include_stop_str_in_output=True)
    out = llm.generate([ids(PROMPTS[3])], params, use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut + len(stop)]
    assert_idle(llm)


def test_stop_string_completed_by_the_last_allowed_token_still_stops(llm, reference):
    """The token that reaches max_tokens can complete a stop string: it still stops there
    (finish_reason "stop") and the string is cut from the text."""
    plain, text, stop, cut, k = _stop_case(llm, reference)
    out = llm.generate([ids(PROMPTS[3])], SamplingParams(temperature=0, max_tokens=k, stop=stop),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == plain[:k]
    assert (out.finish_reason, out.stop_reason, out.text) == ("stop", stop, text[:cut])
    assert_idle(llm)


def test_text_prompt_round_trip(llm):
    out = llm.generate("abc=def", GREEDY, use_tqdm=False)[0]
    assert out.prompt == "abc=def" and out.prompt_token_ids == llm.tokenizer.encode("abc=def")
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
    assert_idle(llm)


# -- log-probabilities, checked against the torch model --------------------------------------


def _torch_logprobs(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def test_logprobs_and_prompt_logprobs(make_llm, checkpoint):
    model = checkpoint[1]
    prompt = PROMPTS[4]  # 25 tokens: several chunks at 8 tokens a step
    engine = make_llm()
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = engine.generate([ids(prompt)], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    ref = _torch_logprobs(model, prompt + completion.token_ids)

    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for pos in range(1, len(prompt)):
        entry = plp[pos]
        assert prompt[pos] in entry and len(entry) in (2, 3)  # top 2, plus the actual token
        top2 = np.argsort(-ref[pos - 1])[:2]
        assert set(top2) <= set(entry)
        for token, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[pos - 1, token], abs=1e-4)
            assert lp.rank == 1 + int(np.sum(ref[pos - 1] > ref[pos - 1, token]))

    assert len(completion.logprobs) == len(completion.token_ids) == 5
    total = 0.0
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        pos = len(prompt) + i - 1
        assert token in entry and len(entry) == 3  # greedy: the chosen token is among the top 3
        assert token == int(np.argmax(ref[pos]))  # greedy
        assert list(entry)[0] == token and entry[token].rank == 1
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[pos, t], abs=1e-4)
            assert lp.rank == 1 + int(np.sum(ref[pos] > ref[pos, t]))
        total += entry[token].logprob
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert_idle(engine)


def test_prompt_logprobs_survive_preemption(make_llm, llm):
    params = SamplingParams(temperature=0, max_tokens=10, prompt_logprobs=0, ignore_eos=True)
    expected = llm.generate([ids(p) for p in PROMPTS[:4]], params, use_tqdm=False)
    tight = make_llm(max_num_seqs=4)
    outs = tight.generate([ids(p) for p in PROMPTS], params, use_tqdm=False)
    assert tight.scheduler.stats.num_preemptions > 0
    for got, want, prompt in zip(outs, expected, PROMPTS):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert len(got.prompt_logprobs) == len(prompt)
        assert got.prompt_logprobs[0] is None
        for pos in range(1, len(prompt)):
            assert list(got.prompt_logprobs[pos]) == [prompt[pos]]  # k = 0: the actual token only
            assert got.prompt_logprobs[pos][prompt[pos]].logprob == pytest.approx(
                want.prompt_logprobs[pos][prompt[pos]].logprob, abs=1e-5)
        assert got.num_cached_tokens == 0  # prompt logprobs need every position computed
    assert_idle(tight)


# -- invalid input: refused whole, nothing run, engine intact ----------------------------------


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=[3]), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(n=0), "n"),
    (dict(top_k=-2), "top_k"),
    (dict(logprobs=21), "logprobs"),
])
def test_invalid_sampling_params_name_the_parameter(llm, kwargs, name):
    steps = llm.scheduler.stats.num_steps
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}\b"):
        llm.generate([ids(PROMPTS[0])], SamplingParams(**kwargs), use_tqdm=False)
    assert llm.scheduler.stats.num_steps == steps
    assert_idle(llm)


@pytest.mark.parametrize("prompts, params, match", [
    ([ids([5] * MAX_LEN)], GREEDY, "max_model_len"),
    ([ids([5, VOCAB])], GREEDY, "prompt 0: token id 97 is outside the vocabulary"),
    ([ids([-1, 5])], GREEDY, "prompt 0: token id -1"),
    ([ids([])], GREEDY, "prompt 0 is empty"),
    (["abc", ""], GREEDY, "prompt 1 is empty"),
    ([ids(PROMPTS[0]), ids([5, 500]), ids(PROMPTS[1])], GREEDY, "prompt 1: token id 500"),
    ([ids(PROMPTS[0]), ids([True, 5])], GREEDY, "prompt 1: prompt_token_ids"),
    ([ids(PROMPTS[0]), 42], GREEDY, "prompt 1"),
    (["a b"], GREEDY, "prompt 0: token id"),  # a space is byte-level id 220, beyond this model
    ([ids(PROMPTS[0])], SamplingParams(logit_bias={VOCAB: 1.0}), "logit_bias"),
    ([ids(PROMPTS[0])], SamplingParams(stop_token_ids=[1, 1000]), "stop_token_ids"),
    ([ids(PROMPTS[0]), ids(PROMPTS[1])], [GREEDY, SamplingParams(logit_bias={1: 1.0, -3: 2.0})], "logit_bias"),
    ([ids(PROMPTS[0]), ids(PROMPTS[1])], [GREEDY], "sampling_params"),
    ([ids(PROMPTS[0])], [None], "sampling_params"),
])
def test_invalid_generate_input_runs_nothing(llm, reference, prompts, params, match):
    steps, next_id = llm.scheduler.stats.num_steps, llm.engine._next_id
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, use_tqdm=False)
    assert llm.scheduler.stats.num_steps == steps, "an invalid call must run nothing"
    assert llm.engine._next_id == next_id
    assert_idle(llm)
    assert token_ids(llm.generate([ids(PROMPTS[0])], GREEDY, use_tqdm=False)) == reference[:1]
    assert_idle(llm)


def test_request_too_long_for_the_kv_pool_is_refused(make_llm, reference):
    """A request whose KV cannot fit the whole pool would preempt itself forever."""
    small = make_llm(max_model_len=256, enable_prefix_caching=False)  # 256 tokens > 6 blocks
    long_prompt = (SHARED * 5)[:90]
    with pytest.raises(ValueError, match="max_tokens"):
        small.generate([ids(PROMPTS[0]), ids(long_prompt)], SamplingParams(max_tokens=20), use_tqdm=False)
    assert small.scheduler.stats.num_steps == 0
    assert_idle(small)
    out = small.generate([ids(long_prompt)], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5  # 94 positions of KV: all 6 blocks
    assert token_ids(small.generate([ids(PROMPTS[0])], GREEDY, use_tqdm=False)) == reference[:1]
    assert_idle(small)


# -- failures and load ------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
def test_exception_mid_generate_leaves_the_engine_serving(make_llm, reference, monkeypatch, when):
    """The third step raises (before the model runs, or after it wrote the KV): the call
    fails, every block comes back, and the next call's outputs are those of a fresh engine."""
    engine = make_llm()
    real = engine.runner.execute_model
    calls = []

    def flaky(out):
        calls.append(1)
        if len(calls) == 3 and when == "before":
            raise RuntimeError("device lost")
        result = real(out)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return result

    monkeypatch.setattr(engine.runner, "execute_model", flaky)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate([ids(p) for p in PROMPTS], GREEDY, use_tqdm=False)
    assert len(calls) == 3
    assert_idle(engine)
    outs = engine.generate([ids(p) for p in PROMPTS], GREEDY, use_tqdm=False)
    assert token_ids(outs) == reference
    assert engine.scheduler.stats.num_cached_prompt_tokens > 0  # the prefix cache still serves
    assert_idle(engine)


def test_keyboard_interrupt_mid_generate_aborts_cleanly(llm, reference, monkeypatch):
    real = llm.runner.execute_model
    calls = []

    def interrupted(out):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(out)

    monkeypatch.setattr(llm.runner, "execute_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([ids(p) for p in PROMPTS[:3]], GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert_idle(llm)
    assert token_ids(llm.generate([ids(p) for p in PROMPTS[:3]], GREEDY, use_tqdm=False)) == reference[:3]


def test_five_hundred_mixed_requests_under_a_tight_kv_budget(make_llm):
    engine = make_llm(max_num_seqs=4)
    rng = np.random.default_rng(42)
    prompts, params = [], []
    for i in range(500):
        head = SHARED[:rng.integers(0, 33)] if rng.random() < 0.5 else []
        prompts.append(ids(head + rng.integers(3, 94, size=rng.integers(1, 12)).tolist()))
        max_tokens = int(rng.integers(1, 11))
        if rng.random() < 0.5:
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens))
        else:
            params.append(SamplingParams(temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.integers(1, 60)),
                                         max_tokens=max_tokens,
                                         seed=int(rng.integers(0, 1000)) if rng.random() < 0.5 else None))
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    stats = engine.scheduler.stats
    leaked = engine.runner.num_blocks - engine.scheduler.pool.num_free_blocks
    print(f"500 requests: {stats.num_steps} steps, {stats.num_preemptions} preemptions, "
          f"{stats.num_cached_prompt_tokens}/{stats.num_prompt_tokens} prompt tokens from the cache, "
          f"{leaked} blocks leaked, {elapsed:.1f}s")
    assert len(outs) == 500
    for out, p in zip(outs, params):
        c = out.outputs[0]
        assert c.finish_reason in ("length", "stop")
        assert 1 <= len(c.token_ids) <= p.max_tokens
        assert c.finish_reason == "stop" or len(c.token_ids) == p.max_tokens
        assert all(0 <= t < VOCAB for t in c.token_ids)
    assert stats.num_preemptions > 0
    assert leaked == 0
    assert_idle(engine)
