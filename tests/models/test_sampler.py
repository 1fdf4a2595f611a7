"""The sampler against hand-computed distributions on a fixed logit vector.

Each distribution test draws N tokens in one call, one row per seed, and compares the
empirical frequencies with the distribution the definition gives (computed here in float64
numpy, independently of the sampler):

  * the support must be exactly the set the definition keeps (every kept token has
    probability >= 1%, so with N = 20000 each is drawn ~200 times or more);
  * every frequency must lie within 5 standard errors, 5 * sqrt(p (1 - p) / N), of p: a
    correct sampler fails that for a given token with probability < 1e-6. The seeds are
    fixed, so the test is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from models.decode_loop import step_metadata
from runner.device.prepare import prepare_rows, prepare_state
from models.sampler import (SamplerOutput, SamplingMetadata, _top_k_top_p_mask, apply_penalties, choose,
                            first_argmax, sample_switched, scatter_rows, token_ranks, top_index,
                            top_width)
from runner.sampling_params import MAX_LOGPROBS, SamplingParams
from runner.engine.scheduler import ScheduledRequest, SchedulerOutput
from state.request import Request

N = 20000
LOGITS = np.array([1.5, 1.2, 0.8, 0.5, 0.1, -0.3, -0.7, -1.1], np.float32)
V = LOGITS.size



@dataclass(frozen=True)
class SamplerFlags:
    """The stages `sample_switched` switches on the device, fixed at compile time instead."""

    all_greedy: bool
    needs_sort: bool  # some row uses top_k or top_p
    num_logprobs: int  # top entries returned per row


def sample(logits: jax.Array, meta: SamplingMetadata, flags: SamplerFlags) -> SamplerOutput:
    """The oracle: the sampler's stages chained plainly, each optional one present or absent
    as the static flags and the metadata's None fields say."""
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    x = logits
    if meta.bias_ids is not None:
        x = x + scatter_rows(logits.shape, meta.bias_ids, meta.bias_values)
    if meta.output_ids is not None:
        x = apply_penalties(x, meta)
    tokens = choose(x, meta, flags.all_greedy, flags.needs_sort)
    chosen = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, flags.num_logprobs)
    ranks = token_ranks(raw_logprobs, chosen) if flags.num_logprobs else jnp.zeros(logits.shape[0], jnp.int32)
    return SamplerOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs, ranks)


sample_jit = jax.jit(sample, static_argnames=("flags",))


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    return e / e.sum()


def metadata(B: int, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, counters=0,
             **optional) -> SamplingMetadata:
    def col(value, dtype):
        return np.broadcast_to(np.asarray(value, dtype), (B,)).copy()

    return SamplingMetadata(
        temperature=col(temperature, np.float32), top_k=col(top_k, np.int32),
        top_p=col(top_p, np.float32), min_p=col(min_p, np.float32),
        seeds=col(np.arange(B) if seeds is None else seeds, np.uint32),
        counters=col(counters, np.int32), **optional)


def flags_for(meta: SamplingMetadata, num_logprobs: int = 0) -> SamplerFlags:
    greedy = np.asarray(meta.temperature) == 0
    sort = ~greedy & ((np.asarray(meta.top_k) > 0) | (np.asarray(meta.top_p) < 1))
    return SamplerFlags(all_greedy=bool(greedy.all()), needs_sort=bool(sort.any()),
                        num_logprobs=num_logprobs)


def draw(logits: np.ndarray, **kwargs) -> np.ndarray:
    """N tokens sampled from one logit vector, one seed per row."""
    meta = metadata(N, **kwargs)
    out = sample_jit(np.tile(logits, (N, 1)), meta, flags_for(meta))
    return np.asarray(out.token_ids)


def reference(logits: np.ndarray, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The definition, step by step: temperature, min_p, top-k, top-p, renormalise."""
    x = np.asarray(logits, np.float64) / temperature
    p = softmax(x)
    x = np.where(p >= min_p * p.max(), x, -np.inf)
    order = np.argsort(-x, kind="stable")
    keep = np.isfinite(x)
    if top_k > 0:
        keep &= np.isin(np.arange(x.size), order[:top_k])
    p = softmax(np.where(keep, x, -np.inf))
    mass_before = np.cumsum(p[order]) - p[order]
    # The smallest head of the sorted distribution whose mass reaches top_p.
    assert np.all(np.abs(np.cumsum(p[order]) - top_p) > 1e-3) or top_p == 1, "ambiguous top_p boundary"
    keep &= np.isin(np.arange(x.size), order[mass_before < top_p])
    return softmax(np.where(keep, x, -np.inf))


def assert_distribution(tokens: np.ndarray, probs: np.ndarray) -> None:
    assert probs[probs > 0].min() >= 0.01, "test design: every kept token must be drawn often"
    counts = np.bincount(tokens, minlength=probs.size)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(probs)), \
        f"support {np.flatnonzero(counts)} != definition {np.flatnonzero(probs)}"
    freq = counts / tokens.size
    tolerance = 5 * np.sqrt(probs * (1 - probs) / tokens.size)
    assert np.all(np.abs(freq - probs) <= tolerance), (freq, probs, tolerance)


# -- greedy and plain sampling --------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, (4, 16), elements=st.floats(-20, 20, width=32), unique=True))
def test_greedy_is_argmax_even_beside_sampled_rows(logits):
    meta = metadata(4, temperature=np.array([0, 0, 0.8, 0]), top_k=np.array([0, 0, 3, 0]))
    out = sample_jit(logits, meta, flags_for(meta))
    greedy = np.asarray(meta.temperature) == 0
    np.testing.assert_array_equal(np.asarray(out.token_ids)[greedy], logits.argmax(-1)[greedy])
    meta = metadata(4, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(sample_jit(logits, meta, flags_for(meta)).token_ids),
                                  logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.8, 1.0, 1.8])
def test_temperature_matches_softmax(temperature):
    assert_distribution(draw(LOGITS, temperature=temperature), softmax(LOGITS / temperature))


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_top_k_support_and_frequencies(top_k):
    expected = reference(LOGITS, top_k=top_k)
    assert np.count_nonzero(expected) == top_k
    assert_distribution(draw(LOGITS, top_k=top_k), expected)


@pytest.mark.parametrize("top_p", [0.3, 0.62, 0.9])
def test_top_p_support_and_frequencies(top_p):
    expected = reference(LOGITS, top_p=top_p)
    assert 0 < np.count_nonzero(expected) < V
    assert_distribution(draw(LOGITS, top_p=top_p), expected)


@pytest.mark.parametrize("min_p", [0.1, 0.3])
def test_min_p_support_and_frequencies(min_p):
    expected = reference(LOGITS, min_p=min_p)
    p = softmax(LOGITS)
    assert set(np.flatnonzero(expected)) == set(np.flatnonzero(p >= min_p * p.max()))
    assert_distribution(draw(LOGITS, min_p=min_p), expected)


def test_all_filters_together():
    kwargs = dict(temperature=1.3, min_p=0.05, top_k=6, top_p=0.85)
    expected = reference(LOGITS, **kwargs)
    assert 2 < np.count_nonzero(expected) < 6
    assert_distribution(draw(LOGITS, **kwargs), expected)


def test_top_p_one_masks_nothing_on_a_large_vocabulary():
    """top_p = 1 is 'off': in float32 the cumulative mass reaches 1.0 before the last of
    32k tokens, and those must not be cut just because another row needed the sort."""
    logits = np.random.default_rng(0).normal(size=(2, 32000)).astype(np.float32) * 3
    masked = _top_k_top_p_mask(logits, np.array([0, 40], np.int32), np.array([1.0, 1.0], np.float32))
    masked = np.asarray(masked)
    assert np.isfinite(masked[0]).all()
    assert np.isfinite(masked[1]).sum() == 40


# -- penalties, bias, min_tokens ------------------------------------------------------------


def test_penalties_match_hand_computation():
    logits = np.array([[1.5, -0.5, 2.0, 0.0, -1.0, 0.8],
                       [1.5, -0.5, 2.0, 0.0, -1.0, 0.8]], np.float32)
    pad = 6
    meta = metadata(2, prompt_ids=np.array([[0, 3, 3, pad], [5, pad, pad, pad]], np.int32),
                    output_ids=np.array([[2, 2, 4, pad], [1, 1, 1, 5]], np.int32),
                    repetition_penalty=np.array([1.5, 2.0], np.float32),
                    frequency_penalty=np.array([0.3, -0.1], np.float32),
                    presence_penalty=np.array([0.2, 0.5], np.float32))
    got = np.asarray(apply_penalties(logits, meta))
    row0 = [1.5 / 1.5,  # prompt token, positive: divided
            -0.5,  # never seen
            2.0 / 1.5 - 0.3 * 2 - 0.2,  # output twice: divided, frequency x2, presence once
            0.0 * 1.5,  # prompt token at zero: multiplied (stays 0)
            -1.0 * 1.5 - 0.3 - 0.2,  # output, negative: multiplied
            0.8]
    row1 = [1.5, -0.5 * 2.0 + 0.1 * 3 - 0.5, 2.0, 0.0, -1.0,
            0.8 / 2.0 + 0.1 - 0.5]  # in prompt and output: one repetition factor only
    np.testing.assert_allclose(got, np.array([row0, row1]), rtol=1e-6, atol=1e-6)


def test_bias_then_penalties_shape_the_sampled_distribution():
    """logit_bias, then penalties, then temperature: frequencies follow the processed logits."""
    pad = V
    bias_ids = np.array([[7, 1, pad]], np.int32)
    bias_values = np.array([[3.0, -1.0, 0.0]], np.float32)
    kwargs = dict(bias_ids=np.repeat(bias_ids, N, 0), bias_values=np.repeat(bias_values, N, 0),
                  prompt_ids=np.full((N, 2), [0, pad], np.int32),
                  output_ids=np.full((N, 2), [7, 7], np.int32),
                  repetition_penalty=np.full(N, 1.2, np.float32),
                  frequency_penalty=np.full(N, 0.25, np.float32),
                  presence_penalty=np.full(N, 0.1, np.float32))
    meta = metadata(N, temperature=0.9, **kwargs)
    tokens = np.asarray(sample_jit(np.tile(LOGITS, (N, 1)), meta, flags_for(meta)).token_ids)
    x = LOGITS.astype(np.float64).copy()
    x[7] += 3.0
    x[1] -= 1.0
    x[0] /= 1.2  # prompt token, positive
    x[7] = x[7] / 1.2 - 0.25 * 2 - 0.1  # biased to 0.5 (> 0), then output twice
    assert_distribution(tokens, softmax(x / 0.9))
    # Greedy rows see the same processed logits.
    meta = metadata(N, temperature=0.0, **kwargs)
    greedy = np.asarray(sample_jit(np.tile(LOGITS, (N, 1)), meta, flags_for(meta)).token_ids)
    assert set(greedy) == {int(np.argmax(x))}


@jax.jit
def _switched(logits, rows, state):
    return sample_switched(logits, step_metadata(rows, state), rows.num_logprobs)


def _scheduled(requests: list[Request]) -> SchedulerOutput:
    return SchedulerOutput([ScheduledRequest(r, r.num_tokens - 1, 1) for r in requests])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_eos_and_stop_tokens_until_reached(temperature):
    eos, stop = 0, 1  # the two likeliest tokens of LOGITS
    params = SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=[stop], max_tokens=8)
    n = 2000

    def run(num_outputs: int) -> np.ndarray:
        requests = [Request(str(i), [3, 4], params, seed=i, eos_token_ids=(eos,),
                            output_token_ids=[5] * num_outputs) for i in range(n)]
        out = _scheduled(requests)
        rows = prepare_rows(out, n, V, 8, 64, np.zeros((n, 1), np.int32))
        return np.asarray(_switched(np.tile(LOGITS, (n, 1)), rows, prepare_state(out, n, V, 8)).token_ids)

    below = run(2)
    assert eos not in below and stop not in below
    if temperature == 0:
        assert set(below) == {2}
    reached = run(3)
    assert eos in reached
    if temperature == 0:
        assert set(reached) == {eos}
    else:
        assert stop in reached


# -- seeds and log-probabilities -------------------------------------------------------------


def test_seeded_row_ignores_the_rest_of_the_batch():
    """A row's token depends on its (seed, counter) and its own settings only: alone, or at
    another index among rows that switch on penalties, bias, the sort and greedy mode."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, V)).astype(np.float32) * 2
    seeds = rng.integers(0, 2**32, size=64, dtype=np.uint32)
    counters = rng.integers(0, 50, size=64)
    own = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)

    alone = []
    for i in range(64):
        meta = metadata(1, seeds=seeds[i], counters=counters[i], **own)
        alone.append(int(sample_jit(logits[i:i + 1], meta, flags_for(meta)).token_ids[0]))
    assert len(set(alone)) > 3  # really random, not a constant

    pad = V
    B = 4
    crowd = []
    for i in range(64):
        batch = np.stack([rng.normal(size=V), rng.normal(size=V), logits[i], rng.normal(size=V)]).astype(np.float32)
        meta = metadata(B, temperature=np.array([0.0, 0.5, own["temperature"], 1.3]),
                        top_k=np.array([0, 3, 0, 0]), top_p=np.array([1.0, 0.8, 1.0, 1.0]),
                        min_p=np.array([0.0, 0.0, 0.0, 0.2]),
                        seeds=np.array([7, seeds[i] ^ 1, seeds[i], 9], np.uint32),
                        counters=np.array([0, counters[i], counters[i], 3]),
                        bias_ids=np.array([[1, pad]] * B, np.int32),
                        bias_values=np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]], np.float32),
                        prompt_ids=np.array([[0, pad], [2, 3], [pad, pad], [4, pad]], np.int32),
                        output_ids=np.array([[5, pad], [6, 6], [pad, pad], [1, pad]], np.int32),
                        repetition_penalty=np.array([1.3, 1.1, 1.0, 1.0], np.float32),
                        frequency_penalty=np.array([0.5, 0.0, 0.0, 0.2], np.float32),
                        presence_penalty=np.array([0.0, 0.3, 0.0, 0.1], np.float32))
        crowd.append(int(sample_jit(batch, meta, flags_for(meta)).token_ids[2]))
    assert crowd == alone


def test_seed_and_counter_both_matter():
    meta = metadata(N, seeds=np.full(N, 5), counters=np.arange(N))
    by_counter = np.asarray(sample_jit(np.tile(LOGITS, (N, 1)), meta, flags_for(meta)).token_ids)
    assert_distribution(by_counter, softmax(LOGITS))  # successive outputs of one request
    meta = metadata(N, seeds=np.full(N, 5), counters=np.full(N, 3))
    same = np.asarray(sample_jit(np.tile(LOGITS, (N, 1)), meta, flags_for(meta)).token_ids)
    assert len(set(same)) == 1


def test_logprobs_are_log_softmax_of_the_raw_logits():
    rng = np.random.default_rng(2)
    V_big = 40
    logits = (rng.normal(size=(6, V_big)) * 3).astype(np.float32)
    pad = V_big
    meta = metadata(6, temperature=np.array([0, 0.7, 1.5, 0.0, 1.0, 2.0]),
                    top_k=np.array([0, 5, 0, 0, 0, 0]), min_p=np.array([0, 0, 0.1, 0, 0, 0]),
                    bias_ids=np.tile(np.array([[3, pad]], np.int32), (6, 1)),
                    bias_values=np.tile(np.array([[4.0, 0.0]], np.float32), (6, 1)))
    out = sample_jit(logits, meta, flags_for(meta, MAX_LOGPROBS))
    raw = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    tokens = np.asarray(out.token_ids)
    np.testing.assert_allclose(np.asarray(out.logprobs), raw[np.arange(6), tokens], atol=1e-5)
    top = np.argsort(-raw, axis=-1)[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(out.top_ids), top)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(raw, top, -1), atol=1e-5)
    assert out.top_ids.shape == (6, MAX_LOGPROBS)
    # No logprobs asked: no top entries computed.
    assert sample_jit(logits, meta, flags_for(meta, 0)).top_ids.shape == (6, 0)


def test_top_entries_are_computed_only_when_a_row_asks_for_them():
    """`logprobs=0` (an RL rollout's setting) gets the chosen token's log-probability and rank,
    as a request for top entries does, but no top-k runs; no logprobs at all: zeros."""
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(3, V)) * 3).astype(np.float32)
    raw = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))

    def run(*num_logprobs: int | None):
        requests = [Request(str(i), [3, 4], SamplingParams(temperature=0, logprobs=k), seed=i,
                            output_token_ids=[5])
                    for i, k in enumerate(num_logprobs)]
        out = _scheduled(requests)
        rows = prepare_rows(out, 3, V, 8, 64, np.zeros((3, 1), np.int32))
        return _switched(logits, rows, prepare_state(out, 3, V, 8))

    greedy = np.argmax(logits, axis=-1)
    chosen_only = run(0, 0, 0)
    np.testing.assert_allclose(np.asarray(chosen_only.logprobs), raw[np.arange(3), greedy], atol=1e-5)
    assert np.asarray(chosen_only.ranks).tolist() == [1, 1, 1]
    assert not np.asarray(chosen_only.top_ids).any() and not np.asarray(chosen_only.top_logprobs).any()
    mixed = run(None, 0, 3)
    np.testing.assert_allclose(np.asarray(mixed.logprobs)[1:], raw[np.arange(1, 3), greedy[1:]], atol=1e-5)
    top = np.argsort(-raw, axis=-1)[:, :top_width(V)]
    np.testing.assert_array_equal(np.asarray(mixed.top_ids)[2], top[2])
    none = run(None, None, None)
    assert not np.asarray(none.logprobs).any() and not np.asarray(none.ranks).any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12).flatmap(lambda width: st.lists(
    st.lists(st.sampled_from([0.0, 1.5, -2.0, 7.25, float("-inf"), float("inf"), float("nan")]),
             min_size=width, max_size=width), min_size=1, max_size=4)))
def test_first_argmax_is_argmax(rows):
    """Ties go to the first maximum, -inf/inf rows and NaN behave as `jnp.argmax`, for both
    ways the sampler takes a row's maximum."""
    x = jnp.asarray(rows, jnp.float32)
    np.testing.assert_array_equal(np.asarray(first_argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))
    np.testing.assert_array_equal(np.asarray(top_index(x)), np.asarray(jnp.argmax(x, axis=-1)))


def test_prompt_logprobs_step_over_several_row_chunks_matches_float64():
    """A 1024-token step computes its prompt logprobs 512 logit rows at a time: every
    chunk's rows must come back in place and equal the definition (float64 numpy)."""
    from runner.device.loader import dummy_params
    from runner.device.model_runner import PROMPT_LOGPROBS_ROWS, prompt_logprobs_step
    from state.config import ModelConfig

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                      tie_word_embeddings=True, dtype="float32")
    params = dummy_params(cfg, 0)
    T = 2 * PROMPT_LOGPROBS_ROWS
    rng = np.random.default_rng(0)
    hidden = rng.normal(0, 30, (T, 16)).astype(np.float32)
    next_ids = rng.integers(0, 96, T).astype(np.int32)
    chosen, top_ids, top_lps, ranks = jax.device_get(prompt_logprobs_step(params, hidden, next_ids, None))

    logits = hidden.astype(np.float64) @ np.asarray(params.embed, np.float64).T
    logprobs = logits - logits.max(1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(1, keepdims=True))
    want = logprobs[np.arange(T), next_ids]
    np.testing.assert_allclose(chosen, want, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ranks, 1 + (logprobs > want[:, None] + 1e-9).sum(1))
    np.testing.assert_array_equal(top_ids[:, 0], logprobs.argmax(1))
    np.testing.assert_allclose(top_lps, np.sort(logprobs, 1)[:, ::-1][:, :MAX_LOGPROBS], rtol=0, atol=1e-4)
