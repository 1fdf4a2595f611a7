"""Training-to-serving bridge: hand a parameter tree to a runner, or write it to disk.

`LLM.from_params(model_config, params)` and `llm.reload_weights(params=...)` serve a tree
held in memory. This module adds the explicit conversions around them: casting a tree to
the serving dtype, and exporting a tree as a Hugging Face folder (config.json,
model.safetensors, tokenizer.json) that transformers loads as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from models.checkpoint import checkpoint_name
from runner.loader import validate_params
from runner.tokenizer import Tokenizer
from state.config import ModelConfig
from state.params import Params, leaf_paths


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
    tensors: dict[str, np.ndarray] = {}
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
        array = np.asarray(jax.device_get(leaf))
        if path.endswith(("k_scale", "v_scale")) and float(array) == 1.0:
            continue
        name, transpose = checkpoint_name(path)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model_config.to_hf_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
