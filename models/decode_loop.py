"""The decode loop on the device: up to K decode steps of a whole batch in one program.

Each step runs the forward for one token per row, samples the next token, writes its KV
and turns the sampled token into the next input, all inside `lax.while_loop`. Stop
conditions are checked on the device: a row finishes on EOS or a stop token id (once it
has `min_tokens` outputs) or when it reaches its output limit; a finished row writes
nothing (slot -1) and samples nothing, and the loop ends as soon as every row is done.
Stop strings need the detokenizer: the host checks them after the call and drops the
tokens past one.

On the reference backend a multi-step decode reads each row's blocks from the pages once,
before the loop (`models.multi_step_attention`), and every step attends over that copy:
within one call the only keys that change are the ones its steps write themselves.

`multi_step_decode` is a pure function of (params, KV cache, decode state, row settings,
cfg), so a user's own `jax.jit` code can call it; the shell picks how many steps to run.
Seeded sampling folds in (seed, output index) only, so the tokens never depend on how
many steps one call runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp

from models import multi_step_attention
from models.llama import compute_logits, forward
from models.sampler import SamplerOutput, SamplingMetadata, sample_switched, top_width
from state.batch import Batch
from state.config import ModelConfig
from models.kv_cache import KVCache


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DecodeState:
    """What changes from one decode step to the next, per row (B rows)."""

    token_ids: Any  # [B] i32 the last known token: the next step's input
    positions: Any  # [B] i32 its position
    num_out: Any  # [B] i32 output tokens so far (the sampler's output index)
    output_ids: Any  # [B, W] i32 output tokens so far, pad = V (what the penalties count)
    is_done: Any  # [B] bool finished (or padding) rows

    @classmethod
    def first(cls, token_ids: jax.Array, positions: jax.Array, vocab_size: int, history_width: int) -> DecodeState:
        """Rows about to feed `token_ids` at `positions`, with no outputs yet."""
        B = token_ids.shape[0]
        return cls(token_ids=token_ids, positions=positions, num_out=jnp.zeros(B, jnp.int32),
                   output_ids=jnp.full((B, history_width), vocab_size, jnp.int32),
                   is_done=jnp.zeros(B, bool))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSettings:
    """What stays fixed over a multi-step decode, per row."""

    block_tables: Any  # [B, Nb] i32 blocks holding every slot the steps may write
    max_out: Any  # [B] i32 output limit: max_tokens, capped by max_model_len
    min_out: Any  # [B] i32 min_tokens: stop tokens are banned and ignored below it
    stop_ids: Any  # [B, Ls] i32 EOS (unless ignore_eos) and stop_token_ids, pad = -1
    num_logprobs: Any  # [B] i32: -1 none, 0 the chosen token's alone, k the top k too
    sampling: SamplingMetadata  # every field set; counters and output_ids come from the state

    @classmethod
    def greedy(cls, block_tables: jax.Array, vocab_size: int, history_width: int,
               max_out: int = jnp.iinfo(jnp.int32).max) -> RowSettings:
        """Greedy rows without stop tokens, bias or penalties, each allowed `max_out` outputs:
        the settings of a benchmark, or of a user's own jitted decode loop."""
        B = block_tables.shape[0]
        meta = SamplingMetadata(
            temperature=jnp.zeros(B), top_k=jnp.zeros(B, jnp.int32), top_p=jnp.ones(B),
            min_p=jnp.zeros(B), seeds=jnp.zeros(B, jnp.uint32), counters=jnp.zeros(B, jnp.int32),
            bias_ids=jnp.full((B, 1), vocab_size, jnp.int32), bias_values=jnp.zeros((B, 1)),
            prompt_ids=jnp.full((B, history_width), vocab_size, jnp.int32),
            presence_penalty=jnp.zeros(B), frequency_penalty=jnp.zeros(B), repetition_penalty=jnp.ones(B))
        return cls(block_tables=block_tables, max_out=jnp.full(B, max_out, jnp.int32),
                   min_out=jnp.zeros(B, jnp.int32), stop_ids=jnp.full((B, 1), -1, jnp.int32),
                   num_logprobs=jnp.full(B, -1, jnp.int32), sampling=meta)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class MultiStepOutput:
    """The tokens of one multi-step decode; entry [b, k] is row b's k-th token of the call."""

    token_ids: Any  # [B, K] i32, -1 past the row's last token
    logprobs: Any  # [B, K] f32
    ranks: Any  # [B, K] i32 1-based rank of each token (zeros unless some row wants logprobs)
    top_ids: Any  # [B, K, top_width(V)] i32 (zeros unless some row wants top logprobs)
    top_logprobs: Any  # [B, K, top_width(V)] f32
    num_tokens: Any  # [B] i32 tokens each row produced


def step_metadata(rows: RowSettings, state: DecodeState) -> SamplingMetadata:
    """The sampler's input for the state's next token: below min_tokens the stop tokens
    are banned (-inf), after the row's logit_bias."""
    banned = (state.num_out < rows.min_out)[:, None] & (rows.stop_ids >= 0)  # [B, Ls]
    dropped = jnp.iinfo(jnp.int32).max  # an id past the vocabulary: the scatter drops it
    s = rows.sampling
    return replace(
        s, counters=state.num_out, output_ids=state.output_ids,
        bias_ids=jnp.concatenate([s.bias_ids, jnp.where(banned, rows.stop_ids, dropped)], axis=1),
        bias_values=jnp.concatenate([s.bias_values, jnp.where(banned, -jnp.inf, 0.0)], axis=1))


def is_stop(rows: RowSettings, tokens: jax.Array, num_out: jax.Array) -> jax.Array:
    """[B] rows that `tokens` (their `num_out`-th output) finishes."""
    hit = jnp.any(tokens[:, None] == rows.stop_ids, axis=1) & (num_out >= rows.min_out)
    return hit | (num_out >= rows.max_out)


def decode_batch(rows: RowSettings, state: DecodeState, block_size: int) -> Batch:
    """The forward's input of the state's next step; done rows write to slot -1."""
    B = state.token_ids.shape[0]
    block = jnp.take_along_axis(rows.block_tables, (state.positions // block_size)[:, None], axis=1)[:, 0]
    slots = jnp.where(state.is_done, -1, block * block_size + state.positions % block_size)
    return Batch(token_ids=state.token_ids, positions=state.positions, slot_mapping=slots,
                 logits_indices=jnp.arange(B, dtype=jnp.int32), block_tables=rows.block_tables,
                 seq_lens=jnp.where(state.is_done, 0, state.positions + 1))


def decode_step(params: Any, kv_cache: tuple[KVCache, ...], rows: RowSettings, state: DecodeState,
                cfg: ModelConfig, backend: str,
                block_size: int) -> tuple[tuple[KVCache, ...], DecodeState, SamplerOutput]:
    """One step: forward, sample, stop masks, next input. Done rows are left unchanged."""
    hidden, kv_cache = forward(params, kv_cache, decode_batch(rows, state, block_size), cfg, backend)
    logits = compute_logits(params, hidden, cfg.final_logit_softcapping)
    sampled = sample_switched(logits, step_metadata(rows, state), rows.num_logprobs)
    live = ~state.is_done
    num_out = state.num_out + live
    B = num_out.shape[0]
    output_ids = state.output_ids.at[jnp.arange(B), jnp.where(live, state.num_out, -1)].set(
        sampled.token_ids, mode="drop")
    is_done = state.is_done | is_stop(rows, sampled.token_ids, num_out)
    new = DecodeState(token_ids=jnp.where(live, sampled.token_ids, state.token_ids),
                      positions=state.positions + live, num_out=num_out, output_ids=output_ids,
                      is_done=is_done)
    return kv_cache, new, sampled


def multi_step_decode(params: Any, kv_cache: tuple[KVCache, ...], rows: RowSettings, state: DecodeState,
                      num_steps: jax.Array, cfg: ModelConfig, backend: str = "reference",
                      max_steps: int = 16,
                      block_size: int = 16) -> tuple[tuple[KVCache, ...], DecodeState, MultiStepOutput]:
    """Run up to `num_steps` (<= `max_steps`, static) decode steps of every row.

    `block_size` is the cache's tokens per block (static; each backend lays its cache out
    its own way, so it is not read from the cache's shape).

    The host must have reserved KV slots for positions `state.positions` up to
    `state.positions + num_steps - 1` of every live row in `rows.block_tables`.

    Returns:
        kv_cache: the cache with every step's keys and values written.
        state: the state after the last step (rows done at the end are marked so).
        output: the steps' tokens per row.
    """
    B = state.token_ids.shape[0]
    k = top_width(cfg.vocab_size)
    out = MultiStepOutput(token_ids=jnp.full((B, max_steps), -1, jnp.int32),
                          logprobs=jnp.zeros((B, max_steps), jnp.float32),
                          ranks=jnp.zeros((B, max_steps), jnp.int32),
                          top_ids=jnp.zeros((B, max_steps, k), jnp.int32),
                          top_logprobs=jnp.zeros((B, max_steps, k), jnp.float32),
                          num_tokens=jnp.zeros(B, jnp.int32))

    # On the reference backend each layer's context is read from the pages once, before the
    # loop (`models.multi_step_attention`): within the call it never changes. A one-step
    # program reads every block once either way, and the copy would only add to it.
    opened = max_steps > 1 and backend == "reference" and multi_step_attention.fits(kv_cache, rows.block_tables)
    if opened:
        kv_cache = tuple(multi_step_attention.open_multi_step(c, rows.block_tables, state.positions,
                                                              layer.k_scale, layer.v_scale)
                         for c, layer in zip(kv_cache, params.layers))
    step_backend = "reference_multi_step" if opened else backend

    def running(carry: tuple) -> jax.Array:
        k, _, state, _ = carry
        return (k < jnp.minimum(num_steps, max_steps)) & ~jnp.all(state.is_done)

    def body(carry: tuple) -> tuple:
        k, kv_cache, state, out = carry
        live = ~state.is_done
        kv_cache, state, sampled = decode_step(params, kv_cache, rows, state, cfg, step_backend, block_size)
        column = jnp.where(live, k, max_steps)  # done rows: out of bounds, dropped
        rows_ = jnp.arange(B)
        out = MultiStepOutput(
            token_ids=out.token_ids.at[rows_, column].set(sampled.token_ids, mode="drop"),
            logprobs=out.logprobs.at[rows_, column].set(sampled.logprobs, mode="drop"),
            ranks=out.ranks.at[rows_, column].set(sampled.ranks, mode="drop"),
            top_ids=out.top_ids.at[rows_, column].set(sampled.top_ids, mode="drop"),
            top_logprobs=out.top_logprobs.at[rows_, column].set(sampled.top_logprobs, mode="drop"),
            num_tokens=out.num_tokens + live)
        return k + 1, kv_cache, state, out

    _, kv_cache, state, out = jax.lax.while_loop(running, body, (jnp.int32(0), kv_cache, state, out))
    if opened:
        kv_cache = tuple(c.pages for c in kv_cache)
    return kv_cache, state, out
