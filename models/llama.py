"""The llama-like decoder core shared by every family: Llama, Mistral and Phi-3 as they
are, Qwen2 with q/k/v biases, Qwen3 with q/k norm, Qwen3-MoE and Mixtral with experts
(`models.moe`) in their sparse layers, Gemma 2/3 with their own norm, activation,
embedding scale, norms after attention and MLP, soft-capping and local/global layers.
Sliding windows are per layer (`ModelConfig.window`), static in the Python layer loop.

Pure functions of (params, kv_cache, batch, cfg): no state, no I/O, no jit placement.
`cfg` is static (hashable) and every array is an argument, so a weight swap never
recompiles and the compiled program never embeds weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models import attention, multi_step_attention, pallas_attention
from models.attention import AttentionSpec
from models.moe import moe_mlp
from models.rope import apply_rope, rope_tables
from state.batch import Batch
from state.config import ModelConfig
from models.kv_cache import KVCache
from state.params import LayerParams, Params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, gemma: bool = False) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 as the HF checkpoints were trained.

    Gemma stores `w - 1`: it scales by `1 + w`, still in float32, and casts afterwards.
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if gemma:
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * xf.astype(x.dtype)


def attention_spec(cfg: ModelConfig, layer: int) -> AttentionSpec:
    """Layer `layer`'s attention maths: scale, soft-cap, window."""
    scalar = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
    return AttentionSpec(scale=float(scalar) ** -0.5, softcap=cfg.attn_logit_softcapping,
                         window=cfg.window(layer))


def _norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig) -> jax.Array:
    return rms_norm(x, weight, cfg.rms_norm_eps, cfg.gemma)


# Attention backends by name: each owns its KV layout and offers write_kv and paged_attention.
# "reference_multi_step" is the reference backend inside a multi-step decode: its per-layer
# cache is a `multi_step_attention.MultiStepKV` (the pages plus each row's context, read once).
BACKENDS = {"reference": attention, "pallas": pallas_attention, "reference_multi_step": multi_step_attention}


def _attention_block(layer: LayerParams, x: jax.Array, cache: KVCache, batch: Batch,
                     cos: jax.Array, sin: jax.Array, cfg: ModelConfig, spec: AttentionSpec,
                     backend: str) -> tuple[jax.Array, KVCache]:
    T = x.shape[0]
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = _norm(x, layer.attn_norm, cfg)
    q = _project(h, layer.wq, layer.bq).reshape(T, H, Dh)
    k = _project(h, layer.wk, layer.bk).reshape(T, K, Dh)
    v = _project(h, layer.wv, layer.bv).reshape(T, K, Dh)
    if cfg.qk_norm:
        q = _norm(q, layer.q_norm, cfg)
        k = _norm(k, layer.k_norm, cfg)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ops = BACKENDS[backend]
    with jax.named_scope("attention"):  # names the profile's operations (benchmarks/trace_profile.py)
        cache = ops.write_kv(cache, k, v, batch.slot_mapping, layer.k_scale, layer.v_scale)
        o = ops.paged_attention(q, cache, batch, layer.k_scale, layer.v_scale, spec)  # [T, H, Dh]
    return x + _post_norm(o.reshape(T, H * Dh) @ layer.wo, layer.attn_post_norm, cfg), cache


def _post_norm(y: jax.Array, weight: jax.Array | None, cfg: ModelConfig) -> jax.Array:
    """Gemma normalises each block's output before the residual add."""
    return y if weight is None else _norm(y, weight, cfg)


def _project(h: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """`h @ w`, plus the bias of families that have one (Qwen2)."""
    return h @ w if b is None else h @ w + b


def _mlp_block(layer: LayerParams, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    h = _norm(x, layer.mlp_norm, cfg)
    if layer.router is not None:  # a sparse layer
        return x + moe_mlp(h, layer.router, layer.moe_gate, layer.moe_up, layer.moe_down, cfg.moe)
    y = (ACTIVATIONS[cfg.hidden_act](h @ layer.w_gate) * (h @ layer.w_up)) @ layer.w_down
    return x + _post_norm(y, layer.mlp_post_norm, cfg)


# ModelConfig.hidden_act -> the gate activation (gelu_pytorch_tanh: Gemma's GeGLU).
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


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
    if cfg.gemma:  # the scale rounded to the model dtype first, as transformers does
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, dtype=x.dtype)
    tables = {False: rope_tables(batch.positions, cfg)}
    if cfg.rope_local_theta is not None:  # Gemma 3: local layers rotate with their own base
        tables[True] = rope_tables(batch.positions, cfg, local=True)
    new_cache = []
    # A Python loop, not lax.scan: each layer's cache is its own donated buffer, updated in
    # place; scanning over a stacked cache would copy all of it at every layer. Per-layer
    # differences (window, RoPE table) are static here.
    for i, (layer, cache) in enumerate(zip(params.layers, kv_cache)):
        cos, sin = tables[cfg.rope_local_theta is not None and cfg.window(i) is not None]
        x, cache = _attention_block(layer, x, cache, batch, cos, sin, cfg, attention_spec(cfg, i), backend)
        x = _mlp_block(layer, x, cfg)
        new_cache.append(cache)
    return _norm(x, params.final_norm, cfg), tuple(new_cache)


@jax.named_scope("lm_head")
def compute_logits(params: Params, hidden: jax.Array, softcap: float | None) -> jax.Array:
    """[.., D] -> [.., V] float32 logits; tied models project with the embedding leaf.
    `softcap`: the model's `final_logit_softcapping` (Gemma 2), applied in float32."""
    if params.lm_head is None:
        logits = jnp.einsum("...d,vd->...v", hidden, params.embed)
    else:
        logits = hidden @ params.lm_head
    logits = logits.astype(jnp.float32)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)
