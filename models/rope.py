"""Rotary position embeddings, with Llama 3 and linear frequency scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from state.config import ModelConfig, RopeScaling


def inverse_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """[Dh/2] float32 inverse frequencies (a compile-time constant of the step).

    `local`: those of sliding-window layers with a RoPE of their own (Gemma 3's
    `rope_local_theta`, never scaled).
    """
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
    if local:
        return inv_freq
    if cfg.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, cfg.rope_scaling)
    if cfg.rope_linear_factor is not None:
        inv_freq = (inv_freq / np.float32(cfg.rope_linear_factor)).astype(np.float32)
    return inv_freq


def _llama3_scale(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3: keep high frequencies, divide low ones by `factor`, blend in between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, cfg: ModelConfig, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [T, Dh] float32 for the given positions."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inverse_frequencies(cfg, local))  # [T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, Dh]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x: [T, heads, Dh]` by position (the rotate-half convention of HF checkpoints)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    xf = x.astype(jnp.float32)
    out = xf * cos[:, None, :] + rotated.astype(jnp.float32) * sin[:, None, :]
    return out.astype(x.dtype)
