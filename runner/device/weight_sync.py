"""Weight sync for training loops: streamed updates, donated trees, weight versions.

    streamed_update  buckets of (name, array) pairs replace leaves in place: each bucket is
                     checked in full first, then each old leaf is deleted as soon as its
                     replacement is placed
    adopt            a whole tree already on the runner's dtypes and shardings, taken over
                     without a copy: the caller's arrays are deleted, their buffers serve
    next_version     the version an update sets: the caller's, or the current one plus one

What a streamed update guarantees. It begins when its first bucket passes its checks; a
bucket that fails them changes nothing. From then on the record lists the leaves not yet
replaced (`RunnerState.update_pending`) and is not served: the tree mixes two versions.
The update is *complete* once every leaf the model needs has been replaced at least once
since it began (FP8 KV scales are optional: one left out keeps its value). An update that
stops before that (a bad bucket, the trainer's generator raising, the stream ending early)
leaves the weights stale: generation refuses, saying so, until a later `update_weights`
call sends the leaves still missing (it continues the same update), or `reload_weights`
loads a whole tree. Mixed weights are never served.

Memory. Host arrays are copied to the device one leaf at a time, and the leaf they replace
is deleted right after, so the device holds at most the weights plus one leaf more (plus,
for device arrays, the caller's bucket, and any transposed or cast copies of it the checks
made). With `donate=True`, a caller's device array on the runner's dtype and sharding is
adopted as it is and any other is deleted once copied: the bucket itself is the only extra.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from models.checkpoint import OPTIONAL_LEAF_SUFFIXES
from runner.device.loader import checkpoint_tensors
from runner.device.runner_state import RunnerState
from runner.formats.param_tree import (CheckpointError, finite_leaves, check_bucket, check_structure,
                                       leaf_tensors, place)
from state.config import ModelConfig
from state.params import Params, abstract_params, leaf_paths


def next_version(state: RunnerState, version: Any) -> int:
    """The version an update sets: `version` when given (a non-negative int), else the next."""
    if version is None:
        return state.weight_version + 1
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        raise ValueError(f"version: expected a non-negative int (or None for the next one), got {version!r}")
    return int(version)


def pairs(items: Any, what: str) -> Iterator[tuple[str, Any]]:
    """The (name, array) pairs of `items` (a dict is taken as its items); `what` names the
    source in messages ("weights_iterator", "bucket 3")."""
    if isinstance(items, Mapping):
        items = items.items()
    elif isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise CheckpointError(f"{what} must yield (name, array) pairs, got a {type(items).__name__}")
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise CheckpointError(f"{what} item {i} is not a (name, array) pair: got {type(item).__name__}")
        yield item[0], item[1]


def required_leaves(cfg: ModelConfig) -> frozenset[str]:
    """The leaves a complete update replaces: all but the optional FP8 KV scales."""
    return frozenset(p for p in leaf_paths(abstract_params(cfg)) if not p.endswith(OPTIONAL_LEAF_SUFFIXES))


def streamed_update(state: RunnerState, buckets: Iterable[Any], *, version: int | None = None,
                    is_checkpoint_format: bool = True, donate: bool = False) -> Iterator[RunnerState]:
    """The records of a streamed update, in order; the shell holds each one as it comes.

    Args:
        buckets: an iterable (a generator works) of buckets, each a list of (name, array)
            pairs or a dict: checkpoint names (cast to the model dtype) when
            `is_checkpoint_format`, else leaf paths such as `layers.0.wq` (dtype must match).
        version: the version the complete update sets (None: the next one).
        donate: the caller's device arrays become the runner's (see the module docstring).

    Raises:
        RuntimeError: the weights are asleep.
        ValueError: a bad `version` or `buckets` (before anything is read).
        CheckpointError: a bucket breaking a rule (named with its index), no tensors at
            all, or a stream ending before the update is complete. Any error once the update
            began carries a note saying the weights are stale.
    """
    if "weights" in state.sleeping:
        raise RuntimeError("the weights are asleep: call wake_up(['weights']) before update_weights()")
    version = next_version(state, version)
    if isinstance(buckets, (str, bytes, Mapping)) or not isinstance(buckets, Iterable):
        raise ValueError(f"update_weights: buckets must be an iterable of buckets (lists of (name, array) "
                         f"pairs), got a {type(buckets).__name__}")
    cfg = state.config.model_config
    try:
        for i, bucket in enumerate(buckets):
            leaves = _checked_bucket(state, bucket, f"bucket {i}", is_checkpoint_format)
            if not leaves:
                continue
            state = _begin(state, frozenset(leaves))
            yield state
            state = _land(state, leaves, donate)
            yield state
    except BaseException as e:
        if state.update_pending is not None:
            e.add_note(_stale_note(state))
        raise
    if state.update_pending is None:
        raise CheckpointError("update_weights got no tensors: nothing changed")
    missing = state.update_pending & required_leaves(cfg)
    if missing:
        raise CheckpointError(f"update_weights ended before the update was complete. {_stale_note(state)}")
    yield _finish(state, version)


def _stale_note(state: RunnerState) -> str:
    missing = sorted(state.update_pending or ())
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (f"The weights are stale: {len(missing)} leaf/leaves not replaced since the update began "
            f"({shown}); generation refuses until update_weights(...) sends them or reload_weights(...) "
            "loads a whole tree")


def _checked_bucket(state: RunnerState, bucket: Any, what: str, is_checkpoint_format: bool) -> dict[str, Any]:
    cfg = state.config.model_config
    named = pairs(bucket, what)
    tensors = checkpoint_tensors(named, cfg) if is_checkpoint_format else leaf_tensors(named)
    try:
        return check_bucket(tensors, cfg, cast=is_checkpoint_format,
                            check_finite=state.config.load_config.check_finite)
    except CheckpointError as e:
        if str(e).startswith(what):  # `pairs` names the bucket already
            raise
        raise CheckpointError(f"{what}: {e}") from None


def _begin(state: RunnerState, paths: frozenset[str]) -> RunnerState:
    """The record while a checked bucket lands: its leaves count as pending until they are in."""
    pending = state.update_pending
    if pending is None:
        pending = required_leaves(state.config.model_config)
    params = state.params
    if params is None:  # woken from level 2: abstract leaves stand in until each one lands
        params = abstract_params(state.config.model_config)
    return dataclasses.replace(state, params=params, weights_stale=False, update_pending=pending | paths)


def _land(state: RunnerState, leaves: dict[str, Any], donate: bool) -> RunnerState:
    """Place every leaf of the bucket, deleting each old leaf as soon as its new one is placed."""
    paths = leaf_paths(state.params)
    index = {p: i for i, p in enumerate(paths)}
    flat, treedef = jax.tree.flatten(state.params)
    targets = jax.tree.leaves(state.param_shardings)
    landed = frozenset(leaves)
    for path in list(leaves):
        array = leaves.pop(path)  # a check's transposed or cast copy goes once placed
        i = index[path]
        new = _take(array, targets[i], donate)
        old, flat[i] = flat[i], new
        if isinstance(old, jax.Array) and old is not new:
            old.delete()
    return dataclasses.replace(state, params=jax.tree.unflatten(treedef, flat),
                               update_pending=state.update_pending - landed)


def _take(array: Any, target: jax.sharding.Sharding, donate: bool) -> jax.Array:
    """`array` on `target`: adopted when donated and already there, else copied (and a
    donated source deleted once copied)."""
    if not (donate and isinstance(array, jax.Array)):
        return place(array, target, copy=True)
    if array.sharding.is_equivalent_to(target, array.ndim):
        return _adopter(target)(array)
    new = place(array, target, copy=True)
    array.delete()
    return new


def _finish(state: RunnerState, version: int) -> RunnerState:
    """The complete update: optional leaves never sent after a level-2 sleep become 1.0."""
    flat, treedef = jax.tree.flatten(state.params)
    targets = jax.tree.leaves(state.param_shardings)
    flat = [jax.device_put(np.ones(x.shape, x.dtype), t) if isinstance(x, jax.ShapeDtypeStruct) else x
            for x, t in zip(flat, targets)]
    return dataclasses.replace(state, params=jax.tree.unflatten(treedef, flat), update_pending=None,
                               weight_version=version, host_params=None)


def adopt(params: Any, cfg: ModelConfig, shardings: Params, *, check_finite: bool = True) -> Params:
    """The caller's tree as the runner's, without a copy.

    Every leaf must already be a JAX array of the runner's shape, dtype and sharding (see
    `LLM.param_shardings`). All are checked before any is taken; then one donating identity
    program hands each buffer over: the returned leaves use the same device memory, and the
    caller's arrays are deleted, so a later use of them raises instead of silently reading
    buffers the runner now owns (and may free).

    Raises:
        CheckpointError: naming the first leaf that is not a live JAX array, has another
            shape, dtype or sharding than the runner's, repeats another leaf's array, or
            holds NaN or infinite values.
    """
    check_structure(params, cfg)
    abstract = abstract_params(cfg)
    leaves = jax.tree.leaves(params)
    seen: dict[int, str] = {}
    for path, leaf, spec, target in zip(leaf_paths(abstract), leaves, jax.tree.leaves(abstract),
                                        jax.tree.leaves(shardings)):
        label = f"donate=True: leaf {path!r}"
        if not isinstance(leaf, jax.Array):
            raise CheckpointError(f"{label} is a {type(leaf).__name__}; donation adopts JAX arrays on the "
                                  "runner's devices (pass donate=False to copy it)")
        if leaf.is_deleted():
            raise CheckpointError(f"{label} is a deleted array (donated or deleted before)")
        if id(leaf) in seen:
            raise CheckpointError(f"{label} is the same array as leaf {seen[id(leaf)]!r}; each buffer can "
                                  "be adopted once")
        seen[id(leaf)] = path
        if tuple(leaf.shape) != spec.shape:
            raise CheckpointError(f"{label} has shape {tuple(leaf.shape)}; expected {spec.shape}")
        if leaf.dtype != spec.dtype:
            raise CheckpointError(f"{label} has dtype {leaf.dtype}; the runner serves it as "
                                  f"{np.dtype(spec.dtype).name} (convert with .astype first, or pass "
                                  "donate=False to copy)")
        if not leaf.sharding.is_equivalent_to(target, leaf.ndim):
            raise CheckpointError(f"{label} is placed as {_describe(leaf.sharding)}; the runner places it as "
                                  f"{_describe(target)} (put the tree on llm.param_shardings first, or pass "
                                  "donate=False to copy and reshard it)")
    if check_finite:
        finite = jax.device_get(finite_leaves(leaves))
        bad = [p for p, ok in zip(leaf_paths(abstract), finite) if not ok]
        if bad:
            raise CheckpointError(f"donate=True: leaf {bad[0]!r} holds NaN or infinite values "
                                  "(load_config.check_finite=False accepts them)")
    return _adopter(shardings)(params)


def _describe(sharding: jax.sharding.Sharding) -> str:
    if isinstance(sharding, jax.sharding.NamedSharding):
        return f"{sharding.spec} over mesh {dict(sharding.mesh.shape)} of devices {sharding.mesh.device_ids.ravel().tolist()}"
    return f"{type(sharding).__name__} on devices {sorted(d.id for d in sharding.device_set)}"


@functools.lru_cache(maxsize=32)
def _adopter(shardings: Any) -> Any:
    """An identity program donating its input: XLA aliases each output to its input buffer,
    so nothing is copied, and JAX marks the inputs deleted."""
    return jax.jit(lambda tree: tree, donate_argnums=0, out_shardings=shardings)
