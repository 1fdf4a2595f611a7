"""The plain definition of paged attention that the tiled and kernel readers are checked
against: every token of a general batch against every key the batch lists, masked by owner
sequence, position and window. Test code only: it materialises [T, N*S] scores."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from models.attention import gather_blocks
from models.attention_spec import AttentionSpec, capped, default_spec, in_window
from models.kv_cache import KVCache
from models.kv_codec import MASKED
from state.batch import Batch


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
