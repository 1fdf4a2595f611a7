"""Scheduler alone: chunked prefill, prefix caching and preemption, with no model.

The tests play the engine's part: `schedule()`, then a fake sampler whose token depends
only on (request, output index), then `update()`. Alongside, they keep a model of the KV
cache, slot by slot: every computed position records the whole token prefix its KV
belongs to, so a request that starts after cached tokens (or reads blocks shared with
another request) is checked to read exactly the KV of its own prefix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runner.engine.engine import update
from runner.device.model_runner import SequenceResult
from runner.sampling_params import SamplingParams
from runner.engine.scheduler import Scheduler, SchedulerOutput
from state.config import CacheConfig, ModelConfig, RunnerConfig, SchedulerConfig
from state.request import Request, RequestStatus

EOS = 0
# The scheduler reads no weights; any valid architecture record will do.
MODEL = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=32, hidden_size=8, intermediate_size=8,
                    num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                    max_position_embeddings=64)
# Prompts are prefixes of a few sequences sharing their heads, so the prefix cache hits.
BASES = [[5, 6, 7, 8, 9, 10, 11, 12] * 4, [5, 6, 7, 8, 1, 2, 3, 4] * 4, [3, 3, 3, 3] * 8]


def fake_token(request: Request) -> int:
    """The token 'sampled' for a request's next output: a function of (id, index) only, as
    seeded sampling is, so a preempted request regenerates nothing it already has."""
    rng = random.Random(f"{request.request_id}/{len(request.output_token_ids)}")
    return EOS if rng.random() < 0.1 else rng.randrange(1, 16)


def results(sampled: dict[str, int]) -> dict[str, SequenceResult]:
    """Step results that sample `sampled[request id]` (log-probability 0) and compute only
    the others."""
    return _Results({rid: SequenceResult(token_ids=(t,), logprobs=(0.0,)) for rid, t in sampled.items()})


class _Results(dict):
    def __missing__(self, request_id: str) -> SequenceResult:
        return SequenceResult()


def make_scheduler(*, block_size: int, num_blocks: int, max_model_len: int, max_num_seqs: int,
                   max_num_batched_tokens: int, chunked: bool = True, caching: bool = True,
                   model: ModelConfig = MODEL) -> Scheduler:
    config = RunnerConfig(
        model_config=model,
        cache_config=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                 enable_prefix_caching=caching),
        scheduler_config=SchedulerConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                         max_num_batched_tokens=max_num_batched_tokens,
                                         enable_chunked_prefill=chunked))
    return Scheduler(config, num_blocks)


def make_request(rid: int, prompt: list[int], **params) -> Request:
    return Request(str(rid), list(prompt), SamplingParams(temperature=0, **params), seed=rid,
                   eos_token_ids=(EOS,))


@dataclass
class Trace:
    steps: int = 0
    preemptions: int = 0
    max_tokens_in_step: int = 0


def drive(sched: Scheduler, arrivals: list[tuple[int, Request]], max_steps: int = 5000,
          note=lambda what: None) -> Trace:
    """Run the scheduler to completion, checking every step; returns what happened.
    `note` receives coverage events (hypothesis.event inside a property test)."""
    bs, budget = sched.block_size, sched.max_num_batched_tokens
    pending = sorted(arrivals, key=lambda a: a[0])
    requests = [r for _, r in pending]
    kv: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, slot) -> prefix whose KV is there
    progress: dict[str, int] = {}  # request -> end of its last computed chunk
    preempted_seen: dict[str, int] = {}
    trace = Trace()
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= step:
            sched.add_request(pending.pop(0)[1])
        out: SchedulerOutput = sched.schedule()
        step += 1
        assert step <= max_steps, "requests never finish: the scheduler livelocked"

        # -- limits of one step ------------------------------------------------------------
        assert out.num_tokens <= budget
        assert len(out.scheduled) <= sched.max_num_seqs
        assert len(sched.running) <= sched.max_num_seqs
        ids = [s.request.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
        if sched.running and not sched.waiting:
            assert out.scheduled, "runnable requests but an empty step"
        trace.max_tokens_in_step = max(trace.max_tokens_in_step, out.num_tokens)

        for k, s in enumerate(out.scheduled):
            r = s.request
            assert r.status is RequestStatus.RUNNING and r in sched.running
            assert s.num_tokens >= 1 and s.end <= r.num_tokens
            assert s.start == r.num_computed_tokens
            assert len(r.block_ids) >= -(-s.end // bs), "scheduled without the blocks to hold it"
            resumed = r.num_preemptions != preempted_seen.get(r.request_id, 0)
            if r.request_id in progress and not resumed:
                assert s.start == progress[r.request_id], "positions must be contiguous"
            else:  # (re)admission: starts after whole cached blocks, never at the end
                assert s.start % bs == 0 and s.start < r.num_tokens
                if not sched.pool.enable_caching or r.sampling_params.prompt_logprobs is not None:
                    assert s.start == 0
                if not sched.chunked_prefill and r.num_tokens - s.start <= budget:
                    assert s.end == r.num_tokens, "chunked prefill is off: the prefill runs whole"
                note("admitted after a cache hit" if s.start else "admitted from scratch")
            preempted_seen[r.request_id] = r.num_preemptions
            # The KV before `start` must be this request's own prefix, wherever it came from.
            tokens = r.all_token_ids
            for p in range(s.start):
                assert kv.get((r.block_ids[p // bs], p % bs)) == tuple(tokens[:p + 1]), \
                    f"request {r.request_id} would read wrong KV at position {p}"
            for p in range(s.start, s.end):
                block = r.block_ids[p // bs]
                # Only requests scheduled later in this step, starting after the block, may
                # share it: the forward writes the whole block before they read it.
                readers = [o for o in out.scheduled[k + 1:] if block in o.request.block_ids[:o.start // bs]]
                assert sched.pool.ref_counts[block] == 1 + len(readers), \
                    "writing into a block another request reads"
                if readers:
                    assert s.end >= (p // bs + 1) * bs, "a block shared before this step fills it"
                    note("a block shared within its step")
                kv[(block, p % bs)] = tuple(tokens[:p + 1])
            progress[r.request_id] = s.end

        sampled = {s.request.request_id: fake_token(s.request) for s in out.scheduled if s.samples}
        finished = update(sched, out, results(sampled))

        # -- after the step ----------------------------------------------------------------
        sched.pool.check_invariants([r.block_ids for r in sched.running])
        assert all(not r.block_ids for r in sched.waiting), "a waiting request holds blocks"
        for r in finished:
            assert r.is_finished and not r.block_ids and r not in sched.running
        for r in sched.running:
            assert len(r.block_ids) >= -(-r.num_computed_tokens // bs)
    trace.steps = step
    trace.preemptions = sched.stats.num_preemptions

    # -- every request finished, correctly, and gave its blocks back -----------------------------
    assert sched.pool.num_free_blocks == sched.pool.num_blocks
    sched.pool.check_invariants([])
    for r in requests:
        p = r.sampling_params
        out_ids = r.output_token_ids
        assert r.is_finished and r.block_ids == []
        assert 1 <= len(out_ids) <= p.max_tokens
        expected = []
        probe = Request(r.request_id, r.prompt_token_ids, p, r.seed)
        for _ in out_ids:
            expected.append(fake_token(probe))
            probe.output_token_ids.append(expected[-1])
        assert out_ids == expected, "outputs lost or duplicated across preemption"
        stopped_early = [i for i, t in enumerate(out_ids) if t == EOS and not p.ignore_eos
                         and i + 1 >= p.min_tokens]
        if stopped_early:
            assert len(out_ids) == stopped_early[0] + 1 and r.finish_reason == "stop"
        else:
            assert r.finish_reason == "length"
            assert len(out_ids) == p.max_tokens or r.num_tokens == sched.max_model_len
    return trace


@st.composite
def workloads(draw):
    """(scheduler settings, [(arrival step, prompt, sampling params)]): plain values, so a
    failing example prints readably."""
    block_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(6, 32))
    per_seq = -(-max_model_len // block_size)
    max_num_seqs = draw(st.integers(1, 4))
    settings_ = dict(
        block_size=block_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        num_blocks=draw(st.integers(per_seq, per_seq + 8)),  # tight: preemption is common
        max_num_batched_tokens=draw(st.integers(max_num_seqs, max_num_seqs + 12)),
        chunked=draw(st.booleans()), caching=draw(st.sampled_from([True, True, False])))
    arrivals = []
    for _ in range(draw(st.integers(1, 8))):
        prompt = draw(st.sampled_from(BASES))[:draw(st.integers(1, max_model_len - 1))]
        max_tokens = draw(st.integers(1, 12))
        params = dict(max_tokens=max_tokens, min_tokens=draw(st.integers(0, max_tokens)),
                      ignore_eos=draw(st.booleans()),
                      prompt_logprobs=draw(st.sampled_from([None, None, None, 0])))
        # Copies arriving together (n samples, equal prompts) share blocks within a step.
        arrivals += [(draw(st.integers(0, 6)), prompt, params)] * draw(st.sampled_from([1, 1, 1, 2, 3]))
    return settings_, arrivals


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_respect_every_invariant(workload):
    settings_, arrivals = workload
    sched = make_scheduler(**settings_)
    trace = drive(sched, [(t, make_request(i, prompt, **params))
                          for i, (t, prompt, params) in enumerate(arrivals)], note=event)
    if trace.preemptions:
        event("preempted")
    if trace.max_tokens_in_step == sched.max_num_batched_tokens:
        event("a step used the whole token budget")


# -- directed cases ------------------------------------------------------------------------


def test_long_prompt_is_chunked_to_the_budget():
    sched = make_scheduler(block_size=4, num_blocks=16, max_model_len=64, max_num_seqs=2,
                           max_num_batched_tokens=8)
    r = make_request(0, list(range(1, 21)), max_tokens=2, ignore_eos=True)
    sched.add_request(r)
    chunks = []
    while sched.has_unfinished():
        out = sched.schedule()
        chunks.append([(s.start, s.num_tokens) for s in out.scheduled])
        update(sched, out, results({s.request.request_id: 7 for s in out.scheduled if s.samples}))
    assert chunks == [[(0, 8)], [(8, 8)], [(16, 4)], [(20, 1)]]


def test_chunked_prefill_off_runs_a_prompt_whole_or_waits():
    sched = make_scheduler(block_size=4, num_blocks=16, max_model_len=64, max_num_seqs=2,
                           max_num_batched_tokens=12, chunked=False)
    a = make_request(0, [1] * 4, max_tokens=3, ignore_eos=True)
    b = make_request(1, [2] * 12, max_tokens=1, ignore_eos=True)
    sched.add_request(a)
    out = sched.schedule()
    update(sched, out, results({"0": 3}))
    sched.add_request(b)
    out = sched.schedule()  # a decodes (1 token): the 11 left do not fit b's 12
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("0", 1)]
    update(sched, out, results({"0": 3}))
    out = sched.schedule()  # a's last decode; b still waits rather than run 11 of 12
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("0", 1)]
    update(sched, out, results({"0": 3}))
    assert a.is_finished
    out = sched.schedule()
    assert [(s.request.request_id, s.start, s.num_tokens) for s in out.scheduled] == [("1", 0, 12)]


def test_prefix_cache_hit_skips_whole_blocks_only():
    sched = make_scheduler(block_size=4, num_blocks=16, max_model_len=64, max_num_seqs=2,
                           max_num_batched_tokens=64)
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks
    trace = drive(sched, [(0, make_request(0, prompt, max_tokens=2, ignore_eos=True)),
                          (5, make_request(1, prompt + [9, 9], max_tokens=2, ignore_eos=True)),
                          (9, make_request(2, prompt[:12], max_tokens=2, ignore_eos=True))])
    assert trace.preemptions == 0
    # Request 1 reuses 3 blocks (12 tokens); request 2's whole prompt is cached, but one
    # token must run to produce logits, so its last block is recomputed: 8 reused.
    assert sched.stats.num_cached_prompt_tokens == 12 + 8
    assert sched.stats.num_prompt_tokens == 14 + 16 + 12


def test_preemption_evicts_the_latest_and_resumes_it_first():
    sched = make_scheduler(block_size=2, num_blocks=6, max_model_len=12, max_num_seqs=3,
                           max_num_batched_tokens=16, caching=False)
    # Three run at once (max_num_seqs); the fourth waits in the queue all along.
    reqs = [make_request(i, [i + 1] * 3, max_tokens=8, ignore_eos=True) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    first_victim = None
    while sched.has_unfinished():
        out = sched.schedule()
        if sched.stats.num_preemptions and first_victim is None:
            first_victim = next(r for r in reqs if r.num_preemptions)
            # The most recently admitted was preempted, and it resumes before the fresh one.
            assert first_victim is reqs[2]
            assert sched.waiting[0] is reqs[2] and reqs[3] in sched.waiting
        update(sched, out, results({s.request.request_id: 5 for s in out.scheduled if s.samples}))
    assert first_victim is not None
    assert all(len(r.output_token_ids) == 8 for r in reqs)
    sched.pool.check_invariants([])


def test_preempted_request_longer_than_the_budget_resumes_without_chunked_prefill():
    """With chunked prefill off, a preempted request must recompute prompt plus outputs,
    which can exceed a step's token budget even though its prompt alone fitted."""
    sched = make_scheduler(block_size=2, num_blocks=8, max_model_len=16, max_num_seqs=2,
                           max_num_batched_tokens=6, chunked=False, caching=False)
    trace = drive(sched, [(0, make_request(0, [1] * 5, max_tokens=10, ignore_eos=True)),
                          (0, make_request(1, [2] * 5, max_tokens=10, ignore_eos=True))], max_steps=200)
    assert trace.preemptions > 0


def test_request_that_cannot_fit_the_whole_pool_is_refused():
    sched = make_scheduler(block_size=4, num_blocks=3, max_model_len=64, max_num_seqs=2,
                           max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add_request(make_request(0, [1] * 10, max_tokens=8))
    assert not sched.has_unfinished()
    # 10 prompt tokens + 3 outputs: the KV of 12 positions fits 3 blocks of 4.
    drive(sched, [(0, make_request(1, [1] * 10, max_tokens=3, ignore_eos=True))], max_steps=50)


def test_a_step_that_can_schedule_nothing_is_refused_clearly():
    """Blocks lost outside the scheduler (here: held by nobody it knows) leave requests that
    fit the pool alone unschedulable: a clear error, not a loop of empty steps."""
    sched = make_scheduler(block_size=4, num_blocks=4, max_model_len=16, max_num_seqs=2,
                           max_num_batched_tokens=16)
    sched.add_request(make_request(0, [1] * 10, max_tokens=3, ignore_eos=True))
    sched.pool.allocate(2)  # leaked
    with pytest.raises(RuntimeError, match=r"no request could be scheduled: 0 running, 1 waiting, "
                                           r"2 of 4 KV blocks free"):
        sched.schedule()


def test_abort_all_returns_every_block():
    sched = make_scheduler(block_size=2, num_blocks=8, max_model_len=16, max_num_seqs=2,
                           max_num_batched_tokens=4)
    reqs = [make_request(i, [i + 1] * 6, max_tokens=4) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    update(sched, out, results({s.request.request_id: 5 for s in out.scheduled if s.samples}))
    assert sched.running and sched.waiting
    sched.abort_all()
    assert not sched.has_unfinished()
    assert all(r.finish_reason == "abort" and not r.block_ids for r in reqs)
    assert sched.pool.num_free_blocks == 8
    sched.pool.check_invariants([])


def test_samples_flag_is_fixed_when_the_step_is_scheduled():
    """After `update` appends the sampled token, a step that sampled must still say so:
    the engine reads it afterwards (stop strings are checked on the steps that sampled)."""
    sched = make_scheduler(block_size=4, num_blocks=8, max_model_len=32, max_num_seqs=2,
                           max_num_batched_tokens=4)
    r = make_request(0, [1] * 6, max_tokens=3, ignore_eos=True)
    sched.add_request(r)
    flags = []
    while sched.has_unfinished():
        out = sched.schedule()
        update(sched, out, results({s.request.request_id: 7 for s in out.scheduled if s.samples}))
        flags += [s.samples for s in out.scheduled]
    assert flags == [False, True, True, True]  # chunk 0..3, chunk 4..5 samples, two decodes


@pytest.mark.parametrize("max_num_seqs, expected_steps", [(3, 1), (2, 4)])
def test_the_full_batch_cap_applies_once_every_slot_is_taken(max_num_seqs, expected_steps):
    # A streaming front end caps calls at `step_cap` while an arrival could join the next
    # call, and at `full_step_cap` once every sequence slot is taken.
    config = RunnerConfig(model_config=MODEL, cache_config=CacheConfig(block_size=4, num_blocks=32),
                          scheduler_config=SchedulerConfig(max_model_len=64, max_num_seqs=max_num_seqs,
                                                           max_num_batched_tokens=32, decode_steps=8))
    sched = Scheduler(config, 32)
    sched.step_cap, sched.full_step_cap = 1, 4
    for rid in range(2):
        sched.add_request(make_request(rid, [5, 6, 7], max_tokens=20, ignore_eos=True))
    prefill = sched.schedule()
    assert not prefill.is_decode
    update(sched, prefill, results({s.request.request_id: 7 for s in prefill.scheduled if s.samples}))
    decode = sched.schedule()
    assert decode.is_decode and decode.num_steps == expected_steps
