"""Lifecycle operations: each maps a `RunnerState` to a new one, or raises leaving it valid.

    update_config  new config record; refuses changes a running runner cannot apply
    reload_weights new parameter tree, validated in full before it replaces the old one
    sleep          level 1: weights to host memory, KV freed; level 2: both freed
    wake_up        restore "weights" and/or "kv_cache" on their original shardings

New weights always have the shapes, dtypes and shardings of the old ones, so every
compiled program stays valid: nothing recompiles after a reload or a wake-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from runner.loader import CheckpointError, load_params, params_from_checkpoint, validate_params
from state.config import Effect, ModelConfig, RunnerConfig, update_config as merge_config
from state.kv_cache import allocate_kv_cache
from state.params import Params, abstract_params, leaf_paths, replace_leaf
from state.runner_state import RunnerState

RUNTIME_SECTIONS = ("load_config", "model_config")
SLEEP_TAGS = ("weights", "kv_cache")


def update_config(state: RunnerState, overrides: dict[str, Any]) -> RunnerState:
    """Merge `overrides` into the config; only what a running runner can apply is allowed.

    Raises:
        ValueError: a section other than load_config/model_config, an unknown field, an
            invalid value, or a field whose change needs a new runner (named, with why).
    """
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict of sections, got {type(overrides).__name__}")
    for section in overrides:
        if section not in RUNTIME_SECTIONS:
            raise ValueError(f"Config override {section!r} is not supported. "
                             f"Supported configs: {', '.join(RUNTIME_SECTIONS)}")
    new = merge_config(state.config, overrides)
    for section in overrides:
        old_record, new_record = getattr(state.config, section), getattr(new, section)
        for f in dataclasses.fields(old_record):
            effect = f.metadata["effect"]
            changed = getattr(old_record, f.name) != getattr(new_record, f.name)
            if changed and effect in (Effect.RESTART, Effect.REALLOCATE):
                raise ValueError(f"{section}.{f.name} cannot change on a running runner (it "
                                 f"{'changes parameter shapes' if effect is Effect.RESTART else 'changes the KV cache layout'}); "
                                 "build a new LLM with the new value")
    return dataclasses.replace(state, config=new)


def reload_weights(state: RunnerState, *, weights_path: str | None = None,
                   weights_iterator: Iterable[tuple[str, Any]] | None = None,
                   params: Params | None = None, is_checkpoint_format: bool = True) -> RunnerState:
    """A record serving new weights; the old record is untouched if anything fails.

    Sources (at most one): none (the config's format and folder), `weights_path` (an HF or
    orbax folder, which becomes `model_config.model`), `weights_iterator` (name, array)
    pairs (checkpoint names when `is_checkpoint_format`, else leaf paths such as
    `layers.0.wq`; a subset updates only those tensors), or `params` (a whole tree in the
    runner's layout).
    """
    given = [name for name, v in (("weights_path", weights_path), ("weights_iterator", weights_iterator),
                                  ("params", params)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"reload_weights takes at most one weight source, got {', '.join(given)}")
    if state.params is None:
        raise RuntimeError("the weights are asleep: call wake_up(['weights']) before reload_weights()")
    config = state.config
    cfg = config.model_config
    check_finite = config.load_config.check_finite
    # After a level-2 wake-up the current buffers hold no values: a partial update cannot
    # borrow the other leaves from them.
    base = None if state.weights_stale else state.params
    if params is not None:
        validate_params(params, cfg, check_finite=check_finite)
        new_params = _copy_to(params, state.param_shardings)
    elif weights_iterator is not None:
        if is_checkpoint_format:
            new_params = params_from_checkpoint(weights_iterator, cfg, base=base, check_finite=check_finite,
                                                shardings=state.param_shardings)
        else:
            new_params = _params_from_leaves(weights_iterator, cfg, base, state.param_shardings, check_finite)
    else:
        if weights_path is not None:
            config = _point_at(config, weights_path)
        elif config.load_config.load_format == "dummy":
            raise ValueError("cannot reload weights with load_format='dummy': there is no weight file. "
                             "Switch the format first, e.g. update_config({'load_config': "
                             "{'load_format': 'auto'}}), or pass weights_path/weights_iterator/params")
        new_params = load_params(config, state.param_shardings)
    validate_params(new_params, cfg, check_finite=False)
    return dataclasses.replace(state, config=config, params=new_params, host_params=None,
                               weights_stale=False)


def _point_at(config: RunnerConfig, weights_path: str) -> RunnerConfig:
    """The config with `weights_path` as its model folder, refusing another architecture."""
    folder = Path(weights_path)
    if not folder.is_dir():
        raise CheckpointError(f"weights_path {weights_path!r} is not a folder")
    if (folder / "config.json").is_file():
        other = ModelConfig.from_pretrained(folder, dtype=config.model_config.dtype)
        if other.for_compile() != config.model_config.for_compile():
            raise CheckpointError(f"{weights_path!r} holds a different model (its config.json "
                                  "differs in architecture or shapes); build a new LLM for it")
    overrides = {"model_config": {"model": str(weights_path)}}
    if config.load_config.load_format == "dummy":
        overrides["load_config"] = {"load_format": "auto"}  # a path means real weights
    return merge_config(config, overrides)


def _params_from_leaves(named: Iterable[tuple[str, Any]], cfg: ModelConfig, base: Params | None,
                        shardings: Params, check_finite: bool) -> Params:
    """A tree from (leaf path, array) pairs already in the runner's layout."""
    abstract = abstract_params(cfg)
    specs = dict(zip(leaf_paths(abstract), jax.tree.leaves(abstract)))
    placement = dict(zip(leaf_paths(abstract), jax.tree.leaves(shardings)))
    tree = base if base is not None else abstract
    seen = set()
    for path, array in named:
        if path not in specs:
            raise CheckpointError(f"unexpected leaf {path!r}; leaves look like 'embed', 'layers.0.wq'")
        if path in seen:
            raise CheckpointError(f"leaf {path!r} appears twice")
        seen.add(path)
        spec = specs[path]
        if tuple(array.shape) != spec.shape or array.dtype != spec.dtype:
            raise CheckpointError(f"leaf {path!r} is {array.dtype}{list(array.shape)}; "
                                  f"expected {spec.dtype}{list(spec.shape)}")
        tree = replace_leaf(tree, path, jax.device_put(np.asarray(array), placement[path]))
    missing = [p for p in specs if p not in seen] if base is None else []
    if missing:
        raise CheckpointError(f"weights lack {len(missing)} leaf(s): {', '.join(missing[:8])}")
    return tree


def _copy_to(params: Params, shardings: Params) -> Params:
    """Our own copy on the runner's shardings: sleep frees these buffers, never a caller's."""
    return jax.tree.map(lambda x, s: jax.device_put(jnp.array(x, copy=True), s), params, shardings)


def sleep(state: RunnerState, level: int = 1) -> RunnerState:
    """Release device memory. Level 1 keeps the weights in host memory; level 2 keeps nothing."""
    if level not in (1, 2):
        raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
    if state.sleeping:
        raise RuntimeError(f"the runner is already asleep ({', '.join(state.sleeping)} released); "
                           "call wake_up() first")
    host = jax.device_get(state.params) if level == 1 and not state.weights_stale else None
    for leaf in jax.tree.leaves((state.params, state.kv_cache)):
        leaf.delete()
    return dataclasses.replace(state, params=None, kv_cache=None, host_params=host)


def wake_up(state: RunnerState, tags: list[str] | tuple[str, ...] | None = None) -> RunnerState:
    """Restore released device memory: "weights", "kv_cache", or both (None)."""
    if tags is None:
        tags = state.sleeping
        if not tags:
            raise RuntimeError("wake_up() called on a runner that is awake")
    for tag in tags:
        if tag not in SLEEP_TAGS:
            raise ValueError(f"unknown wake_up tag {tag!r}; valid tags: {', '.join(SLEEP_TAGS)}")
        if tag not in state.sleeping:
            raise RuntimeError(f"wake_up({tag!r}): the {tag} are not asleep")
    changes: dict[str, Any] = {}
    if "weights" in tags:
        if state.host_params is not None:
            changes["params"] = jax.device_put(state.host_params, state.param_shardings)
            changes["host_params"] = None
        else:
            # Level 2 kept nothing: allocate the buffers, mark them stale until a reload fills them.
            abstract = abstract_params(state.config.model_config)
            changes["params"] = jax.tree.map(lambda a, s: jnp.zeros(a.shape, a.dtype, device=s),
                                             abstract, state.param_shardings)
            changes["weights_stale"] = True
    if "kv_cache" in tags:
        changes["kv_cache"] = allocate_kv_cache(state.config, state.num_blocks, state.kv_shardings)
    return dataclasses.replace(state, **changes)

