"""A Flax NNX definition of the same llama-like decoder, for training.

Dense causal attention over `[B, L]` token batches, no KV cache: what a training loop
wants. Its parameter names follow Flax conventions (`kernel`, `embedding`, `scale`); the
bridge (`runner.formats.bridge.params_from_flax`) maps them onto the runner's tree, so a model
trained here is served without a disk round trip. The math is the serving core's:
RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU MLP, optional q/k norm,
optional q/k/v biases, and the serving core's own mixture of experts (`models.moe`) in
sparse layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.moe import moe_mlp
from models.rope import apply_rope, rope_tables
from state.config import ModelConfig


def _linear(n_in: int, n_out: int, cfg: ModelConfig, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    init = nnx.initializers.normal(cfg.initializer_range)
    return nnx.Linear(n_in, n_out, use_bias=bias, kernel_init=init, param_dtype=jnp.dtype(cfg.dtype),
                      rngs=rngs)


def _norm(n: int, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(n, epsilon=cfg.rms_norm_eps, param_dtype=jnp.dtype(cfg.dtype), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, window: int | None = None) -> None:
        D, H, K, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.window = window  # sliding-window layers (Mistral, Qwen2 when enabled)
        self.q_proj = _linear(D, H * Dh, cfg, rngs, cfg.attention_bias)
        self.k_proj = _linear(D, K * Dh, cfg, rngs, cfg.attention_bias)
        self.v_proj = _linear(D, K * Dh, cfg, rngs, cfg.attention_bias)
        self.o_proj = _linear(H * Dh, D, cfg, rngs)
        self.q_norm = _norm(Dh, cfg, rngs) if cfg.qk_norm else None
        self.k_norm = _norm(Dh, cfg, rngs) if cfg.qk_norm else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, L, _ = x.shape
        H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self.q_proj(x).reshape(B, L, H, Dh)
        k = self.k_proj(x).reshape(B, L, K, Dh)
        v = self.v_proj(x).reshape(B, L, K, Dh)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # apply_rope rotates [T, heads, Dh] with [T, Dh] tables: fold the batch into T.
        q = apply_rope(q.reshape(B * L, H, Dh), cos, sin).reshape(B, L, H, Dh)
        k = apply_rope(k.reshape(B * L, K, Dh), cos, sin).reshape(B, L, K, Dh)
        window = None if self.window is None else (self.window - 1, 0)  # keys p - window < k <= p
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window)  # [B, L, H, Dh]
        return self.o_proj(out.reshape(B, L, H * Dh))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(D, F, cfg, rngs)
        self.up_proj = _linear(D, F, cfg, rngs)
        self.down_proj = _linear(F, D, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nnx.Module):
    """Stacked experts `[E, ...]` and a router; the maths is the serving core's."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        D, E, Fe = cfg.hidden_size, cfg.moe.num_experts, cfg.moe.intermediate_size
        init, dtype = nnx.initializers.normal(cfg.initializer_range), jnp.dtype(cfg.dtype)
        self.moe = cfg.moe
        self.router = _linear(D, E, cfg, rngs)
        self.experts_gate = nnx.Param(init(rngs.params(), (E, D, Fe), dtype))
        self.experts_up = nnx.Param(init(rngs.params(), (E, D, Fe), dtype))
        self.experts_down = nnx.Param(init(rngs.params(), (E, Fe, D), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        flat = x.reshape(-1, x.shape[-1])  # [B*L, D]
        out = moe_mlp(flat, self.router.kernel[...], self.experts_gate[...], self.experts_up[...],
                      self.experts_down[...], self.moe)
        return out.reshape(x.shape)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs) -> None:
        self.input_layernorm = _norm(cfg.hidden_size, cfg, rngs)
        self.self_attn = Attention(cfg, rngs, cfg.window(layer))
        self.post_attention_layernorm = _norm(cfg.hidden_size, cfg, rngs)
        self.mlp = MoE(cfg, rngs) if cfg.is_sparse(layer) else MLP(cfg, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nnx.Module):
    """`model(token_ids [B, L]) -> logits [B, L, V]` float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        if cfg.gemma:
            raise ValueError(f"the Flax NNX training model does not implement {cfg.architecture} (Gemma's "
                             "norms, soft-capping and local RoPE); it serves from the runner and exports only")
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                                      embedding_init=nnx.initializers.normal(cfg.initializer_range),
                                      param_dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = _norm(cfg.hidden_size, cfg, rngs)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, cfg, rngs)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        B, L = token_ids.shape
        x = self.embed_tokens(token_ids)  # [B, L, D]
        positions = jnp.tile(jnp.arange(L, dtype=jnp.int32), B)
        cos, sin = rope_tables(positions, self.cfg)  # [B*L, Dh]
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed_tokens.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)


def next_token_loss(model: CausalLM, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting `tokens[:, 1:]` from `tokens[:, :-1]` ([B, T+1] ids)."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
