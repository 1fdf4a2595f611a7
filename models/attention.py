"""Paged attention over the per-layer KV cache: the write of new keys and values, and the
pure-jnp reference attention that serves any mix of prefills and decodes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from state.batch import Batch
from state.kv_cache import KVCache

# float8_e4m3fn has no infinity: a cast turns anything beyond +-448 into NaN, so values are
# clipped first, as CUDA's saturating conversion does.
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)


def _quantise(x: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    if dtype == jnp.float8_e4m3fn:
        return jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(dtype)
    return x.astype(dtype)


def _dequantise(x: jax.Array, scale: jax.Array) -> jax.Array:
    if x.dtype == jnp.float8_e4m3fn:
        return x.astype(jnp.float32) * scale
    return x.astype(jnp.float32)


def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             k_scale: jax.Array, v_scale: jax.Array) -> KVCache:
    """Scatter `k, v: [T, K, Dh]` into their slots; slot -1 writes nothing."""
    K, P, S, Dh = cache.k.shape
    # Negative indices would wrap to the last slot; point padding past the end and drop it.
    slots = jnp.where(slot_mapping < 0, P * S, slot_mapping)

    def scatter(pages: jax.Array, new: jax.Array, scale: jax.Array) -> jax.Array:
        flat = pages.reshape(K, P * S, Dh)
        new = _quantise(new, scale, pages.dtype).transpose(1, 0, 2)  # [K, T, Dh]
        return flat.at[:, slots].set(new, mode="drop").reshape(K, P, S, Dh)

    return KVCache(k=scatter(cache.k, k, k_scale), v=scatter(cache.v, v, v_scale))


def paged_attention(q: jax.Array, cache: KVCache, batch: Batch, k_scale: jax.Array,
                    v_scale: jax.Array) -> jax.Array:
    """Causal attention of `q: [T, H, Dh]` over the cached context of each token's sequence.

    Reads the N blocks listed in the batch once, then masks by owner sequence and position,
    so prefill chunks and decodes of different lengths share one computation. The new
    tokens' keys must already be written (see `write_kv`).
    """
    T, H, Dh = q.shape
    K, _, S, _ = cache.k.shape
    N = batch.key_block_ids.shape[0]
    keys = _dequantise(cache.k[:, batch.key_block_ids], k_scale).reshape(K, N * S, Dh)
    values = _dequantise(cache.v[:, batch.key_block_ids], v_scale).reshape(K, N * S, Dh)
    key_pos = (batch.key_block_pos[:, None] + jnp.arange(S, dtype=jnp.int32)).reshape(N * S)
    key_seq = jnp.repeat(batch.key_block_seq, S)
    visible = (key_seq[None, :] == batch.token_seq[:, None]) & (
        key_pos[None, :] <= batch.positions[:, None])  # [T, N*S]

    qg = q.astype(jnp.float32).reshape(T, K, H // K, Dh)
    scores = jnp.einsum("tkgd,knd->kgtn", qg, keys) * (Dh ** -0.5)
    # A finite mask value keeps fully masked padding rows free of NaN.
    scores = jnp.where(visible[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("kgtn,knd->tkgd", probs, values)
    return out.reshape(T, H, Dh).astype(q.dtype)
