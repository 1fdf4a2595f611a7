"""Training-to-serving bridge: hand a parameter tree to a runner, or write it to disk.

`LLM.from_params(model_config, params)` and `llm.reload_weights(params=...)` serve a tree
held in memory. This module adds the explicit conversions around them:
    params_from_flax  a Flax training model's parameters -> the runner's tree, through a
                      name table (`FLAX_NAME_MAP` for `models.flax_llama`, or the user's own)
    flax_from_params  the inverse: a runner tree (a served checkpoint) -> a Flax training
                      model holding those arrays, e.g. to fine-tune what a runner serves
    cast_params       the tree in another dtype, explicitly
    save_pretrained   the tree as a Hugging Face folder transformers loads as it is
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from models.checkpoint import export_tensors
from runner.formats.hf_config import hf_config_dict
from runner.formats.param_tree import CheckpointError, Tensor, assemble, validate_params
from runner.formats.tokenizer import Tokenizer
from state.config import ModelConfig
from state.params import Params, leaf_paths, path_str

# Flax parameter path (as `nnx.state(model, nnx.Param)` flattens it) -> runner leaf path.
# Flax kernels are already [in, out], the runner's layout: no transposes.
FLAX_NAME_MAP: dict[str, str] = {
    r"embed_tokens\.embedding": "embed",
    r"norm\.scale": "final_norm",
    r"lm_head\.kernel": "lm_head",
    r"layers\.(\d+)\.input_layernorm\.scale": "layers.{}.attn_norm",
    r"layers\.(\d+)\.self_attn\.q_proj\.kernel": "layers.{}.wq",
    r"layers\.(\d+)\.self_attn\.k_proj\.kernel": "layers.{}.wk",
    r"layers\.(\d+)\.self_attn\.v_proj\.kernel": "layers.{}.wv",
    r"layers\.(\d+)\.self_attn\.o_proj\.kernel": "layers.{}.wo",
    r"layers\.(\d+)\.self_attn\.q_proj\.bias": "layers.{}.bq",
    r"layers\.(\d+)\.self_attn\.k_proj\.bias": "layers.{}.bk",
    r"layers\.(\d+)\.self_attn\.v_proj\.bias": "layers.{}.bv",
    r"layers\.(\d+)\.self_attn\.q_norm\.scale": "layers.{}.q_norm",
    r"layers\.(\d+)\.self_attn\.k_norm\.scale": "layers.{}.k_norm",
    r"layers\.(\d+)\.post_attention_layernorm\.scale": "layers.{}.mlp_norm",
    r"layers\.(\d+)\.mlp\.gate_proj\.kernel": "layers.{}.w_gate",
    r"layers\.(\d+)\.mlp\.up_proj\.kernel": "layers.{}.w_up",
    r"layers\.(\d+)\.mlp\.down_proj\.kernel": "layers.{}.w_down",
    r"layers\.(\d+)\.mlp\.router\.kernel": "layers.{}.router",
    r"layers\.(\d+)\.mlp\.experts_gate": "layers.{}.moe_gate",
    r"layers\.(\d+)\.mlp\.experts_up": "layers.{}.moe_up",
    r"layers\.(\d+)\.mlp\.experts_down": "layers.{}.moe_down",
}


def flax_named_params(model: Any) -> list[tuple[str, jax.Array]]:
    """(dotted path, array) of every `nnx.Param` of a Flax NNX model (or of its state)."""
    from flax import nnx

    state = model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)
    named = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        # Flax appends `.value` to each variable's path: drop it.
        parts = [p for p in path_str(path).split(".") if p != "value"]
        named.append((".".join(parts), leaf))
    return named


def params_from_named(named: Iterable[tuple[str, Any]], model_config: ModelConfig,
                      name_map: Mapping[str, str]) -> Params:
    """A runner tree from (name, array) pairs through `name_map` (regex -> leaf template).

    Every leaf must be named exactly once, except FP8 KV scales (1.0 when absent); arrays
    keep their dtype and placement and are validated, never converted silently.
    """
    table = [(re.compile(pattern + r"\Z"), leaf) for pattern, leaf in name_map.items()]
    return assemble(_mapped(named, table), model_config, copy=False, source="parameter tree")


def _mapped(named: Iterable[tuple[str, Any]], table: list[tuple[re.Pattern, str]]) -> Iterator[Tensor]:
    for name, array in named:
        for pattern, template in table:
            m = pattern.match(name)
            if m is not None:
                yield Tensor(template.format(*m.groups()), array, f"parameter {name!r}")
                break
        else:
            raise CheckpointError(f"parameter {name!r} matches no entry of the name map")


def params_from_flax(model: Any, model_config: ModelConfig,
                     name_map: Mapping[str, str] = FLAX_NAME_MAP) -> Params:
    """The runner's tree holding a Flax model's parameters (no copy, no disk)."""
    return params_from_named(flax_named_params(model), model_config, name_map)


def flax_from_params(params: Params, model_config: ModelConfig,
                     name_map: Mapping[str, str] = FLAX_NAME_MAP) -> Any:
    """A `models.flax_llama.CausalLM` holding the runner tree's arrays (no copy).

    The model is built abstractly (`nnx.eval_shape`: nothing is initialised) and each of
    its parameters takes the leaf `name_map` names. Every parameter must find its leaf with
    the same shape and dtype, and every leaf of the tree but the FP8 KV scales (a serving
    detail the training model has no use for) must be taken; anything else is a
    `CheckpointError` naming the parameter or leaf.
    """
    from flax import nnx

    from models.flax_llama import CausalLM

    validate_params(params, model_config)
    leaves = dict(zip(leaf_paths(params), jax.tree.leaves(params)))
    abstract = nnx.eval_shape(lambda: CausalLM(model_config, nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):  # anything but parameters (an RNG stream) would stay abstract
        raise CheckpointError(f"the Flax model holds state besides its parameters: {rest}")
    table = [(re.compile(pattern + r"\Z"), leaf) for pattern, leaf in name_map.items()]
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    filled, taken = [], set()
    for path, want in flat:
        name = ".".join(p for p in path_str(path).split(".") if p != "value")
        leaf = next((t.format(*m.groups()) for pat, t in table if (m := pat.match(name))), None)
        if leaf is None:
            raise CheckpointError(f"parameter {name!r} matches no entry of the name map")
        if leaf not in leaves:
            raise CheckpointError(f"parameter {name!r} maps to leaf {leaf!r}, which the tree does not hold")
        array = leaves[leaf]
        if tuple(array.shape) != tuple(want.shape) or jnp.dtype(array.dtype) != jnp.dtype(want.dtype):
            raise CheckpointError(f"leaf {leaf!r} is {jnp.dtype(array.dtype).name}{list(array.shape)}; parameter "
                                  f"{name!r} needs {jnp.dtype(want.dtype).name}{list(want.shape)}")
        filled.append(array)
        taken.add(leaf)
    unused = sorted(p for p in leaves if p not in taken and not p.endswith(("k_scale", "v_scale")))
    if unused:
        raise CheckpointError(f"the Flax model has no parameter for leaf/leaves {', '.join(unused)}")
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, filled), rest)


def cast_params(params: Params, dtype: str) -> Params:
    """The tree in `dtype` (float32, bfloat16, float16). KV scales stay float32."""
    target = jnp.dtype(dtype)
    paths = leaf_paths(params)
    leaves = [x if p.endswith(("k_scale", "v_scale")) else x.astype(target)
              for p, x in zip(paths, jax.tree.leaves(params))]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def save_pretrained(folder: str | Path, params: Params, model_config: ModelConfig,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Write `params` as a Hugging Face folder; returns the folder.

    KV scales of 1.0 (the value a checkpoint without them implies) are not written, so a
    plain model exports as a plain checkpoint.
    """
    validate_params(params, model_config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    leaves: dict[str, np.ndarray] = {}
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
        array = np.asarray(jax.device_get(leaf))
        if path.endswith(("k_scale", "v_scale")) and float(array) == 1.0:
            continue
        leaves[path] = array
    save_file(export_tensors(leaves, model_config), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model_config), indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
