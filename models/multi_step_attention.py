"""Decode attention inside a multi-step decode (reference backend): the context read once.

Within one multi-step decode (K decode steps in one call) every row reads the same blocks
(the scheduler reserved the slots of all K steps before it), and only one slot per row
changes per step. `open_multi_step` gathers each row's blocks from the pages once, laid
out for the two dots of decode attention (keys `[B, K, Dh, C]`, values `[B, K, C, Dh]`,
C = the block table's slots); each step writes its key and value to the pages and to its
row's column of that copy, and attends over the copy. The pages are written every step,
so the cache after the call is what step-by-step decoding leaves.

Why: a per-step read of the pages is a block gather plus a relayout for the batched dots,
and on XLA's CPU backend that relayout, not the arithmetic, is the cost; the same maths on
keys already laid out `[B, K, Dh, C]` skips it (`benchmarks/decode_profile.py` times both
per layer, beside the whole multi-step decode).

The copy costs memory, `context_bytes` per call with every layer at once: `fits` keeps
calls above `CONTEXT_BUDGET_BYTES` on the per-step reader. It costs time too, one gather
per call: one-step calls never open it (`runner.device.model_runner.multi_step_program`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp

from models.attention import gather_blocks
from models.attention import write_kv as write_pages
from models.attention_spec import AttentionSpec, capped, default_spec, in_window
from models.kv_codec import MASKED, dequantise, quantise
from state.batch import Batch
from models.kv_cache import KVCache

# Largest context copy (all layers, keys and values, float32) a multi-step decode may hold:
# room for an RL rollout's batch (W1-R: 128 rows of 352 tokens need 0.74 GB), whose
# attention on the per-step reader took twice as long (README, "The RL rollout regime").
CONTEXT_BUDGET_BYTES = 1 << 30


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class MultiStepKV:
    """One layer's KV during a multi-step decode of B rows."""

    pages: KVCache  # the layer's paged cache ([P, S, K, Dh]), written every step
    keys: Any  # [B, K, Dh, C] f32 each row's slots 0..C-1, in block-table order
    values: Any  # [B, K, C, Dh] f32
    start: Any  # [B] i32 each row's first position in the call
    step: Any  # [] i32 steps written so far: a live row writes position start + step


def context_bytes(num_layers: int, block_tables_shape: tuple[int, int], pages_shape: tuple[int, ...]) -> int:
    """Bytes `open_multi_step` holds for one call: keys and values of every layer, float32."""
    B, Nb = block_tables_shape
    _, S, K, Dh = pages_shape
    return num_layers * 2 * B * Nb * S * K * Dh * 4


def fits(kv_cache: tuple[KVCache, ...], block_tables: jax.Array) -> bool:
    """Whether the call's copy stays within `CONTEXT_BUDGET_BYTES` (static)."""
    return context_bytes(len(kv_cache), block_tables.shape, kv_cache[0].k.shape) <= CONTEXT_BUDGET_BYTES


@jax.named_scope("open_multi_step")
def open_multi_step(pages: KVCache, block_tables: jax.Array, start: jax.Array, k_scale: jax.Array,
                    v_scale: jax.Array) -> MultiStepKV:
    """The multi-step decode's view of one layer: every row's blocks gathered once."""
    B, Nb = block_tables.shape
    _, S, K, Dh = pages.k.shape
    keys = gather_blocks(pages.k, block_tables, k_scale).reshape(B, Nb * S, K, Dh)
    values = gather_blocks(pages.v, block_tables, v_scale).reshape(B, Nb * S, K, Dh)
    return MultiStepKV(pages=pages, keys=keys.transpose(0, 2, 3, 1), values=values.transpose(0, 2, 1, 3),
                       start=start, step=jnp.int32(0))


def write_kv(cache: MultiStepKV, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             k_scale: jax.Array, v_scale: jax.Array) -> MultiStepKV:
    """Write the step's `k, v: [B, K, Dh]` to the pages and to each row's column of the copy.

    The copy keeps what the pages store, read back (FP8 rounding included), so the call
    reads the values a step-by-step decode would. Rows with slot -1 write nothing.
    """
    pages = write_pages(cache.pages, k, v, slot_mapping, k_scale, v_scale)
    B, C = cache.keys.shape[0], cache.keys.shape[3]
    rows = jnp.arange(B)
    column = jnp.where(slot_mapping < 0, C, cache.start + cache.step)  # C: out of bounds, dropped
    stored_k = dequantise(quantise(k, k_scale, pages.k.dtype), k_scale)
    stored_v = dequantise(quantise(v, v_scale, pages.v.dtype), v_scale)
    keys = cache.keys.at[rows, :, :, column].set(stored_k, mode="drop")
    values = cache.values.at[rows, :, column, :].set(stored_v, mode="drop")
    return replace(cache, pages=pages, keys=keys, values=values, step=cache.step + 1)


def paged_attention(q: jax.Array, cache: MultiStepKV, batch: Batch, k_scale: jax.Array,
                    v_scale: jax.Array, spec: AttentionSpec | None = None) -> jax.Array:
    """Attention of each row's query `q: [B, H, Dh]` at `batch.positions` over the copy."""
    B, H, Dh = q.shape
    spec = spec or default_spec(Dh)
    K, C = cache.keys.shape[1], cache.keys.shape[3]
    qg = q.astype(jnp.float32).reshape(B, K, H // K, Dh)
    scores = capped(jnp.einsum("bkgd,bkdc->bkgc", qg, cache.keys) * spec.scale, spec)  # [B, K, G, C]
    visible = in_window(jnp.arange(C)[None, :], batch.positions[:, None], spec)  # [B, C]
    probs = jax.nn.softmax(jnp.where(visible[:, None, None, :], scores, MASKED), axis=-1)
    out = jnp.einsum("bkgc,bkcd->bkgd", probs, cache.values)
    return out.reshape(B, H, Dh).astype(q.dtype)
