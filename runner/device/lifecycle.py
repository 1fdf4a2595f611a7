"""Lifecycle operations: each maps a `RunnerState` to a new one, or raises leaving it valid.

    create         the first record: device mesh, weights on their shardings, KV cache
    update_config  new config record; refuses what the field's `Effect` says a running
                   runner cannot apply
    reload_weights new parameter tree, validated in full before it replaces the old one
                   (streamed updates and donated trees: `runner.device.weight_sync`)
    sleep          level 1: weights to host memory, KV freed; level 2: both freed
                   (`release` then deletes the old record's buffers, once it is swapped out)
    wake_up        restore "weights" and/or "kv_cache" on their original shardings (after
                   level 2 the weights come back empty: reload_weights fills them)

New weights always have the shapes, dtypes and shardings of the old ones (the record's
`param_shardings`, `kv_shardings`), so every compiled program stays valid: nothing
recompiles after a reload or a wake-up.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from runner.formats.hf_config import model_config_from_folder
from runner.device import distributed, sharding, weight_sync
from runner.device.loader import load_params, params_from_checkpoint
from runner.formats.param_tree import CheckpointError, assemble, leaf_tensors, tree_tensors
from state.config import Effect, ModelConfig, RunnerConfig, changed_fields
from state.config import update_config as merge_config
from models.kv_cache import allocate_kv_cache, bytes_per_block, kv_cache_specs, resolve_num_blocks
from state.params import Params, abstract_params
from runner.device.runner_state import RunnerState

SLEEP_TAGS = ("weights", "kv_cache")
# What a running runner cannot apply, by the field's effect, and why.
REFUSED_EFFECTS = {Effect.RESTART: "changes parameter shapes or the device mesh",
                   Effect.REALLOCATE: "changes the KV cache layout"}


def create(config: RunnerConfig, params: Params | None = None) -> RunnerState:
    """The first record of a runner.

    Builds the device mesh of `config.parallel_config`, places the weights on their
    shardings (loading them straight there, or copying a caller's tree there, so the
    caller keeps its own arrays) and allocates the KV cache on its shardings.
    """
    mesh = sharding.make_mesh(config.parallel_config)
    param_shardings = sharding.param_shardings(config.model_config, mesh)
    if params is None:
        params = load_params(config, param_shardings)
    else:
        params = assemble(tree_tensors(params, config.model_config), config.model_config,
                          shardings=param_shardings, check_finite=config.load_config.check_finite)
    num_blocks = resolve_num_blocks(config, _free_kv_bytes(config, mesh))
    # Every process must allocate the same cache (they run one program): the smallest.
    num_blocks = min(distributed.allgather_objects(num_blocks))
    kv_shardings = sharding.kv_cache_shardings(config, mesh, num_blocks)
    return RunnerState(config=config, params=params,
                       kv_cache=allocate_kv_cache(config, num_blocks, kv_shardings),
                       num_blocks=num_blocks, param_shardings=param_shardings,
                       kv_shardings=kv_shardings)


def free_device_bytes(device: jax.Device | None = None) -> int | None:
    """Free memory of `device` (default: this process's first), when its backend reports it
    (GPUs do, CPUs do not)."""
    stats = (device or jax.local_devices()[0]).memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def _free_kv_bytes(config: RunnerConfig, mesh: jax.sharding.Mesh) -> int | None:
    """KV bytes the devices can hold, counted as whole blocks (all KV heads): one device's
    free memory (measured after the weights were placed, so already without them), times
    the number of devices each block is split over."""
    free = free_device_bytes(next(d for d in mesh.devices.flat if d.process_index == jax.process_index()))
    if free is None:
        return None
    kv = kv_cache_specs(config, 1)
    per_device = sharding.per_device_bytes(jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), kv,
        sharding.kv_cache_shardings(config, mesh, 1)))
    return free * bytes_per_block(config) // per_device


def update_config(state: RunnerState, overrides: dict[str, Any]) -> RunnerState:
    """Merge `overrides` into the config; a field whose `Effect` a running runner cannot
    apply (RESTART, REALLOCATE: see `state.describe_effects()`) is refused.

    Raises:
        ValueError: an unknown section or field, an invalid value, or a field whose change
            needs a new runner (named, with why).
    """
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict of sections, got {type(overrides).__name__}")
    new = merge_config(state.config, overrides)
    for name, effect in changed_fields(state.config, new):
        if effect in REFUSED_EFFECTS:
            raise ValueError(f"{name} cannot change on a running runner (it {REFUSED_EFFECTS[effect]}); "
                             "build a new LLM with the new value")
    return dataclasses.replace(state, config=new)


def reload_weights(state: RunnerState, *, weights_path: str | Path | None = None,
                   weights_iterator: Iterable[tuple[str, Any]] | Mapping[str, Any] | None = None,
                   params: Params | None = None, is_checkpoint_format: bool = True,
                   assume_same_model: bool = False, donate: bool = False,
                   version: int | None = None) -> RunnerState:
    """A record serving new weights; the old record is untouched if anything fails.

    Sources (at most one): none (the config's format and folder), `weights_path` (an HF or
    orbax folder, which becomes `model_config.model`), `weights_iterator` (name, array)
    pairs (checkpoint names when `is_checkpoint_format`, else leaf paths such as
    `layers.0.wq`; a subset updates only those tensors), or `params` (a whole tree in the
    runner's layout). Arrays handed over are copied (device arrays device to device, onto
    the runner's shardings, whatever mesh they come from): the caller keeps its own. With
    `donate=True` a `params` tree already on the runner's dtypes and shardings is adopted
    without a copy and the caller's arrays are deleted (`weight_sync.adopt`). A folder
    must hold a config.json describing the model served, unless `assume_same_model` says
    the caller knows its tensors fit (e.g. an orbax folder saved without one). The record
    gets `version` (None: the current one plus one).

    Raises:
        ValueError: more than one source, nothing to load from (dummy format), a bad
            `version`, or `donate=True` without `params`.
        CheckpointError: a missing, unexpected, duplicate, misshapen, wrongly typed or
            non-finite tensor; a folder that is not there or holds another model.
        RuntimeError: the weights are asleep.
    """
    given = [name for name, v in (("weights_path", weights_path), ("weights_iterator", weights_iterator),
                                  ("params", params)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"reload_weights takes at most one weight source, got {', '.join(given)}")
    if "weights" in state.sleeping:
        raise RuntimeError("the weights are asleep: call wake_up(['weights']) before reload_weights()")
    if donate and params is None:
        raise ValueError("donate=True adopts a whole tree: pass it as params=...")
    version = weight_sync.next_version(state, version)
    config = state.config
    cfg = config.model_config
    check_finite = config.load_config.check_finite
    target = state.param_shardings
    # After a level-2 wake-up there are no values, and a stopped streamed update left mixed
    # ones: a partial update has nothing to borrow the other leaves from.
    base = None if state.weights_stale or state.update_pending is not None else state.params
    if params is not None and donate:
        new_params = weight_sync.adopt(params, cfg, target, check_finite=check_finite)
    elif params is not None:
        new_params = assemble(tree_tensors(params, cfg), cfg, shardings=target, check_finite=check_finite)
    elif weights_iterator is not None:
        pairs = weight_sync.pairs(weights_iterator, "weights_iterator")
        if is_checkpoint_format:
            new_params = params_from_checkpoint(pairs, cfg, base=base, check_finite=check_finite,
                                                shardings=target)
        else:
            new_params = assemble(leaf_tensors(pairs), cfg, base=base, shardings=target,
                                  check_finite=check_finite, source="weight source")
    else:
        if weights_path is not None:
            config = _point_at(config, weights_path)
        elif config.load_config.load_format == "dummy":
            raise ValueError("cannot reload weights with load_format='dummy': there is no weight file. "
                             "Switch the format first, e.g. update_config({'load_config': "
                             "{'load_format': 'auto'}}), or pass weights_path/weights_iterator/params")
        if config.model_config.model is not None and not assume_same_model:
            _check_same_model(config, Path(config.model_config.model))
        new_params = load_params(config, target)
    return dataclasses.replace(state, config=config, params=new_params, host_params=None,
                               weights_stale=False, update_pending=None, weight_version=version)


def _point_at(config: RunnerConfig, weights_path: str | Path) -> RunnerConfig:
    """The config with `weights_path` as its model folder."""
    if not isinstance(weights_path, (str, os.PathLike)) or str(weights_path) == "":
        # Path("") would be the working directory: never a checkpoint anyone meant.
        raise ValueError(f"weights_path: expected a checkpoint folder path, got {weights_path!r}")
    folder = Path(weights_path)
    if not folder.is_dir():
        raise CheckpointError(f"weights_path {str(weights_path)!r} is not a folder")
    overrides: dict[str, Any] = {"model_config": {"model": str(weights_path)}}
    if config.load_config.load_format == "dummy":
        overrides["load_config"] = {"load_format": "auto"}  # a path means real weights
    return merge_config(config, overrides)


def _check_same_model(config: RunnerConfig, folder: Path) -> None:
    """Refuse a folder whose config.json describes another model than the runner serves.

    Shapes alone do not tell: two checkpoints can agree in every tensor shape and still
    differ in RoPE, norm epsilon or tied embeddings, which would be served silently wrong.
    """
    if not _is_regular_file(folder / "config.json"):
        # Tensor shapes alone cannot tell another RoPE base or norm epsilon.
        raise CheckpointError(f"{str(folder)!r} has no readable config.json (a regular file), so nothing "
                              "shows it holds the model the runner serves; add one, or pass "
                              "assume_same_model=True if its tensors are known to fit")
    ours = config.model_config
    try:
        theirs = model_config_from_folder(folder, dtype=ours.dtype)
    except ValueError as e:
        raise CheckpointError(f"{str(folder)!r}: {e}") from e
    differ = [f.name for f in dataclasses.fields(ModelConfig)
              if f.metadata["effect"] in (Effect.RESTART, Effect.RECOMPILE)
              and getattr(theirs, f.name) != getattr(ours, f.name)]
    if differ:
        detail = "; ".join(f"{name}: checkpoint {getattr(theirs, name)!r}, runner {getattr(ours, name)!r}"
                           for name in differ)
        raise CheckpointError(f"{str(folder)!r} holds a different model than the runner serves ({detail}); "
                              "build a new LLM for it (or, for rms_norm_eps/rope_theta/rope_scaling, "
                              "update_config the runner to match first)")


def _is_regular_file(path: Path) -> bool:
    """A regular file (following symlinks): a FIFO would block, a symlink loop raise."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _to_host(array: jax.Array) -> list[tuple[jax.Device, np.ndarray]]:
    """The shards of `array` this process holds, in host memory (works across processes,
    where a whole-array read would need shards other processes own)."""
    return [(shard.device, np.asarray(shard.data)) for shard in array.addressable_shards]


def _from_host(shards: list[tuple[jax.Device, np.ndarray]], spec: jax.ShapeDtypeStruct,
               sharding: Any) -> jax.Array:
    """The array `_to_host` took apart, back on its devices and sharding."""
    on_device = [jax.device_put(data, device) for device, data in shards]
    return jax.make_array_from_single_device_arrays(spec.shape, sharding, on_device)


def sleep(state: RunnerState, level: int = 1) -> RunnerState:
    """Release device memory. Level 1 keeps the weights in host memory; level 2 keeps nothing.

    Raises:
        ValueError: a level other than 1 or 2.
        RuntimeError: sleep mode is off (`enable_sleep_mode=False`), or something is
            asleep already.
    """
    if not state.config.cache_config.enable_sleep_mode:
        raise RuntimeError("sleep mode is not enabled: build the LLM with enable_sleep_mode=True")
    if level not in (1, 2) or isinstance(level, bool):
        raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
    if state.sleeping:
        raise RuntimeError(f"the runner is already asleep ({', '.join(state.sleeping)} released); "
                           "call wake_up() first")
    if level == 1 and state.update_pending is not None:
        raise RuntimeError("sleep(level=1) would keep stale weights: a streamed update_weights is "
                           "incomplete; finish it, reload_weights(...), or sleep(level=2) to drop them")
    # Weights woken from level 2 and not reloaded yet hold nothing worth keeping.
    keep = level == 1 and state.params is not None
    host = jax.tree.map(_to_host, state.params) if keep else None
    return dataclasses.replace(state, params=None, kv_cache=None, host_params=host, weights_stale=False,
                               update_pending=None)


def release(old: RunnerState) -> None:
    """Free the device buffers of a record that `sleep` replaced.

    Called only once the new record is in place: an interrupt here leaves a runner that
    is asleep and whole (the host copy was taken first); buffers not deleted yet are
    freed when the old record is dropped.
    """
    for leaf in jax.tree.leaves((old.params, old.kv_cache)):
        if isinstance(leaf, jax.Array):  # a stopped streamed update may hold abstract leaves
            leaf.delete()


def wake_up(state: RunnerState, tags: list[str] | tuple[str, ...] | str | None = None) -> RunnerState:
    """Restore released device memory: "weights", "kv_cache", or both (None).

    Weights from a level-1 sleep come back from host memory. After level 2 there is nothing
    to bring back: the weights count as awake but hold no values until `reload_weights`,
    which then loads them straight into place (allocating empty buffers first would only
    double the peak memory of that reload, since JAX arrays cannot be filled in place).

    Raises:
        ValueError: an unknown tag.
        RuntimeError: a tag (or, with None, the whole runner) that is not asleep.
    """
    if tags is None:
        tags = state.sleeping
        if not tags:
            raise RuntimeError("wake_up() called on a runner that is awake")
    elif isinstance(tags, str):
        tags = (tags,)
    elif not isinstance(tags, (list, tuple)):
        raise ValueError(f"wake_up tags must be a list of {', '.join(SLEEP_TAGS)}, got {type(tags).__name__}")
    for tag in tags:
        if tag not in SLEEP_TAGS:
            raise ValueError(f"unknown wake_up tag {tag!r}; valid tags: {', '.join(SLEEP_TAGS)}")
        if tag not in state.sleeping:
            raise RuntimeError(f"wake_up({tag!r}): the {tag.replace('_', ' ')} is not asleep")
    changes: dict[str, Any] = {}
    if "weights" in tags:
        if state.host_params is not None:
            abstract = abstract_params(state.config.model_config)
            changes["params"] = jax.tree.map(_from_host, state.host_params, abstract, state.param_shardings,
                                             is_leaf=lambda x: isinstance(x, list))
            changes["host_params"] = None
        else:
            changes["weights_stale"] = True
    if "kv_cache" in tags:
        changes["kv_cache"] = allocate_kv_cache(state.config, state.num_blocks, state.kv_shardings)
    return dataclasses.replace(state, **changes)
