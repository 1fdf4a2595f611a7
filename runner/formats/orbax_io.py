"""Orbax checkpoints of the runner's own parameter tree.

A folder written by `save_params` holds an orbax checkpoint of the `Params` tree (leaf
paths as in `state.params.leaf_paths`; None leaves such as a tied `lm_head` stay None) and,
when a `ModelConfig` is given, a Hugging Face style `config.json`, so
`LLM(folder, load_format="orbax")` (or "auto") can read the architecture. `restore_params`
checks the stored tree against the abstract tree of the model first (orbax itself would
silently leave a leaf the checkpoint lacks as None, or cast a dtype), then restores every
leaf straight onto its target sharding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from runner.formats.hf_config import hf_config_dict
from runner.formats.param_tree import CheckpointError, assemble, tree_tensors, validate_params
from state.config import ModelConfig
from state.params import Params, abstract_params, leaf_paths

CONFIG_FILE = "config.json"
_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")


def is_orbax_folder(folder: str | Path) -> bool:
    """Whether `folder` holds an orbax checkpoint."""
    return any((Path(folder) / m).exists() for m in _MARKERS)


def save_params(path: str | Path, params: Params, model_config: ModelConfig | None = None, *,
                force: bool = False) -> Path:
    """Write `params` as an orbax checkpoint at `path` (and its `config.json`, when given).

    Args:
        path: the checkpoint folder; it must not exist yet unless `force` (which replaces it).
        params: the runner's parameter tree (e.g. `llm.runner.params`).
        model_config: the architecture; checked against `params` and written as config.json.
    Returns:
        The absolute checkpoint folder.
    Raises:
        CheckpointError: `params` does not fit `model_config`.
        FileExistsError: `path` exists and `force` is False.
    """
    folder = Path(path).absolute()
    if model_config is not None:
        validate_params(params, model_config, check_finite=False)
    if folder.exists() and not force:
        raise FileExistsError(f"{str(folder)!r} already exists; pass force=True to replace it")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(folder, params, force=force)
    # Closing the checkpointer waited for the save: the folder is complete from here on.
    if model_config is not None:
        (folder / CONFIG_FILE).write_text(json.dumps(hf_config_dict(model_config), indent=2) + "\n")
    return folder


def restore_params(folder: str | Path, cfg: ModelConfig, shardings: Any = None, *,
                   check_finite: bool = True) -> Params:
    """The tree stored at `folder`, restored onto `shardings` (None: the default device).

    Args:
        folder: a folder written by `save_params` (or any orbax checkpoint of this tree).
        cfg: the architecture; the stored tree must have exactly its leaves and shapes
            (a floating dtype other than `cfg.dtype` is converted).
        shardings: a tree of `jax.sharding.Sharding` matching `abstract_params(cfg)`.
        check_finite: refuse leaves holding NaN or infinity.

    Raises:
        CheckpointError: no orbax checkpoint there, or its tree does not fit `cfg` (the
            message names the missing, unexpected or wrongly shaped leaves).
    """
    folder = Path(folder).absolute()
    if not is_orbax_folder(folder):
        raise CheckpointError(f"{str(folder)!r} holds no orbax checkpoint (no _CHECKPOINT_METADATA); "
                              "write one with runner.formats.orbax_io.save_params")
    abstract = abstract_params(cfg)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(folder).item_metadata
        except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged folder
            raise CheckpointError(f"cannot read the orbax checkpoint in {str(folder)!r}: "
                                  f"{type(e).__name__}: {e}") from e
        if metadata is None:  # orbax logs a warning and returns no tree for unreadable metadata
            raise CheckpointError(f"cannot read the orbax checkpoint in {str(folder)!r}: its tree "
                                  "metadata (_METADATA) is missing or unreadable; the checkpoint is "
                                  "incomplete or corrupt (write it again with save_params)")
        stored = metadata.tree
        _check_tree(stored, abstract, folder)
        if shardings is None:
            default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: default, abstract)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
        try:
            params = checkpointer.restore(folder, target)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt array file
            raise CheckpointError(f"cannot restore the orbax checkpoint in {str(folder)!r}: {e}") from e
    # Restored arrays are this process's own and already placed: checked, not copied.
    return assemble(tree_tensors(params, cfg), cfg, copy=False, check_finite=check_finite)


def _check_tree(stored: Any, abstract: Params, folder: Path) -> None:
    """Compare the stored tree's leaves (paths, shapes, dtypes) with the model's."""
    flat = jax.tree_util.tree_flatten_with_path(stored)[0]
    found = {_key_path(path): meta for path, meta in flat}
    expected = dict(zip(leaf_paths(abstract), jax.tree.leaves(abstract)))
    missing = [p for p in expected if p not in found]
    extra = [p for p in found if p not in expected]
    if missing or extra:
        raise CheckpointError(
            f"the orbax checkpoint in {str(folder)!r} does not fit the model: "
            f"missing leaves {missing[:8]}, unexpected leaves {extra[:8]} (was it saved from "
            "another architecture, or with tied/untied embeddings the model does not have?)")
    for path, spec in expected.items():
        meta = found[path]
        shape, dtype = tuple(getattr(meta, "shape", ()) or ()), getattr(meta, "dtype", None)
        if shape != spec.shape:
            raise CheckpointError(f"the orbax checkpoint in {str(folder)!r} stores leaf {path!r} "
                                  f"with shape {shape}; the model expects {spec.shape}")
        if dtype is not None and np.dtype(dtype).kind not in "fV":
            raise CheckpointError(f"the orbax checkpoint in {str(folder)!r} stores leaf {path!r} "
                                  f"as {dtype}; expected a floating type")


def _key_path(path: tuple) -> str:
    """`layers.0.wq` from orbax's metadata keys (dict keys and list indices)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)
