"""The static maths of one layer's attention, shared by every reader: scale, soft-cap, window."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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
