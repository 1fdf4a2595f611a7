"""The GPU attention backend: JAX's Pallas paged-attention kernel for decode steps.

Cache layout of this backend, per layer: `k, v: [K, P, S, Dh]`, the kernel's own page
layout, so a decode step hands the cache to the kernel as it is. General steps (prefills,
chunks, mixed batches) gather their blocks and run the reference masked attention: JAX
ships no GPU prefill paged kernel. On a CPU the kernel runs in interpret mode (slow;
for tests). FP8 caches are not offered on this backend (the kernel's quantised path takes
per-token integer scales, not a per-layer float8 scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import paged_attention as pallas_kernel

from models.attention import dequantise, flat_attention, quantise
from state.batch import Batch
from state.kv_cache import KVCache

# Kernel tiling: sequences are split into at most this many partitions processed in
# parallel, each walking its pages this many at a time.
MAX_K_SPLITS = 16
MAX_PAGES_PER_COMPUTE_BLOCK = 8


def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             k_scale: jax.Array, v_scale: jax.Array) -> KVCache:
    """Scatter `k, v: [T, K, Dh]` into their slots; slot -1 writes nothing."""
    K, P, S, Dh = cache.k.shape
    slots = jnp.where(slot_mapping < 0, P * S, slot_mapping)

    def scatter(pages: jax.Array, new: jax.Array, scale: jax.Array) -> jax.Array:
        flat = pages.reshape(K, P * S, Dh)
        new = quantise(new, scale, pages.dtype).transpose(1, 0, 2)  # [K, T, Dh]
        return flat.at[:, slots].set(new, mode="drop").reshape(K, P, S, Dh)

    return KVCache(k=scatter(cache.k, k, k_scale), v=scatter(cache.v, v, v_scale))


def gather_blocks(pages: jax.Array, block_ids: jax.Array, scale: jax.Array) -> jax.Array:
    """[N, S, K, Dh] float32 blocks from the kernel layout."""
    return dequantise(pages[:, block_ids], scale).transpose(1, 2, 0, 3)


def decode_attention(q: jax.Array, cache: KVCache, batch: Batch) -> jax.Array:
    """One query per sequence through the Pallas kernel; `q: [B, H, Dh]`."""
    Nb = batch.block_tables.shape[1]
    k_splits = min(MAX_K_SPLITS, Nb)
    scaled = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(cache.k.dtype)
    out = pallas_kernel.paged_attention(
        scaled, cache.k, cache.v, batch.block_tables, batch.seq_lens,
        k_splits=k_splits, pages_per_compute_block=min(MAX_PAGES_PER_COMPUTE_BLOCK, Nb // k_splits),
        interpret=jax.devices()[0].platform != "gpu")
    return out.astype(q.dtype)


def paged_attention(q: jax.Array, cache: KVCache, batch: Batch, k_scale: jax.Array,
                    v_scale: jax.Array) -> jax.Array:
    if batch.is_decode:
        return decode_attention(q, cache, batch)
    return flat_attention(q, cache, batch, k_scale, v_scale, gather=gather_blocks)
