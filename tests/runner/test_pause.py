"""`AsyncLLM.pause_generation` / `resume_generation`: each mode against the offline `LLM`
on the same settings, with a weight update between the two."""

from __future__ import annotations

import asyncio

import jax
import numpy as np
import pytest

from runner import LLM, AsyncLLM, SamplingParams
from state.params import leaf_paths

SETTINGS = dict(max_model_len=128, num_kv_blocks=48, block_size=16, max_num_seqs=4)
PROMPT = "def add(a, b):"
NEW_VERSION = 7


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def old() -> LLM:
    return LLM(**SETTINGS)


@pytest.fixture(scope="module")
def new_params(old: LLM):
    """The served weights, each floating leaf moved by noise: other greedy outputs."""
    leaves, tree = jax.tree.flatten(old.runner.state.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    moved = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) * jax.numpy.std(x)
             if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, [np.asarray(x) for x in moved])


@pytest.fixture(scope="module")
def new(new_params) -> LLM:
    llm = LLM(**SETTINGS)
    llm.reload_weights(params=new_params)
    return llm


@pytest.fixture
def engine():
    """One step per device call (a call cap far under a step's time): a long request
    stays in flight for many engine turns, so a pause lands mid-generation."""
    llm = AsyncLLM(**SETTINGS, max_call_seconds=1e-9, full_batch_call_seconds=1e-9)
    yield llm
    llm.shutdown()


def all_free(llm: AsyncLLM) -> bool:
    pool = llm._llm.scheduler.pool
    return pool.num_free_blocks == pool.num_blocks


async def pause_after(llm: AsyncLLM, params: SamplingParams, num_tokens: int, mode: str,
                      between, clear_cache: bool = False):
    """Stream one request; once it has `num_tokens` tokens, pause in `mode`, await
    `between()`, resume. Returns the request's last output."""
    last = None
    async for out in llm.generate(PROMPT, params, request_id="r"):
        last = out
        if len(out.outputs[0].token_ids) >= num_tokens and not await llm.is_paused() and between:
            await llm.pause_generation(mode=mode, clear_cache=clear_cache)
            await between()
            between = None
            await llm.resume_generation()
    return last


def test_keep_with_clear_cache_continues_as_a_fresh_request_on_the_new_weights(engine, old, new, new_params):
    params = greedy(30)
    out = asyncio.run(pause_after(engine, params, 6, "keep", clear_cache=True,
                                  between=lambda: engine.reload_weights(params=new_params, version=NEW_VERSION)))
    c = out.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 30
    (start, v0), (split, v1) = c.weight_versions
    assert (start, v0, v1) == (0, 0, NEW_VERSION) and 6 <= split < 30
    before = old.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
    assert c.token_ids[:split] == before[:split]
    fresh = new.generate({"prompt_token_ids": out.prompt_token_ids + c.token_ids[:split]},
                         greedy(30 - split), use_tqdm=False)[0].outputs[0].token_ids
    assert c.token_ids[split:] == fresh
    assert c.token_ids[split:] != before[split:]  # the update did change what is generated
    assert all_free(engine)


def test_keep_without_clear_cache_keeps_the_old_kv_and_records_both_versions(engine, old):
    async def update() -> None:
        # A streamed update of every leaf, from the served weights themselves: the
        # version changes, the values do not, so the tokens must equal the old ones.
        tree = old.runner.state.params
        bucket = [(path, np.asarray(x)) for path, x in zip(leaf_paths(tree), jax.tree.leaves(tree))]
        await engine.update_weights([bucket], version=NEW_VERSION, is_checkpoint_format=False)

    out = asyncio.run(pause_after(engine, greedy(20), 5, "keep", between=update))
    c = out.outputs[0]
    assert [v for _, v in c.weight_versions] == [0, NEW_VERSION] and c.weight_versions[1][0] >= 5
    assert c.token_ids == old.generate(PROMPT, greedy(20), use_tqdm=False)[0].outputs[0].token_ids
    assert all_free(engine)


def test_abort_ends_in_flight_requests_and_holds_new_ones_until_resume(engine, old):
    held: list[asyncio.Task] = []

    async def submit_one() -> None:  # while paused
        held.append(asyncio.ensure_future(_collect(engine, "class Stack:", greedy(8))))
        await asyncio.sleep(0.2)
        assert not held[0].done()  # nothing is generated while paused

    async def main():
        return await pause_after(engine, greedy(60), 3, "abort", between=submit_one), await held[0]

    aborted, later = asyncio.run(main())
    c = aborted.outputs[0]
    assert c.finish_reason == "abort" and 3 <= len(c.token_ids) < 60
    assert c.token_ids == old.generate(PROMPT, greedy(60), use_tqdm=False)[0].outputs[0].token_ids[:len(c.token_ids)]
    assert later.outputs[0].token_ids == old.generate("class Stack:", greedy(8), use_tqdm=False)[0].outputs[0].token_ids
    assert all_free(engine)


async def _collect(llm: AsyncLLM, prompt: str, params: SamplingParams):
    last = None
    async for out in llm.generate(prompt, params):
        last = out
    return last


def test_wait_returns_once_in_flight_requests_have_finished(engine, old):
    async def main():
        outputs = []

        async def consume() -> None:
            async for out in engine.generate(PROMPT, greedy(25), request_id="w"):
                outputs.append(out)

        task = asyncio.ensure_future(consume())
        while not outputs:
            await asyncio.sleep(0.01)
        await engine.pause_generation(mode="wait")
        finished_at_return = bool(outputs) and outputs[-1].finished
        await task
        held = asyncio.ensure_future(_collect(engine, "class Stack:", greedy(4)))
        await asyncio.sleep(0.2)
        was_held = not held.done()
        await engine.resume_generation()
        return outputs[-1], finished_at_return or outputs[-1].finished, was_held, await held

    last, finished, was_held, later = asyncio.run(main())
    assert finished and last.outputs[0].finish_reason == "length" and len(last.outputs[0].token_ids) == 25
    assert was_held and len(later.outputs[0].token_ids) == 4
    assert all_free(engine)


def test_sleep_while_frozen_recomputes_the_kv_at_the_resume(engine, old):
    async def sleep_and_wake() -> None:
        await engine.sleep(1)
        assert all_free(engine)  # the frozen request gave its blocks up
        await engine.wake_up()

    out = asyncio.run(pause_after(engine, greedy(20), 5, "keep", between=sleep_and_wake))
    assert out.outputs[0].token_ids == old.generate(PROMPT, greedy(20), use_tqdm=False)[0].outputs[0].token_ids
    assert all_free(engine)


def test_refusals_name_what_was_wrong(engine, new_params):
    async def main():
        with pytest.raises(ValueError, match="mode must be one of abort, wait, keep, got 'stop'"):
            await engine.pause_generation(mode="stop")
        with pytest.raises(ValueError, match="clear_cache must be a bool"):
            await engine.pause_generation(mode="keep", clear_cache="yes")
        stream = engine.generate(PROMPT, greedy(110))
        await anext(stream)  # in flight now, for about a hundred more engine turns
        with pytest.raises(RuntimeError, match=r"reload_weights: 1 request\(s\) in flight; "
                                               r"pause_generation\(mode='keep'\) first"):
            await engine.reload_weights(params=new_params)
        await engine.pause_generation(mode="keep")
        with pytest.raises(RuntimeError, match="update_config: 1 request"):
            await engine.update_config({"scheduler_config": {"max_num_seqs": 2}})
        await engine.resume_generation()
        assert not await engine.is_paused()
        return [out async for out in stream][-1]

    out = asyncio.run(main())
    assert len(out.outputs[0].token_ids) == 110 and out.outputs[0].weight_versions == [(0, 0)]
    assert all_free(engine)
