"""The decode loop on the device: K decode steps in one call give exactly what K = 1 gives.

Every SamplingParams feature is run with `decode_steps=1` (one step per device call) and
with the automatic step count; tokens and finish reasons must be identical, greedy tokens
equal transformers', and every block comes back to the pool.
"""

from __future__ import annotations

import random

import jax
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import LLM, SamplingParams
from runner.engine import engine as engine_module
from runner.device.compilation import CompileCounter
from models.decode_loop import DecodeState, RowSettings, multi_step_decode
from runner.device.model_runner import SequenceResult
from runner.device.prepare import multi_step_block_tables, prepare_rows, prepare_state
from runner.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from runner.formats.tokenizer import Tokenizer
from state.config import CacheConfig, ModelConfig, RunnerConfig, SchedulerConfig
from state.request import Request

BLOCK = 4
MAX_LEN = 64
EOS = 2  # the checkpoint's eos_token_id
_rng = np.random.default_rng(7)
PROMPTS = [_rng.integers(3, 94, size=n).tolist() for n in (5, 11, 3, 17, 8, 1)]


# Engines of this module differ only in the overrides each test passes.
DEFAULTS = dict(num_kv_blocks=96, block_size=BLOCK, max_model_len=MAX_LEN, max_num_seqs=8,
                max_num_batched_tokens=64)


def ids(prompt: list[int]) -> dict:
    return {"prompt_token_ids": prompt}


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint):
    """(folder, the transformers model saved there)."""
    return hf_checkpoint("qwen3_tied")


@pytest.fixture(scope="module")
def make_llm(checkpoint):
    return lambda **kwargs: LLM(str(checkpoint[0]), tokenizer=Tokenizer.byte_level(), **{**DEFAULTS, **kwargs})


@pytest.fixture(scope="module")
def one_step(make_llm):
    return make_llm(decode_steps=1)


@pytest.fixture(scope="module")
def auto(make_llm):
    return make_llm()


def assert_idle(llm: LLM) -> None:
    sched = llm.scheduler
    assert not sched.has_unfinished()
    assert sched.pool.num_free_blocks == llm.runner.num_blocks
    sched.pool.check_invariants([])


def completions(llm: LLM, prompts: list[list[int]], params) -> list[list[tuple]]:
    """Per prompt, per completion: (tokens, finish reason, stop reason, text, logprob keys,
    prompt logprob keys)."""
    outs = llm.generate([ids(p) for p in prompts], params, use_tqdm=False)
    assert_idle(llm)
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text,
              [sorted(d) for d in c.logprobs] if c.logprobs else None,
              [sorted(d) if d else d for d in o.prompt_logprobs] if o.prompt_logprobs else None)
             for c in o.outputs] for o in outs]


def step_counts(llm: LLM, monkeypatch) -> list[int]:
    """Record the decode steps per call of every step `llm` schedules from now on."""
    seen, real = [], llm.scheduler.schedule

    def spy():
        out = real()
        seen.append(out.num_steps)
        return out

    monkeypatch.setattr(llm.scheduler, "schedule", spy)
    return seen


FEATURES = {
    "greedy": SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    "seeded top-k top-p min-p": SamplingParams(temperature=0.9, top_k=7, top_p=0.8, min_p=0.05, seed=11,
                                                max_tokens=20, ignore_eos=True),
    "seeded plain": SamplingParams(temperature=1.3, seed=5, max_tokens=20, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.7, seed=2, repetition_penalty=1.4, presence_penalty=0.6,
                                frequency_penalty=0.3, max_tokens=20, ignore_eos=True),
    "logit_bias": SamplingParams(temperature=0, logit_bias={17: 3.0, 40: 2.5, 3: -100.0}, max_tokens=20,
                                 ignore_eos=True),
    "min_tokens with stop ids": SamplingParams(temperature=1.0, seed=9, min_tokens=6,
                                               stop_token_ids=[10, 20, 30, 40, 50, 60, 70], max_tokens=20),
    "stop token ids": SamplingParams(temperature=1.0, seed=4, stop_token_ids=[5, 15, 25, 35, 45, 55],
                                     max_tokens=20, ignore_eos=True),
    "eos": SamplingParams(temperature=1.5, seed=8, max_tokens=20),
    "logprobs": SamplingParams(temperature=0.8, seed=3, logprobs=3, max_tokens=20, ignore_eos=True),
    "prompt logprobs": SamplingParams(temperature=0, prompt_logprobs=2, max_tokens=20, ignore_eos=True),
    "n > 1": SamplingParams(n=3, temperature=1.0, seed=6, max_tokens=20, ignore_eos=True),
}


@pytest.mark.parametrize("name", FEATURES)
def test_multi_step_decode_equals_one_step_per_call(name, one_step, auto, monkeypatch):
    params = FEATURES[name]
    expected = completions(one_step, PROMPTS, params)
    seen = step_counts(auto, monkeypatch)
    got = completions(auto, PROMPTS, params)
    assert got == expected
    assert max(seen) > 1  # the automatic step count did run several steps per call


def test_stop_strings_end_mid_multi_step_decode_and_drop_the_tokens_after(one_step, auto, monkeypatch):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = one_step.generate([ids(PROMPTS[1])], greedy, use_tqdm=False)[0].outputs[0]
    stop = plain.text[6:8]
    assert stop and "\ufffd" not in stop
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    expected = completions(one_step, [PROMPTS[1]], params)
    seen = step_counts(auto, monkeypatch)
    got = completions(auto, [PROMPTS[1]], params)
    assert got == expected
    (tokens, reason, stop_reason, text, _, _), = got[0]
    assert (reason, stop_reason) == ("stop", stop) and len(tokens) < 24 and stop not in text
    assert max(seen) > len(tokens) - 1  # the call ran steps past the stop string


def test_greedy_multi_step_decodes_equal_transformers(auto, checkpoint):
    model = checkpoint[1]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outs = auto.generate([ids(p) for p in PROMPTS], params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30,
                                pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == hf


def test_requests_finishing_mid_multi_step_decode_and_arriving_late_equal_each_alone(make_llm, one_step, auto):
    """Different max_tokens end requests at every step of a call; then requests arrive
    (a second call on the same engine state) while earlier ones still decode, through the
    engine's own add/step interface."""
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=m, ignore_eos=True)
              for i, m in enumerate((3, 17, 9, 30, 1, 22))]
    alone = [one_step.generate([ids(p)], sp, use_tqdm=False)[0].outputs[0].token_ids
             for p, sp in zip(PROMPTS, params)]
    together = auto.generate([ids(p) for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone
    engine = auto.engine
    first = [r for p, sp in zip(PROMPTS[:3], params[:3]) for r in engine.make_requests(p, sp)]
    late = [r for p, sp in zip(PROMPTS[3:], params[3:]) for r in engine.make_requests(p, sp)]
    engine.add_requests(first)
    for _ in range(3):
        engine.step()
    engine.add_requests(late)
    while engine.has_unfinished():
        engine.step()
    assert [r.output_token_ids for r in first + late] == alone
    assert_idle(auto)


def test_tight_pool_preempts_during_long_multi_step_decodes_and_equals_each_alone(make_llm, one_step, monkeypatch):
    """Six requests of up to 16 blocks each in 24 blocks: calls run fewer steps, requests are
    preempted and recomputed, and every output equals the request run alone."""
    tight = make_llm(num_kv_blocks=24)
    params = [SamplingParams(temperature=0.9, seed=20 + i, max_tokens=40, ignore_eos=True) for i in range(6)]
    alone = [one_step.generate([ids(p)], sp, use_tqdm=False)[0].outputs[0].token_ids
             for p, sp in zip(PROMPTS, params)]
    seen = step_counts(tight, monkeypatch)
    outs = tight.generate([ids(p) for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert tight.scheduler.stats.num_preemptions > 0 and max(seen) > 1
    assert_idle(tight)


def test_no_compilation_after_warmup_across_step_counts(make_llm, monkeypatch):
    # Two sequence slots for up to six requests: a waiting request cuts a call's steps to
    # end when the first running one reaches its length, so many step counts run.
    llm = make_llm(num_kv_blocks=40, max_num_seqs=2, max_num_batched_tokens=32, max_model_len=48)
    llm.warmup()
    seen = step_counts(llm, monkeypatch)
    widths, real = [], llm.runner.run_decode

    def spy(rows, state, num_steps):
        widths.append(rows.block_tables.shape[1])
        return real(rows, state, num_steps)

    monkeypatch.setattr(llm.runner, "run_decode", spy)
    rng = np.random.default_rng(1)
    with CompileCounter() as compiles:
        for round_ in range(4):
            n = int(rng.integers(3, 7))
            prompts = [ids(rng.integers(3, 94, int(rng.integers(1, 20))).tolist()) for _ in range(n)]
            params = [SamplingParams(temperature=float(rng.choice([0, 0.8])), seed=round_, top_k=int(rng.choice([0, 5])),
                                     max_tokens=int(rng.integers(1, 28)), logprobs=rng.choice([None, 2]),
                                     repetition_penalty=float(rng.choice([1.0, 1.2])),
                                     min_tokens=int(rng.integers(0, 3)), stop_token_ids=[7])
                      for _ in range(n)]
            llm.generate(prompts, params, use_tqdm=False)
    assert compiles.count == 0
    assert len(set(seen)) >= 3, seen  # several step counts ran on the same programs
    # Block-table widths are powers of two up to the 12 blocks of a 48-token request, and
    # never the 16 of the next power of two.
    assert set(widths) <= {1, 2, 4, 8, 12} and 12 in widths, sorted(set(widths))


def test_multi_step_decode_is_callable_from_user_jit(auto, checkpoint):
    """The pure loop under the caller's own jax.jit: one-token prompts decoded from an empty
    cache give transformers' greedy tokens."""
    runner = auto.runner
    state_ = runner.state
    cfg = state_.config.model_config.for_compile()
    prompts = [[17], [60], [33]]
    requests = [Request(str(i), p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), seed=0)
                for i, p in enumerate(prompts)]
    for i, r in enumerate(requests):
        r.block_ids = list(range(4 * i, 4 * i + 4))  # 16 slots: room for all 12 steps
    out = SchedulerOutput([ScheduledRequest(r, 0, 1) for r in requests])
    V = cfg.vocab_size
    tables = multi_step_block_tables(out)
    rows = prepare_rows(out, tables.shape[0], V, 64, MAX_LEN, tables)
    state = prepare_state(out, tables.shape[0], V, 64)

    @jax.jit
    def generate(params, kv_cache, rows: RowSettings, state: DecodeState):
        return multi_step_decode(params, kv_cache, rows, state, 12, cfg, max_steps=12, block_size=BLOCK)

    kv_cache = jax.tree.map(lambda x: x.copy(), state_.kv_cache)
    _, final, decoded = generate(state_.params, kv_cache, rows, state)
    model = checkpoint[1]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            hf = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12, pad_token_id=0,
                                eos_token_id=None)[0, 1:].tolist()
        assert np.asarray(decoded.token_ids[i]).tolist() == hf
    assert np.asarray(final.is_done)[:3].all() and np.asarray(decoded.num_tokens)[:3].tolist() == [12] * 3


# -- the block pool around multi-step decodes cut short (scheduler only, fake tokens) ---------

MODEL = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=32, hidden_size=8, intermediate_size=8,
                    num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                    max_position_embeddings=64)


def fake_multi_step(out: SchedulerOutput) -> dict[str, SequenceResult]:
    """Tokens as a multi-step decode would produce them: a function of (request, output index), each
    row stopping early at token 0 (its EOS) or at its output limit."""
    results = {}
    for s in out.scheduled:
        r = s.request
        if not s.samples:
            results[r.request_id] = SequenceResult()
            continue
        steps = out.num_steps if s.num_tokens == 1 else 1
        tokens, n = [], len(r.output_token_ids)
        limit = min(r.sampling_params.max_tokens, 48 - len(r.prompt_token_ids))
        for _ in range(steps):
            t = random.Random(f"{r.request_id}/{n}").randrange(0, 12)
            tokens.append(t)
            n += 1
            if t == 0 or n >= limit:
                break
        results[r.request_id] = SequenceResult(token_ids=tuple(tokens), logprobs=(0.0,) * len(tokens))
    return results


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 30)), min_size=1, max_size=8),
       st.integers(10, 30), st.sampled_from([0, 3, 8]), st.integers(1, 4))
def test_multi_step_decodes_cut_short_leak_no_block(requests, num_blocks, decode_steps, max_seqs):
    config = RunnerConfig(
        model_config=MODEL,
        cache_config=CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(max_model_len=48, max_num_seqs=max_seqs,
                                         max_num_batched_tokens=16, decode_steps=decode_steps))
    sched = Scheduler(config, num_blocks)
    live = []
    for i, (prompt_len, max_tokens) in enumerate(requests):
        r = Request(str(i), [3 + (i + j) % 9 for j in range(prompt_len)],
                    SamplingParams(temperature=0, max_tokens=max_tokens), seed=0, eos_token_ids=(0,))
        try:
            sched.add_request(r)
        except ValueError:
            continue  # too long for this pool alone: refused up front
        live.append(r)
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        # Every decode's slots for all the call's steps are reserved before the call.
        for s in out.scheduled:
            if s.num_tokens == 1:
                need = s.start + sched.decode_step_tokens(s.request, out.num_steps)
                assert len(s.request.block_ids) * 4 >= need
        engine_module.update(sched, out, fake_multi_step(out))
        sched.pool.check_invariants([r.block_ids for r in sched.running])
    assert not sched.has_unfinished()
    assert sched.pool.num_free_blocks == num_blocks
    for r in live:
        n = len(r.output_token_ids)
        assert r.finish_reason == ("stop" if r.output_token_ids[-1] == 0 else "length")
        assert n <= r.sampling_params.max_tokens and 0 not in r.output_token_ids[:-1]
