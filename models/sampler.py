"""Sampling inside jit: logits -> bias -> penalties -> temperature -> min_p -> top-k/top-p -> token.

Every row draws its Gumbel noise over the whole vocabulary from its own (seed, output
index) alone (`gumbel_noise`), before any masking: a seeded request's tokens depend on its
own (seed, position) only, never on what else shares the batch or on which optional stages
the batch switched on.

One compiled program serves every mix of requests (`sample_switched`): each optional stage
runs under a device-side switch on what the rows ask for, so a greedy batch pays for no sort,
no noise and no penalty bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from state.config import LOGPROBS_MODES

# Entries per position the device returns: vLLM's default max_logprobs.
MAX_LOGPROBS = 20



@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingMetadata:
    temperature: Any  # [B] f32; 0 = greedy row
    top_k: Any  # [B] i32; 0 = off
    top_p: Any  # [B] f32; 1 = off
    min_p: Any  # [B] f32; 0 = off
    seeds: Any  # [B] u32
    counters: Any  # [B] i32 output index of the token being sampled
    bias_ids: Any = None  # [B, L] i32, pad = V (dropped); logit_bias and min_tokens bans
    bias_values: Any = None  # [B, L] f32
    prompt_ids: Any = None  # [B, Lp] i32, pad = V: tokens the repetition penalty sees
    output_ids: Any = None  # [B, Lo] i32, pad = V: tokens every penalty sees
    presence_penalty: Any = None  # [B] f32
    frequency_penalty: Any = None  # [B] f32
    repetition_penalty: Any = None  # [B] f32
    logprobs_mode: Any = None  # [B] i32 index into LOGPROBS_MODES; None: raw_logprobs


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    token_ids: Any  # [B] i32
    logprobs: Any  # [B] f32 log-probability of the chosen token under the model
    top_ids: Any  # [B, num_logprobs] i32
    top_logprobs: Any  # [B, num_logprobs] f32
    ranks: Any  # [B] i32 1-based rank of the chosen token in the full distribution (0: not asked)


def scatter_rows(shape: tuple[int, int], ids: jax.Array, values: jax.Array) -> jax.Array:
    rows = jnp.arange(shape[0])[:, None]
    return jnp.zeros(shape, values.dtype).at[rows, ids].add(values, mode="drop")


def apply_penalties(logits: jax.Array, meta: SamplingMetadata) -> jax.Array:
    """vLLM's penalties: repetition (multiplicative, prompt and output tokens), then
    frequency and presence (additive, output tokens only)."""
    shape = logits.shape
    out_counts = scatter_rows(shape, meta.output_ids, jnp.ones(meta.output_ids.shape, jnp.float32))
    in_prompt = scatter_rows(shape, meta.prompt_ids, jnp.ones(meta.prompt_ids.shape, jnp.float32)) > 0
    seen = in_prompt | (out_counts > 0)
    rep = meta.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - meta.frequency_penalty[:, None] * out_counts
    return logits - meta.presence_penalty[:, None] * (out_counts > 0)


def _top_k_top_p_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask everything below each row's top-k and top-p thresholds (ties at a threshold stay)."""
    V = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [B, 1]
    ordered = jnp.where(jnp.arange(V)[None, :] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep the smallest head whose mass reaches top_p: token i stays if the mass before it < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # top_p = 1 keeps everything outright: in float32 the running mass can round up to 1
    # before the last tokens, which would cut a tail the row never asked to cut.
    num_kept = jnp.where(top_p >= 1, V, jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1), 1))
    pth = jnp.take_along_axis(ordered, (num_kept - 1)[:, None], axis=-1)
    return jnp.where(logits < jnp.maximum(kth, pth), -jnp.inf, logits)


def first_argmax(x: jax.Array) -> jax.Array:
    """[B] i32 `jnp.argmax(x, axis=-1)`: the first maximum, or the first NaN where a row has one.

    Written as a max, then a min over the positions that reach it: two plain reductions
    that XLA's CPU backend vectorises, where `argmax` lowers to a (value, index) reduction
    that it runs element by element (README, "Why the programs look as they do").
    """
    top = jnp.max(x, axis=-1, keepdims=True)  # NaN when the row has one
    hit = (x == top) | jnp.isnan(x)
    positions = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, positions, x.shape[-1]), axis=-1)


def _min_p_mask(x: jax.Array, min_p: jax.Array) -> jax.Array:
    """Mask tokens less likely than min_p times the row's most likely one."""
    probs = jax.nn.softmax(x, axis=-1)
    return jnp.where(probs < min_p[:, None] * probs.max(axis=-1, keepdims=True), -jnp.inf, x)


def process(x: jax.Array, meta: SamplingMetadata, needs_sort: bool) -> jax.Array:
    """The logits random rows draw from: divided by the temperature, then min_p / top-k /
    top-p masked (-inf). Greedy rows are returned as they came (their temperature counts
    as 1, as in vLLM), so their processed logprobs never depend on batch mates."""
    is_greedy = meta.temperature == 0
    scaled = x / jnp.where(is_greedy, 1.0, meta.temperature)[:, None]
    scaled = jax.lax.cond(jnp.any(meta.min_p > 0), _min_p_mask, lambda x, _: x, scaled, meta.min_p)
    if needs_sort:
        scaled = _top_k_top_p_mask(scaled, meta.top_k, meta.top_p)
    return jnp.where(is_greedy[:, None], x, scaled)


def _mix32(x: jax.Array) -> jax.Array:
    """A bijection of uint32 with near-ideal avalanche (Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds: jax.Array, counters: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] standard Gumbel noise; row b is a function of (seeds[b], counters[b]) alone.

    Each row's key is `fold_in(key(seed), counter)` (threefry, one per row); each entry is
    a counter-based hash of (key, vocabulary index), two rounds of `_mix32`, turned into a
    uniform in (0, 1) with 24 bits, then `-log(-log(u))`. Elementwise integer arithmetic
    that XLA vectorises: threefry drawn for every entry, as `jax.random.gumbel` does, cost
    several times the rest of the sampler at a batch of 128 rows (README, "Why the
    programs look as they do").
    """
    keys = jax.vmap(lambda s, c: jax.random.key_data(jax.random.fold_in(jax.random.key(s), c)))(seeds, counters)
    index = jnp.arange(vocab_size, dtype=jnp.uint32)[None, :]
    bits = _mix32(_mix32(index * jnp.uint32(0x9E3779B9) + keys[:, :1]) ^ keys[:, 1:])
    uniform = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
    return -jnp.log(-jnp.log(uniform))


def choose(x: jax.Array, meta: SamplingMetadata, all_greedy: bool, needs_sort: bool) -> jax.Array:
    """[B] tokens from biased, penalised logits: argmax for greedy rows, else Gumbel-max
    over the `process`ed row.

    `all_greedy` skips everything but the argmax; `needs_sort` (some row uses top_k or
    top_p) adds the sort. Both are static: each pair is its own branch of `sample_switched`.
    """
    V = x.shape[-1]
    tokens = first_argmax(x)
    if all_greedy:
        return tokens
    sampled = top_index(process(x, meta, needs_sort) + gumbel_noise(meta.seeds, meta.counters, V))
    return jnp.where(meta.temperature == 0, tokens, sampled)


def top_index(x: jax.Array) -> jax.Array:
    """[B] i32 index of each row's maximum of a computed `x` (the first of equal maxima, or
    the first NaN), as `first_argmax` gives.

    `lax.top_k` with k=1: a library call, so XLA materialises `x` once and reads it once.
    `first_argmax`'s two reductions would each take the noise computation fused in, which
    on XLA's CPU backend cost 2-3x more at [128, 32000] (README, "Why the programs look as
    they do").
    """
    return jax.lax.top_k(x, 1)[1][:, 0].astype(jnp.int32)


def top_width(vocab_size: int) -> int:
    """Entries `sample_switched` returns per row: MAX_LOGPROBS, or the whole vocabulary."""
    return min(MAX_LOGPROBS, vocab_size)


# The three token choosers `sample_switched` picks between on the device, as
# (all_greedy, needs_sort): greedy, random without a sort, random with one.
_MODES = ((True, False), (False, False), (False, True))


@jax.named_scope("sampler")
def sample_switched(logits: jax.Array, meta: SamplingMetadata, num_logprobs: jax.Array) -> SamplerOutput:
    """Choose one token per row of `logits: [B, V]` float32, every stage switched on the device.

    `meta` has every field set (no bias: pad ids; no penalty: 0, 0, 1). Each stage runs
    under `lax.cond`/`lax.switch` on what the rows ask for, so one compiled program serves
    every mix of requests and a greedy batch still skips the sort, the noise, the penalty
    tables and the top-k of logprobs. Skipped stages are identities on these values, so
    the tokens equal those of the same stages switched at compile time (the tests' oracle).

    Args:
        num_logprobs: [B] i32 per row: -1 for no logprobs, 0 for the chosen token's alone,
            k > 0 for the chosen token's and the top k (the device returns `top_width(V)`).

    The chosen token's log-probability (or logit, by the row's `logprobs_mode`) and rank are
    computed only when some row asks for logprobs (they are 0 otherwise): a log-sum-exp over
    `[B, V]` costs as much as the greedy choice. The top entries, a `top_k` over `[B, V]`,
    only when some row asks for them: an RL rollout wants the chosen token's alone.
    """
    biased = jnp.any((meta.bias_ids < logits.shape[-1]) & (meta.bias_values != 0))
    x = jax.lax.cond(biased, lambda x: x + scatter_rows(x.shape, meta.bias_ids, meta.bias_values), lambda x: x, logits)
    penalised = jnp.any((meta.presence_penalty != 0) | (meta.frequency_penalty != 0)
                        | (meta.repetition_penalty != 1))
    x = jax.lax.cond(penalised, apply_penalties, lambda x, _: x, x, meta)
    is_random = meta.temperature > 0
    sorts = jnp.any(is_random & ((meta.top_k > 0) | (meta.top_p < 1)))
    mode = jnp.where(jnp.any(is_random), jnp.where(sorts, 2, 1), 0)
    tokens = jax.lax.switch(mode, [lambda x, m, g=g, s=s: choose(x, m, g, s) for g, s in _MODES], x, meta)
    B, V = logits.shape
    k = top_width(V)
    modes = jnp.zeros(B, jnp.int32) if meta.logprobs_mode is None else meta.logprobs_mode

    def reported(logits: jax.Array, x: jax.Array, tokens: jax.Array, top: bool):
        """The chosen token's value and rank, and the top `k` entries when `top`."""
        source, shift = reported_source(logits, x, meta, modes, sorts)
        picked = jnp.take_along_axis(source, tokens[:, None], axis=-1)[:, 0]
        if top:
            top_values, top_ids = jax.lax.top_k(source, k)
            top_values = top_values - shift[:, None]
        else:
            top_values, top_ids = jnp.zeros((B, k), jnp.float32), jnp.zeros((B, k), jnp.int32)
        return picked - shift, top_values, top_ids, token_ranks(source, picked)

    def without(logits: jax.Array, x: jax.Array, tokens: jax.Array):
        return (jnp.zeros(B, jnp.float32), jnp.zeros((B, k), jnp.float32),
                jnp.zeros((B, k), jnp.int32), jnp.zeros(B, jnp.int32))

    wanted = jnp.where(jnp.any(num_logprobs > 0), 2, jnp.where(jnp.any(num_logprobs >= 0), 1, 0))
    chosen, top_logprobs, top_ids, ranks = jax.lax.switch(
        wanted, [without] + [lambda *a, top=top: reported(*a, top) for top in (False, True)], logits, x, tokens)
    return SamplerOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs, ranks)


def reported_source(logits: jax.Array, x: jax.Array, meta: SamplingMetadata, modes: jax.Array,
                    sorts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What each row's logprobs report, by its `LOGPROBS_MODES` index in `modes`, as
    `(source [B, V], shift [B])`: the reported values are `source - shift`.

    The source is the raw `logits` or the biased, penalised `x` once `process`ed (a sort
    when some row uses top-k or top-p, run only when some row asks for a processed mode).
    The shift is the row's log-sum-exp for log-probabilities and 0 for logits. Subtracting
    it from the few values reported, not from the whole row, spares a `[B, V]` pass; ranks
    and the top entries' order are the same on either side of a per-row shift."""
    processed_rows = modes >= LOGPROBS_MODES.index("processed_logprobs")
    processed = jax.lax.cond(
        jnp.any(processed_rows),
        lambda x: jax.lax.cond(sorts, lambda x: process(x, meta, True), lambda x: process(x, meta, False), x),
        lambda x: x, x)
    source = jnp.where(processed_rows[:, None], processed, logits)
    as_logits = (modes == LOGPROBS_MODES.index("raw_logits")) | (modes == LOGPROBS_MODES.index("processed_logits"))
    return source, jnp.where(as_logits, 0.0, jax.nn.logsumexp(source, axis=-1))


def token_ranks(values: jax.Array, chosen: jax.Array) -> jax.Array:
    """[rows] 1-based rank of each chosen value in its row (ties share a rank)."""
    return 1 + jnp.sum(values > chosen[:, None], axis=-1).astype(jnp.int32)


def prompt_logprobs(logits: jax.Array, next_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Log-probabilities at every prompt position: of the actual next token, and the top ones.

    Args:
        logits: [T, V] float32 logits of every scheduled token.
        next_ids: [T] the token that follows each position.

    Returns:
        [T] its log-probability, [T, top_width(V)] top ids and log-probabilities, [T] its rank.
    """
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, next_ids[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, top_width(logits.shape[-1]))
    return chosen, top_ids.astype(jnp.int32), top_logprobs, token_ranks(logprobs, chosen)
