"""How values are stored in a KV cache page and read back, shared by every attention reader."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# float8_e4m3fn has no infinity: a cast turns anything beyond +-448 into NaN, so values are
# clipped first, as CUDA's saturating conversion does.
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)
# A finite mask value keeps fully masked padding rows free of NaN.
MASKED = float(jnp.finfo(jnp.float32).min)


def quantise(x: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Values as stored in a cache of `dtype`: FP8 stores x / scale, saturated."""
    if dtype == jnp.float8_e4m3fn:
        return jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(dtype)
    return x.astype(dtype)


def dequantise(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Stored values back to float32 (FP8: times the scale)."""
    if x.dtype == jnp.float8_e4m3fn:
        return x.astype(jnp.float32) * scale
    return x.astype(jnp.float32)
