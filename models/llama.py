"""The llama-like decoder core shared by every family: Llama, Mistral and Phi-3 as they
are, Qwen2 with q/k/v biases, Qwen3 with q/k norm, Qwen3-MoE and Mixtral with experts
(`models.moe`) in their sparse layers.

Pure functions of (params, kv_cache, batch, cfg): no state, no I/O, no jit placement.
`cfg` is static (hashable) and every array is an argument, so a weight swap never
recompiles and the compiled program never embeds weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models import attention, pallas_attention
from models.moe import moe_mlp
from models.rope import apply_rope, rope_tables
from state.batch import Batch
from state.config import ModelConfig
from state.kv_cache import KVCache
from state.params import LayerParams, Params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 as the HF checkpoints were trained."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


# Attention backends by name: each owns its KV layout and offers write_kv and paged_attention.
BACKENDS = {"reference": attention, "pallas": pallas_attention}


def _attention_block(layer: LayerParams, x: jax.Array, cache: KVCache, batch: Batch,
                     cos: jax.Array, sin: jax.Array, cfg: ModelConfig,
                     backend: str) -> tuple[jax.Array, KVCache]:
    T = x.shape[0]
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
    q = _project(h, layer.wq, layer.bq).reshape(T, H, Dh)
    k = _project(h, layer.wk, layer.bk).reshape(T, K, Dh)
    v = _project(h, layer.wv, layer.bv).reshape(T, K, Dh)
    if cfg.qk_norm:
        q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ops = BACKENDS[backend]
    cache = ops.write_kv(cache, k, v, batch.slot_mapping, layer.k_scale, layer.v_scale)
    o = ops.paged_attention(q, cache, batch, layer.k_scale, layer.v_scale)  # [T, H, Dh]
    return x + o.reshape(T, H * Dh) @ layer.wo, cache


def _project(h: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """`h @ w`, plus the bias of families that have one (Qwen2)."""
    return h @ w if b is None else h @ w + b


def _mlp_block(layer: LayerParams, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
    if layer.router is not None:  # a sparse layer
        return x + moe_mlp(h, layer.router, layer.moe_gate, layer.moe_up, layer.moe_down, cfg.moe)
    return x + (jax.nn.silu(h @ layer.w_gate) * (h @ layer.w_up)) @ layer.w_down


def forward(params: Params, kv_cache: tuple[KVCache, ...], batch: Batch, cfg: ModelConfig,
            backend: str = "reference") -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Run the decoder over the step's tokens.

    `backend` names the attention implementation (and so the KV layout): "reference" or
    "pallas".

    Returns:
        hidden: [T, D] final-normed hidden states of every scheduled token.
        kv_cache: the cache with this step's keys and values written.
    """
    x = params.embed[batch.token_ids]  # [T, D]
    cos, sin = rope_tables(batch.positions, cfg)
    new_cache = []
    # A Python loop, not lax.scan: each layer's cache is its own donated buffer, updated in
    # place; scanning over a stacked cache would copy all of it at every layer.
    for layer, cache in zip(params.layers, kv_cache):
        x, cache = _attention_block(layer, x, cache, batch, cos, sin, cfg, backend)
        x = _mlp_block(layer, x, cfg)
        new_cache.append(cache)
    return rms_norm(x, params.final_norm, cfg.rms_norm_eps), tuple(new_cache)


def compute_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """[.., D] -> [.., V] float32 logits; tied models project with the embedding leaf."""
    if params.lm_head is None:
        logits = jnp.einsum("...d,vd->...v", hidden, params.embed)
    else:
        logits = hidden @ params.lm_head
    return logits.astype(jnp.float32)
