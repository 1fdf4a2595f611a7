"""The tables between Hugging Face checkpoint names and parameter-tree leaves.

One shared table serves every family; each family adds its own entries beside it
(`FAMILY_TABLES`): Qwen2's q/k/v biases, the experts of Qwen3-MoE and Mixtral, Gemma's
four norms per layer, the fused `qkv_proj`/`gate_up_proj` of Phi-3. A checkpoint name resolves to one or more `Piece`s:
a leaf, a row range of the checkpoint tensor (fused tensors) and an expert slot (stacked
`[E, ...]` expert leaves). HF linear weights are `[out, in]`; the tree stores `[in, out]`,
so they are transposed once at load time (and back at export). Nothing else in the
project knows HF key strings.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from state.config import ModelConfig

# (checkpoint name pattern, leaf path template, transpose?). The first group is the layer
# index; in expert entries the second is the expert index.
Entry = tuple[str, str, bool]
_L = r"model\.layers\.(\d+)\."
SHARED: tuple[Entry, ...] = (
    (r"model\.embed_tokens\.weight", "embed", False),
    (r"model\.norm\.weight", "final_norm", False),
    (r"lm_head\.weight", "lm_head", True),
    (_L + r"input_layernorm\.weight", "layers.{}.attn_norm", False),
    (_L + r"self_attn\.q_proj\.weight", "layers.{}.wq", True),
    (_L + r"self_attn\.k_proj\.weight", "layers.{}.wk", True),
    (_L + r"self_attn\.v_proj\.weight", "layers.{}.wv", True),
    (_L + r"self_attn\.o_proj\.weight", "layers.{}.wo", True),
    (_L + r"self_attn\.q_norm\.weight", "layers.{}.q_norm", False),
    (_L + r"self_attn\.k_norm\.weight", "layers.{}.k_norm", False),
    (_L + r"post_attention_layernorm\.weight", "layers.{}.mlp_norm", False),
    (_L + r"mlp\.gate_proj\.weight", "layers.{}.w_gate", True),
    (_L + r"mlp\.up_proj\.weight", "layers.{}.w_up", True),
    (_L + r"mlp\.down_proj\.weight", "layers.{}.w_down", True),
    (_L + r"self_attn\.k_scale", "layers.{}.k_scale", False),
    (_L + r"self_attn\.v_scale", "layers.{}.v_scale", False),
)
BIASES: tuple[Entry, ...] = (
    (_L + r"self_attn\.q_proj\.bias", "layers.{}.bq", False),
    (_L + r"self_attn\.k_proj\.bias", "layers.{}.bk", False),
    (_L + r"self_attn\.v_proj\.bias", "layers.{}.bv", False),
)


def _experts(block: str, gate: str, up: str, down: str) -> tuple[Entry, ...]:
    """The router and per-expert entries of a MoE family (its block and projection names)."""
    expert = _L + block + r"\.experts\.(\d+)\."
    return ((_L + block + r"\.gate\.weight", "layers.{}.router", True),
            (expert + gate + r"\.weight", "layers.{}.moe_gate", True),
            (expert + up + r"\.weight", "layers.{}.moe_up", True),
            (expert + down + r"\.weight", "layers.{}.moe_down", True))


QWEN3_MOE = _experts("mlp", "gate_proj", "up_proj", "down_proj")
MIXTRAL = _experts("block_sparse_moe", "w1", "w3", "w2")
# Phi-3's fused tensors: name -> the leaves its rows hold, in order.
PHI3_FUSED: dict[str, tuple[str, ...]] = {
    _L + r"self_attn\.qkv_proj\.weight": ("wq", "wk", "wv"),
    _L + r"mlp\.gate_up_proj\.weight": ("w_gate", "w_up"),
}
# Gemma's four norms per layer: `post_attention_layernorm` normalises the attention output
# (not the MLP input, as in the shared table); the MLP input is `pre_feedforward_layernorm`.
GEMMA: tuple[Entry, ...] = (
    (_L + r"post_attention_layernorm\.weight", "layers.{}.attn_post_norm", False),
    (_L + r"pre_feedforward_layernorm\.weight", "layers.{}.mlp_norm", False),
    (_L + r"post_feedforward_layernorm\.weight", "layers.{}.mlp_post_norm", False),
)
FAMILY_TABLES: dict[str, tuple[Entry, ...]] = {"Qwen3MoeForCausalLM": QWEN3_MOE, "MixtralForCausalLM": MIXTRAL,
                                               "Gemma2ForCausalLM": GEMMA, "Gemma3ForCausalLM": GEMMA}

# Leaves a checkpoint may omit: FP8 KV scales default to 1.0 (only FP8-KV checkpoints carry them).
OPTIONAL_LEAF_SUFFIXES = (".k_scale", ".v_scale")
EXPERT_LEAVES = ("moe_gate", "moe_up", "moe_down")

# Names that carry no weights of ours (RoPE tables the model recomputes): skipped.
_INV_FREQ = re.compile(r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq\Z")


class Piece(NamedTuple):
    """Where (part of) a checkpoint tensor goes."""

    leaf: str
    transpose: bool
    rows: tuple[int, int] | None = None  # a row range of a fused checkpoint tensor
    expert: int | None = None  # the slot of a stacked [E, ...] expert leaf


def _table(cfg: ModelConfig) -> tuple[Entry, ...]:
    family = FAMILY_TABLES.get(cfg.architecture, ())
    # A family entry replaces the shared one of the same checkpoint name or leaf.
    replaced = {e[0] for e in family} | {e[1] for e in family}
    shared = tuple(e for e in SHARED if e[0] not in replaced and e[1] not in replaced)
    entries = shared + (BIASES if cfg.attention_bias else ()) + family
    if cfg.architecture == "Phi3ForCausalLM":  # only the fused spellings exist there
        fused = {leaf for leaves in PHI3_FUSED.values() for leaf in leaves}
        entries = tuple(e for e in entries if e[1].rsplit(".", 1)[-1] not in fused)
    return entries


def fused_rows(leaves: tuple[str, ...], cfg: ModelConfig) -> list[tuple[int, int]]:
    """Row ranges of each leaf inside a fused tensor: q, k, v heads or gate, up widths."""
    width = {"wq": cfg.num_attention_heads * cfg.head_dim, "wk": cfg.num_key_value_heads * cfg.head_dim,
             "wv": cfg.num_key_value_heads * cfg.head_dim, "w_gate": cfg.intermediate_size,
             "w_up": cfg.intermediate_size}
    ends = np.cumsum([width[leaf] for leaf in leaves]).tolist()
    return list(zip([0] + ends[:-1], ends))


def leaf_for(name: str, cfg: ModelConfig) -> tuple[Piece, ...] | None:
    """Where a checkpoint name's tensor goes; None for a name to skip.

    Raises:
        KeyError: the name is not a tensor of this architecture.
    """
    inv_freq = _INV_FREQ.match(name)
    if inv_freq is not None and int(inv_freq.group(1)) < cfg.num_hidden_layers:
        return None
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None  # tied: the embedding leaf is the output projection
    pieces = _fused_pieces(name, cfg) if cfg.architecture == "Phi3ForCausalLM" else None
    if pieces is None:
        pieces = _entry_piece(name, cfg)
    if pieces is None:
        raise KeyError(f"unexpected tensor {name!r}: not a weight of a {cfg.num_hidden_layers}-layer "
                       f"{cfg.architecture}")
    return pieces


def _entry_piece(name: str, cfg: ModelConfig) -> tuple[Piece, ...] | None:
    for pattern, leaf, transpose in _table(cfg):
        m = re.match(pattern + r"\Z", name)
        if m is None:
            continue
        groups = [int(g) for g in m.groups()]
        expert = groups[1] if len(groups) > 1 else None
        if groups and not _has_layer_leaf(cfg, groups[0], leaf, expert):
            return None
        if not cfg.qk_norm and leaf.endswith(("q_norm", "k_norm")):
            return None
        return (Piece(leaf.format(*groups[:1]), transpose, None, expert),)
    return None


def _has_layer_leaf(cfg: ModelConfig, layer: int, template: str, expert: int | None) -> bool:
    """Whether layer `layer` has this leaf: it exists, and is sparse iff the leaf is an expert's."""
    if layer >= cfg.num_hidden_layers:
        return False
    field = template.rsplit(".", 1)[-1]
    if field in ("w_gate", "w_up", "w_down"):
        return not cfg.is_sparse(layer)
    if field == "router" or field in EXPERT_LEAVES:
        return cfg.is_sparse(layer) and (expert is None or expert < cfg.moe.num_experts)
    return True


def _fused_pieces(name: str, cfg: ModelConfig) -> tuple[Piece, ...] | None:
    for pattern, leaves in PHI3_FUSED.items():
        m = re.match(pattern + r"\Z", name)
        if m is not None and int(m.group(1)) < cfg.num_hidden_layers:
            layer = m.group(1)
            return tuple(Piece(f"layers.{layer}.{leaf}", True, rows)
                         for leaf, rows in zip(leaves, fused_rows(leaves, cfg)))
    return None


def skipped_shape(name: str, cfg: ModelConfig) -> tuple[int, ...] | None:
    """The shape a name `leaf_for` skips must have, where the model implies one."""
    if name == "lm_head.weight":
        return (cfg.vocab_size, cfg.hidden_size)  # a tied copy of the embedding
    return None


def checkpoint_name(leaf: str, cfg: ModelConfig) -> tuple[str, bool]:
    """Inverse of `leaf_for`: checkpoint name and transpose flag of a leaf path (for
    expert leaves the name of expert `*`; for Phi-3's split leaves the fused name)."""
    parts = leaf.split(".")
    template, index = (f"layers.{{}}.{parts[2]}", parts[1]) if parts[0] == "layers" else (leaf, None)
    if cfg.architecture == "Phi3ForCausalLM":
        for pattern, leaves in PHI3_FUSED.items():
            if parts[-1] in leaves and index is not None:
                return _spell(pattern, index), True
    for pattern, candidate, transpose in _table(cfg):
        if candidate == template:
            return _spell(pattern, index or "", "*"), transpose
    raise KeyError(f"no checkpoint name for leaf {leaf!r}")


def _spell(pattern: str, *indices: str) -> str:
    """A name pattern with its groups filled in order."""
    name = pattern
    for index in indices:
        name = name.replace(r"(\d+)", index, 1)
    return name.replace("\\.", ".")


def export_tensors(leaves: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Checkpoint name -> array in HF layout for every leaf: the inverse of `leaf_for`
    (expert leaves split per expert, Phi-3's leaves fused back)."""
    out: dict[str, np.ndarray] = {}
    fused: dict[str, list[np.ndarray]] = {}
    for path, array in leaves.items():
        name, transpose = checkpoint_name(path, cfg)
        array = np.swapaxes(array, -1, -2) if transpose else array
        if path.rsplit(".", 1)[-1] in EXPERT_LEAVES:
            out.update({name.replace("*", str(e)): np.ascontiguousarray(a) for e, a in enumerate(array)})
        elif cfg.architecture == "Phi3ForCausalLM" and name.endswith(("qkv_proj.weight", "gate_up_proj.weight")):
            fused.setdefault(name, []).append(array)  # leaves come in tree order: q, k, v / gate, up
        else:
            out[name] = np.ascontiguousarray(array)
    # ascontiguousarray: concatenating transposed views yields a column-major array, whose
    # raw bytes safetensors would write as they lie.
    out.update({name: np.ascontiguousarray(np.concatenate(parts, axis=0)) for name, parts in fused.items()})
    return out
