"""Paged attention over the per-layer KV cache (the pure-jnp reference backend).

Cache layout of this backend, per layer: `k, v: [P, S, K, Dh]`, block-major, so one block
of all heads is one contiguous row of `S*K*Dh` values: reading a sequence's blocks is a
row gather, the cheapest access XLA's CPU backend has (about 3x a per-head gather).

Two readers share the layout:
    flat_attention    any mix of prefills, prefill chunks and decodes (`Batch.key_block_*`)
    decode_attention  one query per sequence (`Batch.block_tables`, `Batch.seq_lens`)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from state.batch import Batch
from state.kv_cache import KVCache

# float8_e4m3fn has no infinity: a cast turns anything beyond +-448 into NaN, so values are
# clipped first, as CUDA's saturating conversion does.
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)
# A finite mask value keeps fully masked padding rows free of NaN.
MASKED = float(jnp.finfo(jnp.float32).min)


class AttentionSpec(NamedTuple):
    """The static maths of one layer's attention (hashable: a compile-time constant)."""

    scale: float  # scores = q.k * scale
    softcap: float | None = None  # scores = softcap * tanh(scores / softcap) (Gemma 2)
    window: int | None = None  # a query at p sees keys at p - window < position <= p


def default_spec(head_dim: int) -> AttentionSpec:
    return AttentionSpec(scale=head_dim ** -0.5)


def capped(scores: jax.Array, spec: AttentionSpec) -> jax.Array:
    """Scaled scores, soft-capped where the layer caps them."""
    if spec.softcap is None:
        return scores
    return spec.softcap * jnp.tanh(scores / spec.softcap)


def in_window(key_pos: jax.Array, query_pos: jax.Array, spec: AttentionSpec) -> jax.Array:
    """Causal visibility of keys to queries (broadcast shapes), within the layer's window."""
    visible = key_pos <= query_pos
    if spec.window is not None:
        visible = visible & (key_pos > query_pos - spec.window)
    return visible


def quantise(x: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Values as stored in a cache of `dtype`: FP8 stores x / scale, saturated."""
    if dtype == jnp.float8_e4m3fn:
        return jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(dtype)
    return x.astype(dtype)


def dequantise(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Stored values back to float32 (FP8: times the scale)."""
    if x.dtype == jnp.float8_e4m3fn:
        return x.astype(jnp.float32) * scale
    return x.astype(jnp.float32)


def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             k_scale: jax.Array, v_scale: jax.Array) -> KVCache:
    """Scatter `k, v: [T, K, Dh]` into their slots; slot -1 writes nothing."""
    P, S, K, Dh = cache.k.shape
    # Negative indices would wrap to the last slot; point padding past the end and drop it.
    slots = jnp.where(slot_mapping < 0, P * S, slot_mapping)

    def scatter(pages: jax.Array, new: jax.Array, scale: jax.Array) -> jax.Array:
        rows = pages.reshape(P * S, K, Dh)
        rows = rows.at[slots].set(quantise(new, scale, pages.dtype), mode="drop")
        return rows.reshape(P, S, K, Dh)

    return KVCache(k=scatter(cache.k, k, k_scale), v=scatter(cache.v, v, v_scale))


def gather_blocks(pages: jax.Array, block_ids: jax.Array, scale: jax.Array) -> jax.Array:
    """[*ids, S, K, Dh] float32: the listed blocks, one contiguous row each."""
    P, S, K, Dh = pages.shape
    rows = pages.reshape(P, S * K * Dh)[block_ids]
    return dequantise(rows, scale).reshape(*block_ids.shape, S, K, Dh)


def flat_attention(q: jax.Array, cache: KVCache, batch: Batch, k_scale: jax.Array,
                   v_scale: jax.Array, gather: Callable = gather_blocks,
                   spec: AttentionSpec | None = None) -> jax.Array:
    """Causal attention of `q: [T, H, Dh]` over the cached context of each token's sequence.

    Reads the N blocks the batch lists once, then masks by owner sequence and position, so
    prefill chunks and decodes of different lengths share one computation. `gather` reads
    blocks as `[N, S, K, Dh]` float32 from the backend's layout.
    """
    T, H, Dh = q.shape
    spec = spec or default_spec(Dh)
    N = batch.key_block_ids.shape[0]
    keys = gather(cache.k, batch.key_block_ids, k_scale)  # [N, S, K, Dh]
    values = gather(cache.v, batch.key_block_ids, v_scale)
    S, K = keys.shape[1], keys.shape[2]
    keys, values = keys.reshape(N * S, K, Dh), values.reshape(N * S, K, Dh)
    key_pos = (batch.key_block_pos[:, None] + jnp.arange(S, dtype=jnp.int32)).reshape(N * S)
    key_seq = jnp.repeat(batch.key_block_seq, S)
    visible = (key_seq[None, :] == batch.token_seq[:, None]) & in_window(
        key_pos[None, :], batch.positions[:, None], spec)  # [T, N*S]

    qg = q.astype(jnp.float32).reshape(T, K, H // K, Dh)
    scores = capped(jnp.einsum("tkgd,nkd->kgtn", qg, keys) * spec.scale, spec)
    scores = jnp.where(visible[None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("kgtn,nkd->tkgd", probs, values)
    return out.reshape(T, H, Dh).astype(q.dtype)


def decode_attention(q: jax.Array, cache: KVCache, batch: Batch, k_scale: jax.Array,
                     v_scale: jax.Array, spec: AttentionSpec | None = None) -> jax.Array:
    """Attention of one query per sequence, `q: [B, H, Dh]`, over its first seq_lens keys.

    Written as broadcast-multiply-and-sum rather than einsum: XLA's CPU backend fuses it
    with the block gather, where a batched dot of G x Dh by Dh x N runs about 2x slower.
    """
    B, H, Dh = q.shape
    spec = spec or default_spec(Dh)
    _, S, K, _ = cache.k.shape
    Nb = batch.block_tables.shape[1]
    keys = gather_blocks(cache.k, batch.block_tables, k_scale).reshape(B, Nb * S, K, 1, Dh)
    values = gather_blocks(cache.v, batch.block_tables, v_scale).reshape(B, Nb * S, K, 1, Dh)
    qg = q.astype(jnp.float32).reshape(B, 1, K, H // K, Dh)
    scores = capped((qg * keys).sum(-1) * spec.scale, spec)  # [B, Nb*S, K, G]
    # The query is each sequence's last position, seq_lens - 1.
    visible = in_window(jnp.arange(Nb * S)[None, :], batch.seq_lens[:, None] - 1, spec)  # [B, Nb*S]
    scores = jnp.where(visible[:, :, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=1)
    out = (probs[..., None] * values).sum(1)  # [B, K, G, Dh]
    return out.reshape(B, H, Dh).astype(q.dtype)


def paged_attention(q: jax.Array, cache: KVCache, batch: Batch, k_scale: jax.Array,
                    v_scale: jax.Array, spec: AttentionSpec | None = None) -> jax.Array:
    """The reader the batch was prepared for (its structure is static under jit)."""
    if batch.is_decode:
        return decode_attention(q, cache, batch, k_scale, v_scale, spec)
    return flat_attention(q, cache, batch, k_scale, v_scale, spec=spec)
