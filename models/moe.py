"""The mixture-of-experts MLP of Qwen3-MoE and Mixtral: top-k routing, grouped matmuls.

Routing runs in float32 (softmax over all experts, top-k, optional renormalisation), as
transformers does; the weights are then cast to the activation dtype. Experts are stacked
leaves `[E, ...]`: the T*k (token, expert) pairs are sorted by expert and each expert's
contiguous group is multiplied with its own weights by `jax.lax.ragged_dot`.

Measured on this CPU (2 shared cores; E=8, k=2, D=512, Fe=1024, float32, ms per call of
three jitted variants of this MLP):
    T     ragged_dot  dense over all experts  gather of per-token weights
    1        2.5              4.9                       8.0
    32      41.3             23.4                     478.0
    256    187.6            117.9                         -
XLA's CPU ragged_dot costs about what a dot of all T*k rows with every expert would: the
dense path, which computes every expert for every token (E/k times the FLOPs), wins at
T >= 32 here, but loses by E/k wherever ragged_dot is a grouped GEMM (GPU) and at real
expert counts (Qwen3-30B-A3B: 128 experts, k=8, 16x). ragged_dot is the one path; end to
end (benchmarks/moe_throughput.py) a CPU MoE model decodes at 0.17x (batch 1) and 0.32x
(batch 32) the rate of a dense model with the same active parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from state.config import MoeConfig


def route(h: jax.Array, router: jax.Array, moe: MoeConfig) -> tuple[jax.Array, jax.Array]:
    """Top-k experts of each token: weights [T, k] float32 and expert ids [T, k] int32."""
    logits = h.astype(jnp.float32) @ router.astype(jnp.float32)  # [T, E]
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), moe.num_experts_per_tok)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts


def moe_mlp(h: jax.Array, router: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
            moe: MoeConfig) -> jax.Array:
    """SwiGLU experts over `h: [T, D]`, each token's top-k outputs summed by routing weight."""
    T, k = h.shape[0], moe.num_experts_per_tok
    weights, experts = route(h, router, moe)
    flat = experts.reshape(T * k)
    order = jnp.argsort(flat)  # (token, expert) pairs grouped by expert
    token = order // k
    sizes = jnp.bincount(flat, length=moe.num_experts).astype(jnp.int32)  # [E]
    xs = h[token]  # [T*k, D]
    act = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
    ys = jax.lax.ragged_dot(act, w_down, sizes)  # [T*k, D]
    ys = ys * weights.reshape(T * k)[order].astype(h.dtype)[:, None]
    return jnp.zeros_like(h).at[token].add(ys)
