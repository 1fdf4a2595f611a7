"""Paged attention over the per-layer KV cache (the pure-jnp reference backend).

Cache layout of this backend, per layer: `k, v: [P, S, K, Dh]`, block-major, so one block
of all heads is one contiguous row of `S*K*Dh` values: reading a sequence's blocks is a
row gather, the cheapest access XLA's CPU backend has (about 3x a per-head gather).

Readers of the layout:
    flash_attention   any mix of prefills, prefill chunks and decodes (`Batch.key_block_*`),
                      tile by tile, each token against its own sequence's blocks only
                      (`models.flash_attention`): general steps. The tests check it against
                      the plain definition, every token against every listed key
                      (`tests/models/reference_attention.py`)
    decode_attention  one query per sequence (`Batch.block_tables`, `Batch.seq_lens`)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.attention_spec import AttentionSpec, capped, default_spec, in_window
from models.flash_attention import flash_attention
from models.kv_codec import MASKED, dequantise, quantise
from state.batch import Batch
from models.kv_cache import KVCache

def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             k_scale: jax.Array, v_scale: jax.Array) -> KVCache:
    """Scatter `k, v: [T, K, Dh]` into their slots; slot -1 writes nothing."""
    P, S, K, Dh = cache.k.shape
    # Indexed by (block, offset) on the 4-d cache, not by slot on a [P*S] reshape: around a
    # reshape XLA's CPU backend copied the whole cache whenever attention then read it.
    # Negative slots would wrap to the last block; they point past the end and are dropped.
    blocks = jnp.where(slot_mapping < 0, P, slot_mapping // S)
    offsets = slot_mapping % S

    def scatter(pages: jax.Array, new: jax.Array, scale: jax.Array) -> jax.Array:
        return pages.at[blocks, offsets].set(quantise(new, scale, pages.dtype), mode="drop")

    return KVCache(k=scatter(cache.k, k, k_scale), v=scatter(cache.v, v, v_scale))


def gather_blocks(pages: jax.Array, block_ids: jax.Array, scale: jax.Array) -> jax.Array:
    """[*ids, S, K, Dh] float32: the listed blocks, one contiguous row each."""
    P, S, K, Dh = pages.shape
    rows = pages.reshape(P, S * K * Dh)[block_ids]
    return dequantise(rows, scale).reshape(*block_ids.shape, S, K, Dh)


def decode_attention(q: jax.Array, cache: KVCache, batch: Batch, k_scale: jax.Array,
                     v_scale: jax.Array, spec: AttentionSpec | None = None) -> jax.Array:
    """Attention of one query per sequence, `q: [B, H, Dh]`, over its first seq_lens keys.

    Two batched dots per KV head group, keys taken in the cache's own `[N, K, Dh]` order,
    rather than a broadcast multiply and sum, which materialises `[B, N, K, G, Dh]` products.
    """
    B, H, Dh = q.shape
    spec = spec or default_spec(Dh)
    _, S, K, _ = cache.k.shape
    Nb = batch.block_tables.shape[1]
    keys = gather_blocks(cache.k, batch.block_tables, k_scale).reshape(B, Nb * S, K, Dh)
    values = gather_blocks(cache.v, batch.block_tables, v_scale).reshape(B, Nb * S, K, Dh)
    qg = q.astype(jnp.float32).reshape(B, K, H // K, Dh)
    scores = capped(jnp.einsum("bkgd,bnkd->bkgn", qg, keys) * spec.scale, spec)  # [B, K, G, Nb*S]
    # The query is each sequence's last position, seq_lens - 1.
    visible = in_window(jnp.arange(Nb * S)[None, :], batch.seq_lens[:, None] - 1, spec)  # [B, Nb*S]
    scores = jnp.where(visible[:, None, None, :], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgn,bnkd->bkgd", probs, values)
    return out.reshape(B, H, Dh).astype(q.dtype)


def paged_attention(q: jax.Array, cache: KVCache, batch: Batch, k_scale: jax.Array,
                    v_scale: jax.Array, spec: AttentionSpec | None = None) -> jax.Array:
    """The reader the batch was prepared for (its structure is static under jit)."""
    if batch.is_decode:
        return decode_attention(q, cache, batch, k_scale, v_scale, spec)
    return flash_attention(q, cache, batch, k_scale, v_scale, heads_first=False, spec=spec)
