"""`AsyncLLM` against the offline `LLM` on the same settings: concurrent callers get what
`generate` gives, streams add up, aborts free every block, a bad request fails only its
caller, lifecycle calls wait for the engine's turn, and the call cap bounds a stream's gaps."""

from __future__ import annotations

import asyncio

import pytest

from runner import LLM, AsyncLLM, SamplingParams
from runner.sampling_params import RequestOutputKind

SETTINGS = dict(max_model_len=128, num_kv_blocks=48, block_size=16, max_num_seqs=4)
PROMPTS = ["def add(a, b):", "class Stack:", "import os\n", "for i in range(10):", "x = [", "# sort a list\n"]


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(**SETTINGS)


@pytest.fixture(scope="module")
def engine():
    llm = AsyncLLM(**SETTINGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def tight():
    """Decode calls capped far under one step's time: every call runs one step, so a
    request of many tokens stays in flight for as many engine turns."""
    llm = AsyncLLM(**SETTINGS, max_call_seconds=1e-9, full_batch_call_seconds=1e-9)
    yield llm
    llm.shutdown()


def run(coro):
    return asyncio.run(coro)


async def collect(llm: AsyncLLM, prompt, params: SamplingParams, request_id: str | None = None) -> list:
    return [out async for out in llm.generate(prompt, params, request_id)]


def all_free(llm: AsyncLLM) -> bool:
    pool = llm._llm.scheduler.pool
    return pool.num_free_blocks == pool.num_blocks


def test_concurrent_callers_get_what_generate_gives(engine, offline):
    # More prompts than sequence slots, mixed lengths and settings: they join and leave
    # the running batch between device calls.
    params = [greedy(12), greedy(5), SamplingParams(temperature=0.8, seed=3, max_tokens=9, ignore_eos=True),
              greedy(20), SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=7, ignore_eos=True), greedy(1)]

    async def main():
        return await asyncio.gather(*[collect(engine, p, s) for p, s in zip(PROMPTS, params)])

    streams = run(main())
    expected = offline.generate(PROMPTS, params, use_tqdm=False)
    for stream, ref in zip(streams, expected):
        final = stream[-1]
        assert final.finished and all(not o.finished for o in stream[:-1])
        assert [c.token_ids for c in final.outputs] == [c.token_ids for c in ref.outputs]
        assert [c.text for c in final.outputs] == [c.text for c in ref.outputs]
        # cumulative outputs only grow
        lengths = [len(o.outputs[0].token_ids) for o in stream]
        assert lengths == sorted(lengths)
    assert all_free(engine)


def test_delta_pieces_add_up_to_the_whole_output(engine, offline):
    # A stop string that a later token completes: text it may claim is held back, so no
    # piece already sent is ever cut.
    ref = offline.generate(PROMPTS[0], greedy(24), use_tqdm=False)[0].outputs[0]
    stop = ref.text[8:11]
    params = greedy(24, stop=[stop], logprobs=1)
    expected = offline.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    delta = params.clone()
    delta.output_kind = RequestOutputKind.DELTA
    pieces = run(collect(engine, PROMPTS[0], delta))
    assert sum((p.outputs[0].token_ids for p in pieces), []) == expected.token_ids
    assert "".join(p.outputs[0].text for p in pieces) == expected.text
    assert sum((p.outputs[0].logprobs for p in pieces), []) == expected.logprobs
    assert pieces[-1].outputs[0].finish_reason == "stop" and pieces[-1].outputs[0].stop_reason == stop


def test_final_only_yields_once(engine, offline):
    params = greedy(10)
    params.output_kind = RequestOutputKind.FINAL_ONLY
    outs = run(collect(engine, PROMPTS[1], params))
    assert len(outs) == 1 and outs[0].finished
    assert outs[0].outputs[0].token_ids == offline.generate(PROMPTS[1], greedy(10), use_tqdm=False)[0].outputs[0].token_ids


def test_abort_keeps_the_tokens_so_far_and_frees_every_block(engine, offline):
    async def main():
        outs = []
        async for out in engine.generate(PROMPTS[2], greedy(100), request_id="long"):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("long")
        return outs

    outs = run(main())
    final = outs[-1].outputs[0]
    assert final.finish_reason == "abort" and 0 < len(final.token_ids) < 100
    ref = offline.generate(PROMPTS[2], greedy(100), use_tqdm=False)[0].outputs[0]
    assert final.token_ids == ref.token_ids[:len(final.token_ids)]
    assert all_free(engine)


def test_leaving_a_stream_early_aborts_its_request(engine):
    # What a server does when its client disconnects: the stream is closed (or its task
    # cancelled) before the request finished.
    async def main():
        stream = engine.generate(PROMPTS[3], greedy(100))
        async for _ in stream:
            break
        await stream.aclose()
        await engine.abort([])  # one engine turn later, the abort has run
        return all_free(engine)

    assert run(main())


def test_a_caller_cancelled_before_admission_leaves_nothing_running(engine):
    async def main():
        task = asyncio.ensure_future(collect(engine, PROMPTS[1], greedy(100)))
        await asyncio.sleep(0)  # the admission is queued, not yet run
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.abort([])
        return all_free(engine) and not engine._streams

    assert run(main())


def test_a_bad_request_fails_only_its_caller(engine, offline):
    async def main():
        return await asyncio.gather(collect(engine, PROMPTS[0], greedy(6)), collect(engine, [99999], greedy(6)),
                                    collect(engine, list(range(5, 205)), greedy(6)),
                                    collect(engine, PROMPTS[4], greedy(6)), return_exceptions=True)

    good, bad_token, too_long, also_good = run(main())
    assert isinstance(bad_token, ValueError) and "outside the vocabulary" in str(bad_token)
    assert isinstance(too_long, ValueError) and "max_model_len=128" in str(too_long)
    expected = offline.generate([PROMPTS[0], PROMPTS[4]], greedy(6), use_tqdm=False)
    assert good[-1].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert also_good[-1].outputs[0].token_ids == expected[1].outputs[0].token_ids


def test_a_request_id_in_flight_is_refused(engine):
    async def main():
        first = collect(engine, PROMPTS[0], greedy(30), "same")
        task = asyncio.ensure_future(first)
        await asyncio.sleep(0)
        await engine.abort([])  # the first is admitted by now
        with pytest.raises(ValueError, match="request_id 'same' is already in flight"):
            await collect(engine, PROMPTS[1], greedy(3), "same")
        return await task

    assert run(main())[-1].outputs[0].finish_reason == "length"


def test_lifecycle_calls_run_between_device_calls(tight, offline):
    engine = tight

    async def main():
        task = asyncio.ensure_future(collect(engine, PROMPTS[5], greedy(100)))
        await asyncio.sleep(0)
        await engine.abort([])
        with pytest.raises(RuntimeError, match="sleep: 1 request\\(s\\) in flight"):
            await engine.sleep(1)
        with pytest.raises(RuntimeError, match="sleep: 1 request\\(s\\) in flight"):
            await engine.collective_rpc("sleep")
        assert await engine.reset_prefix_cache() is False
        await task
        await engine.sleep(1)
        assert await engine.is_sleeping()
        with pytest.raises(RuntimeError, match="asleep"):
            await collect(engine, PROMPTS[0], greedy(3))
        await engine.wake_up()
        assert await engine.reset_prefix_cache() is True
        config = await engine.update_config({"scheduler_config": {"max_num_seqs": 4}})
        assert config is engine.config
        assert (await engine.collective_rpc(lambda worker: worker.scheduler.pool.num_blocks)) == [48]
        return await collect(engine, PROMPTS[0], greedy(8))

    after = run(main())
    assert after[-1].outputs[0].token_ids == offline.generate(PROMPTS[0], greedy(8), use_tqdm=False)[0].outputs[0].token_ids


def test_the_call_cap_bounds_the_tokens_between_stream_updates(tight, offline):
    # A cap far under one step's time: every decode call runs one step, so a stream gets
    # each token as it is made.
    params = greedy(16)
    params.output_kind = RequestOutputKind.DELTA
    pieces = run(collect(tight, PROMPTS[0], params))
    assert [len(p.outputs[0].token_ids) for p in pieces] == [1] * 16
    assert sum((p.outputs[0].token_ids for p in pieces), []) == \
        offline.generate(PROMPTS[0], greedy(16), use_tqdm=False)[0].outputs[0].token_ids


def test_a_full_batch_streams_several_tokens_per_call(offline):
    # One-step calls while a slot is free; once all four slots are taken no arrival could
    # join, so calls run the multi-step decode and streams get tokens in bursts.
    llm = AsyncLLM(**SETTINGS, max_call_seconds=1e-9, full_batch_call_seconds=600.0)
    params = greedy(16)
    params.output_kind = RequestOutputKind.DELTA

    async def main():
        return await asyncio.gather(*(collect(llm, p, params) for p in PROMPTS[:4]))

    try:
        streams = run(main())
    finally:
        llm.shutdown()
    expected = offline.generate(PROMPTS[:4], greedy(16), use_tqdm=False)
    for pieces, ref in zip(streams, expected):
        assert sum((p.outputs[0].token_ids for p in pieces), []) == ref.outputs[0].token_ids
        assert max(len(p.outputs[0].token_ids) for p in pieces) > 1


def test_bad_construction_and_shutdown():
    with pytest.raises(ValueError, match="max_call_seconds must be a positive number"):
        AsyncLLM(max_call_seconds=0)
    with pytest.raises(ValueError, match="full_batch_call_seconds must be a positive number"):
        AsyncLLM(full_batch_call_seconds=True)
    llm = AsyncLLM(**SETTINGS)
    llm.shutdown()
    assert not llm.is_running

    async def main():
        async for _ in llm.generate(PROMPTS[0], greedy(2)):
            pass

    with pytest.raises(RuntimeError, match="shut down"):
        run(main())


def test_warmup_compiles_every_program_a_request_needs():
    from runner.device.compilation import CompileCounter

    # The smallest settings: warm-up compiles every shape they allow (tests/runner/device/test_warmup.py).
    llm = AsyncLLM(max_model_len=32, num_kv_blocks=4, block_size=16, max_num_seqs=1, max_num_batched_tokens=16,
                   decode_steps=4)
    try:
        report = run(llm.warmup())
        assert report.num_compilations > 0
        with CompileCounter() as compiles:
            out = run(collect(llm, PROMPTS[0], SamplingParams(temperature=0.7, seed=1, max_tokens=12,
                                                               ignore_eos=True, logprobs=2)))
        assert len(out[-1].outputs[0].token_ids) == 12
        assert compiles.count == 0
    finally:
        llm.shutdown()
