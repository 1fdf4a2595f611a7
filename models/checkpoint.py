"""The one table between Hugging Face checkpoint names and parameter-tree leaves.

HF linear weights are `[out, in]`; the tree stores `[in, out]`, so they are transposed
once at load time (and back at export). Nothing else in the project knows HF key strings.
"""

from __future__ import annotations

import re

import numpy as np

from state.config import ModelConfig

# (checkpoint name pattern, leaf path template, transpose?). `{}` is the layer index.
NAME_MAP: tuple[tuple[str, str, bool], ...] = (
    (r"model\.embed_tokens\.weight", "embed", False),
    (r"model\.norm\.weight", "final_norm", False),
    (r"lm_head\.weight", "lm_head", True),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{}.attn_norm", False),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{}.wq", True),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{}.wk", True),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{}.wv", True),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{}.wo", True),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "layers.{}.bq", False),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "layers.{}.bk", False),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "layers.{}.bv", False),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "layers.{}.q_norm", False),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "layers.{}.k_norm", False),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{}.mlp_norm", False),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{}.w_gate", True),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{}.w_up", True),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{}.w_down", True),
    (r"model\.layers\.(\d+)\.self_attn\.k_scale", "layers.{}.k_scale", False),
    (r"model\.layers\.(\d+)\.self_attn\.v_scale", "layers.{}.v_scale", False),
)
_COMPILED = tuple((re.compile(p + r"\Z"), leaf, t) for p, leaf, t in NAME_MAP)

# Leaves a checkpoint may omit: FP8 KV scales default to 1.0 (only FP8-KV checkpoints carry them).
OPTIONAL_LEAF_SUFFIXES = (".k_scale", ".v_scale")

# Names that carry no weights of ours (RoPE tables the model recomputes): skipped.
_INV_FREQ = re.compile(r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq\Z")


def leaf_for(name: str, cfg: ModelConfig) -> tuple[str, bool] | None:
    """Leaf path and transpose flag of a checkpoint name; None for a name to skip.

    Raises:
        KeyError: the name is not a tensor of this architecture.
    """
    inv_freq = _INV_FREQ.match(name)
    if inv_freq is not None and int(inv_freq.group(1)) < cfg.num_hidden_layers:
        return None
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None  # tied: the embedding leaf is the output projection
    for pattern, leaf, transpose in _COMPILED:
        m = pattern.match(name)
        if m is None:
            continue
        if m.groups():
            layer = int(m.group(1))
            if layer >= cfg.num_hidden_layers:
                break
            leaf = leaf.format(layer)
        if not cfg.qk_norm and leaf.endswith(("q_norm", "k_norm")):
            break
        if not cfg.attention_bias and leaf.endswith((".bq", ".bk", ".bv")):
            break
        return leaf, transpose
    raise KeyError(f"unexpected tensor {name!r}: not a weight of a {cfg.num_hidden_layers}-layer "
                   f"{cfg.architecture}")


def skipped_shape(name: str, cfg: ModelConfig) -> tuple[int, ...] | None:
    """The shape a name `leaf_for` skips must have, where the model implies one."""
    if name == "lm_head.weight":
        return (cfg.vocab_size, cfg.hidden_size)  # a tied copy of the embedding
    return None


def checkpoint_name(leaf: str) -> tuple[str, bool]:
    """Inverse of `leaf_for`: checkpoint name and transpose flag of a leaf path."""
    parts = leaf.split(".")
    template, index = (f"layers.{{}}.{parts[2]}", parts[1]) if parts[0] == "layers" else (leaf, None)
    for pattern, candidate, transpose in NAME_MAP:
        if candidate == template:
            name = pattern.replace(r"(\d+)", index or "").replace("\\.", ".")
            return name, transpose
    raise KeyError(f"no checkpoint name for leaf {leaf!r}")


def to_leaf_layout(array: np.ndarray, transpose: bool) -> np.ndarray:
    return array.T if transpose else array
