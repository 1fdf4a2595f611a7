"""Weight sync for training loops on tiny random checkpoints: streamed `update_weights`
(bucket orders and sizes, refusals, a stop half-way, peak memory), donated trees, weight
versions in outputs and in the prefix cache, and the async engine's mirror."""

from __future__ import annotations

import asyncio
import gc
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from runner import LLM, AsyncLLM, SamplingParams
from runner.device import weight_sync
from runner.formats.param_tree import CheckpointError
from state.params import leaf_paths, param_bytes

LLM_ARGS = dict(num_kv_blocks=32, block_size=4, max_model_len=64)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
PROMPTS = [{"prompt_token_ids": [5, 17, 42, 8, 91, 33]}, {"prompt_token_ids": [9, 9, 4]}]


def run(llm: LLM, prompts=PROMPTS) -> list[tuple[list[int], list[float]]]:
    llm.reset_prefix_cache()
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def leaves(llm: LLM) -> dict[str, np.ndarray]:
    params = llm.runner.params
    return dict(zip(leaf_paths(params), (np.asarray(x) for x in jax.tree.leaves(params))))


def live_bytes(collect: bool = True) -> int:
    """Bytes of live device arrays; without `collect`, garbage not yet collected counts too
    (an over-count: fine for an upper bound, and fast enough to take after every leaf)."""
    if collect:
        gc.collect()
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def random_buckets(pairs: list, seed: int) -> list[list]:
    """`pairs` shuffled and cut into buckets of random sizes (1 to 7 tensors)."""
    rng = random.Random(seed)
    pairs = list(pairs)
    rng.shuffle(pairs)
    buckets = []
    while pairs:
        n = rng.randint(1, 7)
        buckets.append(pairs[:n])
        pairs = pairs[n:]
    return buckets


@pytest.fixture(scope="module")
def other_tensors(other) -> dict[str, np.ndarray]:
    return load_file(other / "model.safetensors")


@pytest.fixture(scope="module")
def target(other):
    """A runner that loaded `other` whole: the weights and outputs every update must match."""
    llm = LLM(str(other), **LLM_ARGS)
    return leaves(llm), run(llm)


@pytest.fixture
def llm(tied):
    return LLM(str(tied), **LLM_ARGS)


def assert_serves(llm: LLM, target) -> None:
    weights, outputs = target
    got = leaves(llm)
    assert got.keys() == weights.keys()
    for path in weights:
        np.testing.assert_array_equal(got[path], weights[path], err_msg=path)
    assert run(llm) == outputs


# -- streamed updates ----------------------------------------------------------------------

def test_random_bucket_orders_and_sizes_equal_one_whole_tree_reload(llm, tied, other_tensors, target):
    """Checkpoint names as host arrays, then leaf paths as device arrays, each in random
    buckets: every time exactly the weights of `other` loaded whole."""
    for seed in range(3):
        llm.reload_weights(weights_path=str(tied))
        llm.update_weights(iter(random_buckets(other_tensors.items(), seed)))
        assert llm.runner.state.update_pending is None
        assert_serves(llm, target)
    llm.reload_weights(weights_path=str(tied))
    device_pairs = [(p, jax.device_put(w)) for p, w in target[0].items()]
    llm.update_weights((b for b in random_buckets(device_pairs, 7)), is_checkpoint_format=False)
    assert_serves(llm, target)
    assert all(not a.is_deleted() for _, a in device_pairs)  # copied: the caller keeps its own


BAD_BUCKETS = {
    "shape": ([("model.norm.weight", np.ones(39, np.float32))], r"bucket 0: tensor 'model.norm.weight' has shape"),
    "name": ([("model.layers.9.mlp.up_proj.weight", np.ones((72, 40), np.float32))], "bucket 0: unexpected"),
    "nan": ([("model.norm.weight", np.full(40, np.nan, np.float32))], "bucket 0: .*NaN or infinite"),
    "inf on device": ([("model.norm.weight", jnp.ones(40).at[3].set(-jnp.inf))], "bucket 0: .*NaN or infinite"),
    "twice": ([("model.norm.weight", np.ones(40, np.float32))] * 2, "bucket 0: .*appears twice"),
    "not a pair": (["model.norm.weight"], "bucket 0 item 1 is not a \\(name, array\\) pair"),
}


@pytest.mark.parametrize("case", BAD_BUCKETS)
def test_a_bucket_failing_its_checks_changes_nothing(llm, case):
    bucket, message = BAD_BUCKETS[case]
    before, outputs = leaves(llm), run(llm)
    with pytest.raises(CheckpointError, match=message):
        llm.update_weights([[("model.embed_tokens.weight", np.zeros((97, 40), np.float32))] + bucket])
    assert llm.runner.state.update_pending is None and llm.weight_version == 0
    assert leaves(llm).keys() == before.keys()
    assert all(np.array_equal(leaves(llm)[p], before[p]) for p in before)
    # The prefixes cached by the last run stay cached: nothing changed.
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].num_cached_tokens == 4
    assert run(llm) == outputs


def test_a_leaf_path_bucket_of_another_dtype_is_refused_by_name(llm):
    with pytest.raises(CheckpointError, match=r"bucket 0: leaf 'final_norm' has dtype float16; expected float32"):
        llm.update_weights([[("final_norm", np.ones(40, np.float16))]], is_checkpoint_format=False)
    assert llm.runner.state.update_pending is None


def test_a_stop_half_way_leaves_stale_weights_until_the_rest_arrives(llm, tied, other_tensors, target):
    buckets = random_buckets(other_tensors.items(), 3)
    half = len(buckets) // 2

    def trainer():
        yield from buckets[:half]
        raise ConnectionError("trainer lost")

    with pytest.raises(ConnectionError, match="trainer lost") as info:
        llm.update_weights(trainer(), version=5)
    assert "The weights are stale" in info.value.__notes__[0]
    with pytest.raises(RuntimeError, match="the weights are stale: a streamed update_weights stopped with"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.weight_version == 0
    with pytest.raises(RuntimeError, match="sleep\\(level=1\\) would keep stale weights"):
        llm.sleep(1)
    # A bad later bucket changes nothing more, and says the weights stay stale.
    with pytest.raises(CheckpointError, match="bucket 0: tensor 'model.norm.weight' has shape") as info:
        llm.update_weights([[("model.norm.weight", np.ones(3, np.float32))]])
    assert "The weights are stale" in info.value.__notes__[0]
    # A subset reload has no whole tree to borrow from: refused; the rest of the stream completes it.
    with pytest.raises(CheckpointError, match="lacks"):
        llm.reload_weights(weights_iterator=[("model.norm.weight", np.ones(40, np.float32))])
    llm.update_weights(iter(buckets[half:]), version=5)
    assert llm.weight_version == 5
    assert_serves(llm, target)


def test_a_stream_that_ends_early_is_incomplete_and_a_whole_reload_repairs_it(llm, tied, other_tensors):
    expected = run(llm)
    with pytest.raises(CheckpointError, match="ended before the update was complete.*The weights are stale"):
        llm.update_weights([[("model.norm.weight", other_tensors["model.norm.weight"])]])
    with pytest.raises(CheckpointError, match="got no tensors: nothing changed"):
        LLM(str(tied), **LLM_ARGS).update_weights(iter([]))
    llm.reload_weights(weights_path=str(tied))
    assert llm.runner.state.update_pending is None and run(llm) == expected


def test_after_a_level_2_sleep_a_streamed_update_fills_the_weights(llm, other_tensors, target):
    """No old leaves to free: the device holds only what has landed. KV scales the stream
    leaves out become 1.0, as after a whole load."""
    llm.sleep(2)
    llm.wake_up()
    buckets = random_buckets(other_tensors.items(), 5)
    with pytest.raises(ConnectionError):
        llm.update_weights(_then_fail(buckets[:2]))
    with pytest.raises(RuntimeError, match="the weights are stale"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.sleep(2)  # a stopped update can be dropped whole
    llm.wake_up()
    with pytest.raises(RuntimeError, match="woken from a level-2 sleep and hold no values"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.update_weights(iter(buckets))
    assert all(float(leaf.k_scale) == 1.0 == float(leaf.v_scale) for leaf in llm.runner.params.layers)
    assert_serves(llm, target)


def _then_fail(buckets: list):
    yield from buckets
    raise ConnectionError("trainer lost")


def test_the_streamed_update_peaks_at_weights_plus_the_largest_bucket(llm, other_tensors, monkeypatch):
    """Live device bytes, taken after every leaf lands (its old leaf still alive: the peak)
    and at every bucket the trainer hands over, stay within weights + largest bucket + 5%."""
    weights = param_bytes(llm.runner.params)
    samples: list[int] = []
    placed = weight_sync.place
    monkeypatch.setattr(weight_sync, "place", lambda *a, **k: (placed(*a, **k), samples.append(live_bytes(False)))[0])
    buckets = random_buckets(other_tensors.items(), 11)
    largest = max(sum(a.nbytes for _, a in b) for b in buckets)
    before = live_bytes()
    llm.update_weights(iter(buckets))
    print(f"\nhost buckets: weights {weights}, largest bucket {largest}, peak extra {max(samples) - before}")
    assert max(samples) - before <= largest + 0.05 * weights
    assert live_bytes() <= before

    # Donated device buckets, made one at a time by the trainer: the bucket is the only extra.
    host = leaves(llm)
    buckets = random_buckets(list(host.items()), 12)
    largest = max(sum(a.nbytes for _, a in b) for b in buckets)
    samples.clear()
    before = live_bytes()

    def trainer():
        for b in buckets:
            bucket = [(p, jax.device_put(a)) for p, a in b]
            samples.append(live_bytes(False))
            yield bucket

    llm.update_weights(trainer(), is_checkpoint_format=False, donate=True)
    print(f"donated device buckets: largest bucket {largest}, peak extra {max(samples) - before}")
    assert max(samples) - before <= largest + 0.05 * weights


# -- donation ------------------------------------------------------------------------------

def trainer_tree(llm: LLM, weights: dict[str, np.ndarray]):
    """`weights` as a JAX trainer holds them: outputs of a jitted step, on the runner's
    shardings. (On CPU an array `device_put` made from numpy borrows the numpy memory, which
    XLA cannot take over: donating that copies it once.)"""
    placed = jax.device_put(_tree_of(llm, weights), llm.param_shardings)
    return jax.jit(lambda t: jax.tree.map(lambda x: x * 1, t), out_shardings=llm.param_shardings)(placed)


def test_donation_adopts_the_callers_buffers_without_a_copy(llm, target):
    tree = trainer_tree(llm, target[0])
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]
    llm.reload_weights(params=tree, donate=True, version=42)
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(llm.runner.params)] == pointers
    assert all(x.is_deleted() for x in jax.tree.leaves(tree))
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(tree.embed)
    assert llm.weight_version == 42
    assert_serves(llm, target)


def test_donation_refuses_what_it_cannot_adopt_by_name(llm, target):
    good = lambda: trainer_tree(llm, target[0])
    before = run(llm)
    cases = [
        (lambda t: t.layers[1].__class__(**{**vars(t.layers[1]), "wk": t.layers[1].wk.astype("float16")}),
         r"donate=True: leaf 'layers.1.wk' has dtype float16; the runner serves it as float32"),
        (lambda t: t.layers[1].__class__(**{**vars(t.layers[1]), "wk": np.asarray(t.layers[1].wk)}),
         r"donate=True: leaf 'layers.1.wk' is a ndarray; donation adopts JAX arrays"),
        (lambda t: t.layers[1].__class__(**{**vars(t.layers[1]), "wk": t.layers[1].wq * 1}),
         r"donate=True: leaf 'layers.1.wk' has shape \(40, 48\); expected \(40, 24\)"),
        (lambda t: t.layers[1].__class__(**{**vars(t.layers[1]), "wv": t.layers[1].wk}),
         r"donate=True: leaf 'layers.1.wv' is the same array as leaf 'layers.1.wk'"),
        (lambda t: t.layers[1].__class__(**{**vars(t.layers[1]), "wv": t.layers[1].wv.at[2, 3].set(jnp.nan)}),
         r"donate=True: leaf 'layers.1.wv' holds NaN or infinite values"),
    ]
    for change, message in cases:
        tree = good()
        tree = tree.__class__(**{**vars(tree), "layers": (tree.layers[0], change(tree))})
        with pytest.raises(CheckpointError, match=message):
            llm.reload_weights(params=tree, donate=True)
        assert not any(x.is_deleted() for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))
    with pytest.raises(ValueError, match="donate=True adopts a whole tree: pass it as params="):
        llm.reload_weights(weights_iterator=[], donate=True)
    assert llm.weight_version == 0 and run(llm) == before


def _tree_of(llm: LLM, weights: dict[str, np.ndarray]):
    return jax.tree.unflatten(jax.tree.structure(llm.runner.params), [weights[p] for p in leaf_paths(llm.runner.params)])


# -- versions ------------------------------------------------------------------------------

def test_every_update_sets_a_version_and_outputs_carry_it(llm, tied, other_tensors):
    assert llm.weight_version == 0
    assert [o.outputs[0].weight_versions for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == [[(0, 0)]] * 2
    llm.reload_weights(weights_path=str(tied))
    assert llm.weight_version == 1
    llm.update_weights([list(other_tensors.items())], version=9)
    assert llm.weight_version == 9
    llm.reload_weights(weights_path=str(tied))
    assert llm.weight_version == 10
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="version: expected a non-negative int"):
            llm.update_weights([list(other_tensors.items())], version=bad)
    assert llm.weight_version == 10 and llm.runner.state.update_pending is None
    assert llm.collective_rpc("update_weights", args=([list(other_tensors.items())],), kwargs={"version": 3}) == [None]
    assert [o.outputs[0].weight_versions for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == [[(0, 3)]] * 2


def test_a_request_running_across_an_update_gets_two_spans_and_its_kv_is_never_reused(llm, other_tensors):
    engine = llm.engine
    prompt = [5, 17, 42, 8, 91, 33, 7, 64]  # two full blocks of 4
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    running = engine.make_requests(prompt, params)
    engine.add_requests(running)
    engine.step()  # the prompt's KV and the first token, under version 0
    assert len(running[0].output_token_ids) == 1
    engine.update_weights([list(other_tensors.items())])
    while engine.has_unfinished():
        engine.step()
    first = running[0]
    assert [s for s in first.weight_versions] == [(0, 0), (1, 1)]

    # Admitted after the update: the prompt is computed afresh (its blocks then cached under
    # version 1); a prompt extending into the first request's later blocks finds only those
    # two: the first request's third block was computed on KV of version 0.
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].weight_versions == [(0, 1)]
    longer = prompt + first.output_token_ids[:4] + [3]
    out = llm.generate([longer], params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 8



# -- the async engine ----------------------------------------------------------------------

def test_async_update_weights_waits_for_an_idle_engine(tied):
    engine = AsyncLLM(str(tied), **LLM_ARGS, max_call_seconds=1e-9, full_batch_call_seconds=1e-9)
    try:
        host = leaves(engine._llm)
        buckets = [[(p, a)] for p, a in host.items()]
        greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

        async def main():
            task = asyncio.ensure_future(_collect(engine, PROMPTS[0], greedy))
            await asyncio.sleep(0)
            await engine.abort([])
            with pytest.raises(RuntimeError, match="update_weights: 1 request\\(s\\) in flight"):
                await engine.update_weights(iter(buckets), is_checkpoint_format=False)
            with pytest.raises(RuntimeError, match="update_weights: 1 request\\(s\\) in flight"):
                await engine.collective_rpc("update_weights", args=(iter(buckets),))
            first = await task
            await engine.update_weights(iter(buckets), is_checkpoint_format=False, version=4)
            return first, await _collect(engine, PROMPTS[0], greedy)

        first, second = asyncio.run(main())
        assert engine.weight_version == 4
        assert first[-1].outputs[0].weight_versions == [(0, 0)]
        assert second[-1].outputs[0].weight_versions == [(0, 4)]
        assert second[-1].outputs[0].token_ids == first[-1].outputs[0].token_ids
    finally:
        engine.shutdown()


async def _collect(engine: AsyncLLM, prompt, params: SamplingParams) -> list:
    return [out async for out in engine.generate(prompt, params)]
