"""The parameter tree: one leaf per tensor, role names, logical axes.

`param_specs(cfg)` is the single abstract tree (shape, dtype, logical axes of every leaf).
Every loader fills it, the dummy initialiser draws from it, `reload_weights` validates
against it, and the sharding rules read its axes. Matrices are stored `[in, out]` so the
forward is `x @ w` with no transpose at run time.

Logical axis names (mapped to mesh axes by one rules table in `runner/sharding.py`):
    vocab     vocabulary entries
    embed     model width D
    q_heads   flattened query heads H*Dh
    kv_heads  flattened key/value heads K*Dh
    mlp       MLP intermediate width F
    head_dim  per-head width Dh (q/k norm weights)
    experts   the expert of a stacked `[E, ...]` MoE leaf
    moe_mlp   one expert's intermediate width
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from state.config import ModelConfig


@dataclass(frozen=True)
class ParamSpec:
    """Shape, dtype and logical axes of one leaf. A pytree leaf, not a node."""

    shape: tuple[int, ...]
    dtype: jnp.dtype
    axes: tuple[str | None, ...]
    init: str  # "normal" | "ones": how the dummy initialiser fills it

    def abstract(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerParams:
    attn_norm: Any  # [D]
    wq: Any  # [D, H*Dh]
    wk: Any  # [D, K*Dh]
    wv: Any  # [D, K*Dh]
    wo: Any  # [H*Dh, D]
    bq: Any  # [H*Dh], None without attention_bias
    bk: Any  # [K*Dh], None without attention_bias
    bv: Any  # [K*Dh], None without attention_bias
    q_norm: Any  # [Dh], None without qk_norm
    k_norm: Any  # [Dh], None without qk_norm
    mlp_norm: Any  # [D]
    attn_post_norm: Any  # [D], on the attention output (Gemma); None elsewhere
    mlp_post_norm: Any  # [D], on the MLP output (Gemma); None elsewhere
    w_gate: Any  # [D, F]
    w_up: Any  # [D, F]
    w_down: Any  # [F, D]; w_gate, w_up, w_down are None in sparse (MoE) layers
    router: Any  # [D, E]; router and experts are None in dense layers
    moe_gate: Any  # [E, D, Fe]
    moe_up: Any  # [E, D, Fe]
    moe_down: Any  # [E, Fe, D]
    k_scale: Any  # [] float32: FP8 KV cache stores k / k_scale
    v_scale: Any  # [] float32


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Params:
    embed: Any  # [V, D]; also the output projection when embeddings are tied
    layers: tuple[LayerParams, ...]
    final_norm: Any  # [D]
    lm_head: Any  # [D, V], None when embeddings are tied: one leaf, never two copies


def param_specs(cfg: ModelConfig) -> Params:
    """The abstract parameter tree of `cfg`, with `ParamSpec` leaves."""
    dtype = jnp.dtype(cfg.dtype)
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    HDh = cfg.num_attention_heads * cfg.head_dim
    KDh = cfg.num_key_value_heads * cfg.head_dim

    def w(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> ParamSpec:
        return ParamSpec(shape, dtype, axes, "normal")

    def norm(n: int, axis: str) -> ParamSpec:
        return ParamSpec((n,), dtype, (axis,), "ones")

    # KV scales stay float32 whatever the model dtype: they divide values before the FP8 cast.
    scale = ParamSpec((), jnp.dtype(jnp.float32), (), "ones")
    bias = cfg.attention_bias

    def layer(i: int) -> LayerParams:
        sparse, dense = cfg.is_sparse(i), not cfg.is_sparse(i)
        E, Fe = (cfg.moe.num_experts, cfg.moe.intermediate_size) if sparse else (0, 0)
        return LayerParams(
            attn_norm=norm(D, "embed"),
            wq=w((D, HDh), ("embed", "q_heads")),
            wk=w((D, KDh), ("embed", "kv_heads")),
            wv=w((D, KDh), ("embed", "kv_heads")),
            wo=w((HDh, D), ("q_heads", "embed")),
            bq=w((HDh,), ("q_heads",)) if bias else None,
            bk=w((KDh,), ("kv_heads",)) if bias else None,
            bv=w((KDh,), ("kv_heads",)) if bias else None,
            q_norm=norm(cfg.head_dim, "head_dim") if cfg.qk_norm else None,
            k_norm=norm(cfg.head_dim, "head_dim") if cfg.qk_norm else None,
            mlp_norm=norm(D, "embed"),
            attn_post_norm=norm(D, "embed") if cfg.gemma else None,
            mlp_post_norm=norm(D, "embed") if cfg.gemma else None,
            w_gate=w((D, F), ("embed", "mlp")) if dense else None,
            w_up=w((D, F), ("embed", "mlp")) if dense else None,
            w_down=w((F, D), ("mlp", "embed")) if dense else None,
            # The router is small and every device routes every token: replicated.
            router=w((D, E), ("embed", None)) if sparse else None,
            moe_gate=w((E, D, Fe), ("experts", "embed", "moe_mlp")) if sparse else None,
            moe_up=w((E, D, Fe), ("experts", "embed", "moe_mlp")) if sparse else None,
            moe_down=w((E, Fe, D), ("experts", "moe_mlp", "embed")) if sparse else None,
            k_scale=scale,
            v_scale=scale,
        )

    return Params(
        embed=w((V, D), ("vocab", "embed")),
        layers=tuple(layer(i) for i in range(cfg.num_hidden_layers)),
        final_norm=norm(D, "embed"),
        lm_head=None if cfg.tie_word_embeddings else w((D, V), ("embed", "vocab")),
    )


@functools.lru_cache(maxsize=16)
def abstract_params(cfg: ModelConfig) -> Params:
    """`param_specs` as `jax.ShapeDtypeStruct` leaves (the target of every loader). Kept per
    config (the records are frozen and hashable): every weight update checks against it, and
    a tree of a few hundred leaves costs milliseconds to build, more than a donated update."""
    return jax.tree.map(ParamSpec.abstract, param_specs(cfg))


def leaf_paths(tree: Params) -> list[str]:
    """Readable paths of every leaf, in flattening order: `layers.3.wq`, `embed`, ..."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def path_str(path: tuple) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return ".".join(parts)


def param_bytes(tree: Params) -> int:
    """Total bytes of the leaves of a concrete or abstract tree."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def replace_leaf(tree: Params, path: str, value: Any) -> Params:
    """A new tree with the leaf at `path` (as `leaf_paths` spells it) replaced."""
    head, _, rest = path.partition(".")
    if head == "layers":
        index, _, field_name = rest.partition(".")
        layers = list(tree.layers)
        layers[int(index)] = dataclasses.replace(layers[int(index)], **{field_name: value})
        return dataclasses.replace(tree, layers=tuple(layers))
    return dataclasses.replace(tree, **{head: value})
