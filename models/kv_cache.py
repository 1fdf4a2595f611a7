"""The paged KV cache: one `KVCache` record per layer, addressed through block tables.

This module owns the cache layout of every attention backend (`KV_LAYOUTS`): the logical
axes of one layer's K (or V) array, from which its shape (`kv_cache_specs`) and its
sharding (`runner.device.sharding.kv_cache_shardings`) are both derived. The reference backend
stores `[P, S, K, Dh]` (blocks, slots per block, KV heads, head dim); the Pallas GPU
backend keeps JAX's paged-attention kernel layout `[K, P, S, Dh]` (`models.pallas_attention`).

The token at position `pos` of a sequence lives at
`slot = block_table[pos // S] * S + pos % S`. A tuple of per-layer arrays (not one stacked
array) lets the donated cache be updated in place layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from state.batch import cdiv

from state.config import ATTENTION_BACKENDS

if TYPE_CHECKING:
    from state.config import RunnerConfig

# The KV budget on hosts that report no device memory (CPU): `gpu_memory_utilization` is a
# fraction of it, and the default cache never exceeds it.
HOST_KV_BUDGET_BYTES = 2 << 30

# Attention backend -> logical axes of one layer's K (or V) cache array.
KV_LAYOUTS: dict[str, tuple[str, ...]] = {
    "reference": ("kv_blocks", "block_slots", "kv_heads", "head_dim"),
    "pallas": ("kv_heads", "kv_blocks", "block_slots", "head_dim"),
}
assert tuple(KV_LAYOUTS) == ATTENTION_BACKENDS, "every attention backend owns one cache layout"


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    k: Any  # laid out as KV_LAYOUTS[backend] says
    v: Any


def kv_axes(config: RunnerConfig) -> tuple[str, ...]:
    """Logical axes of one layer's K (or V) array under the configured backend."""
    return KV_LAYOUTS[config.cache_config.attention_backend]


def kv_axis_sizes(config: RunnerConfig, num_blocks: int) -> dict[str, int]:
    """Size of each logical cache axis."""
    m = config.model_config
    return {"kv_blocks": num_blocks, "block_slots": config.cache_config.block_size,
            "kv_heads": m.num_key_value_heads, "head_dim": m.head_dim}


def kv_cache_specs(config: RunnerConfig, num_blocks: int) -> tuple[KVCache, ...]:
    """Abstract per-layer cache arrays for `num_blocks` blocks."""
    sizes = kv_axis_sizes(config, num_blocks)
    leaf = jax.ShapeDtypeStruct(tuple(sizes[a] for a in kv_axes(config)), jnp.dtype(config.kv_cache_dtype))
    return tuple(KVCache(k=leaf, v=leaf) for _ in range(config.model_config.num_hidden_layers))


def bytes_per_block(config: RunnerConfig) -> int:
    """Device bytes one block costs across all layers, K and V."""
    m = config.model_config
    per_layer = 2 * m.num_key_value_heads * config.cache_config.block_size * m.head_dim
    return per_layer * m.num_hidden_layers * jnp.dtype(config.kv_cache_dtype).itemsize


def blocks_per_seq(config: RunnerConfig) -> int:
    """Blocks one request of `max_model_len` tokens needs."""
    return cdiv(config.scheduler_config.max_model_len, config.cache_config.block_size)


def resolve_num_blocks(config: RunnerConfig, free_device_bytes: int | None) -> int:
    """How many KV blocks to allocate.

    `cache_config.num_blocks` wins when set. Otherwise the budget is
    `cache_config.memory_budget_bytes`; else, where the backend reports its memory (GPUs),
    the `gpu_memory_utilization` fraction (default 0.9) of the memory free once the
    weights are placed; else (CPU, which reports none) that fraction of
    `HOST_KV_BUDGET_BYTES` when it is set, and by default enough blocks for `max_num_seqs`
    requests of `max_model_len` tokens, capped at `HOST_KV_BUDGET_BYTES`.
    """
    cache = config.cache_config
    if cache.num_blocks is not None:
        return cache.num_blocks
    utilization = cache.gpu_memory_utilization
    if cache.memory_budget_bytes is not None:
        budget = cache.memory_budget_bytes
    elif free_device_bytes is not None:
        budget = int((0.9 if utilization is None else utilization) * free_device_bytes)
    elif utilization is not None:
        budget = int(utilization * HOST_KV_BUDGET_BYTES)
    else:
        want = blocks_per_seq(config) * config.scheduler_config.max_num_seqs
        budget = min(want * bytes_per_block(config), HOST_KV_BUDGET_BYTES)
    num_blocks = budget // bytes_per_block(config)
    if num_blocks < blocks_per_seq(config):
        raise ValueError(
            f"KV cache budget of {budget} bytes holds {num_blocks} blocks, fewer than the "
            f"{blocks_per_seq(config)} one request of max_model_len="
            f"{config.scheduler_config.max_model_len} needs; raise the budget or lower max_model_len")
    return int(num_blocks)


def allocate_kv_cache(config: RunnerConfig, num_blocks: int,
                      shardings: Any = None) -> tuple[KVCache, ...]:
    """Zero-filled cache arrays, placed on `shardings` (a matching tree) when given."""
    specs = kv_cache_specs(config, num_blocks)
    if shardings is None:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs)
    return jax.tree.map(lambda s, sh: jnp.zeros(s.shape, s.dtype, device=sh), specs, shardings)
