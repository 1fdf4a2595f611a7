"""The GPU attention backend: JAX's Pallas paged-attention kernel for decode steps, tiled
flash attention for general steps.

Cache layout of this backend, per layer: `k, v: [K, P, S, Dh]`, the kernel's own page
layout, so a decode step hands the cache to the kernel as it is. General steps (prefills,
chunks, mixed batches) run `models.flash_attention`, which reads each sequence's own blocks
tile by tile and never scores a token against every listed key (JAX ships no GPU prefill
paged kernel). The kernel has no sliding window and no soft-capping: decode steps of
layers with either (Mistral/Qwen2 windows, Gemma's local layers and capped scores) take
the same tiled path, which masks the window and skips blocks behind it; a layer's own
attention scale is applied to the queries before the kernel. On a CPU the decode kernel
runs in interpret mode (slow; for tests). FP8
caches are not offered on this backend (the kernel's quantised path takes per-token
integer scales, not a per-layer float8 scale).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from models.attention_spec import AttentionSpec, default_spec
from models.kv_codec import quantise
from models.flash_attention import flash_attention
from state.batch import Batch
from models.kv_cache import KVCache

with warnings.catch_warnings():
    # JAX 0.11 marks the module deprecated on import; it is still the GPU decode kernel
    # JAX ships, and the version pin (<0.12) keeps it available.
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as pallas_kernel

# Kernel tiling: sequences are split into at most this many partitions processed in
# parallel, each walking its pages this many at a time.
MAX_K_SPLITS = 16
MAX_PAGES_PER_COMPUTE_BLOCK = 8
# Triton's tiles are powers of two and its matrix product needs every side >= 16: the
# kernel's tiles are head_dim wide and (pages per compute block) x block_size long.
MIN_TRITON_DIM = 16


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


def _power_of_two_at_least(n: int, minimum: int) -> bool:
    return n >= minimum and n & (n - 1) == 0


def kernel_runs(head_dim: int, block_size: int, platform: str) -> bool:
    """Whether the Pallas decode kernel can compile for these sizes on `platform`.

    Interpret mode (CPU) takes any size; Triton needs power-of-two tiles of at least 16.
    """
    if platform != "gpu":
        return True
    return (_power_of_two_at_least(head_dim, MIN_TRITON_DIM)
            and _power_of_two_at_least(block_size, MIN_TRITON_DIM))


def decode_as_general(batch: Batch, block_size: int) -> Batch:
    """The decode batch as a general one: token i is sequence i's last position, and each
    sequence's block table row is its listed blocks.

    A padding row keeps its own sequence index on its blocks, so the listing stays ordered
    by sequence as the tiled reader needs; its token is marked padding, so nothing sees them.
    """
    B, Nb = batch.block_tables.shape
    seq = jnp.arange(B, dtype=jnp.int32)
    return Batch(token_ids=batch.token_ids, positions=jnp.maximum(batch.seq_lens - 1, 0),
                 slot_mapping=batch.slot_mapping, logits_indices=batch.logits_indices,
                 token_seq=jnp.where(batch.seq_lens > 0, seq, -1),
                 key_block_ids=batch.block_tables.reshape(B * Nb),
                 key_block_seq=jnp.repeat(seq, Nb),
                 key_block_pos=jnp.tile(jnp.arange(Nb, dtype=jnp.int32) * block_size, B))


def decode_attention(q: jax.Array, cache: KVCache, batch: Batch, scale: float | None = None) -> jax.Array:
    """One query per sequence through the Pallas kernel; `q: [B, H, Dh]`."""
    k_splits, pages_per_compute_block = _splits(batch.block_tables.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scaled = (q.astype(jnp.float32) * scale).astype(cache.k.dtype)
    out = pallas_kernel.paged_attention(
        scaled, cache.k, cache.v, batch.block_tables, batch.seq_lens,
        k_splits=k_splits, pages_per_compute_block=pages_per_compute_block,
        interpret=jax.devices()[0].platform != "gpu")
    return out.astype(q.dtype)


def _splits(Nb: int) -> tuple[int, int]:
    """(k_splits, pages_per_compute_block) for `Nb` blocks per row: the kernel needs Nb to
    be a multiple of k_splits, and each split's pages a multiple of the compute block (Nb
    is a power of two, or the blocks of one `max_model_len` request, which need not be)."""
    k_splits = math.gcd(Nb, MAX_K_SPLITS)
    per_split = Nb // k_splits
    return k_splits, max(d for d in range(1, MAX_PAGES_PER_COMPUTE_BLOCK + 1) if per_split % d == 0)


def kernel_serves(spec: AttentionSpec) -> bool:
    """Whether the decode kernel computes this layer's attention (it has no window or cap)."""
    return spec.window is None and spec.softcap is None


def paged_attention(q: jax.Array, cache: KVCache, batch: Batch, k_scale: jax.Array,
                    v_scale: jax.Array, spec: AttentionSpec | None = None) -> jax.Array:
    S, Dh = cache.k.shape[2], cache.k.shape[3]
    spec = spec or default_spec(Dh)
    if batch.is_decode:
        if kernel_serves(spec) and kernel_runs(Dh, S, jax.devices()[0].platform):
            return decode_attention(q, cache, batch, spec.scale)
        # Sizes Triton cannot tile (small test models) and windowed or capped layers take
        # the tiled jnp path instead.
        return flash_attention(q, cache, decode_as_general(batch, S), k_scale, v_scale, spec=spec)
    return flash_attention(q, cache, batch, k_scale, v_scale, spec=spec)
