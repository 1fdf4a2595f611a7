"""The one parameter-tree builder: named arrays in, a checked, placed `Params` tree out.

Every weight source ends here: safetensors files and checkpoint-name iterators (through
`runner.device.loader`), leaf-path iterators and whole trees (`runner.device.lifecycle`), Flax models
(`runner.formats.bridge`) and orbax checkpoints (`runner.formats.orbax_io`). The rules live in this
module only:

    names     every leaf at most once; a leaf the model does not have is refused
    arrays    numpy, JAX, torch (bfloat16 and requires_grad included) or anything with
              `__array__`; abstract leaves and structured dtypes are refused
    dtypes    floating only; cast to the model dtype (checkpoints) or required equal
              (trees in the runner's own layout: never converted silently)
    shapes    exactly the abstract tree's, in the layout the source gives (a transposed
              checkpoint tensor is checked as the checkpoint stores it)
    KV scales `[]` or `[1]`, finite and positive; 1.0 where a complete source omits them
    values    finite, unless `check_finite` is off
    memory    a caller's array is copied: sleep deletes the runner's buffers, and a caller
              mutating its arrays in place must not change what is served

`validate_params` checks a complete tree's structure, shapes and dtypes without building
anything (for writers: orbax saves, HF export).
"""

from __future__ import annotations

import functools
from collections.abc import Container, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.checkpoint import OPTIONAL_LEAF_SUFFIXES, checkpoint_name
from state.config import ModelConfig
from state.params import Params, abstract_params, leaf_paths


class CheckpointError(ValueError):
    """A checkpoint (folder, file or tensor) is missing, malformed or does not fit the model."""


class Tensor(NamedTuple):
    """One array on its way into the tree."""

    path: str  # leaf path, as `state.params.leaf_paths` spells it
    array: Any
    label: str  # how messages name it: "tensor 'model.norm.weight'", "leaf 'final_norm'"
    transposed: bool = False  # given as the checkpoint stores it: [out, in] for [in, out] leaves


def leaf_tensors(named: Iterable[tuple[str, Any]]) -> Iterable[Tensor]:
    """`(leaf path, array)` pairs in the runner's own layout, as `Tensor`s."""
    return (Tensor(path, array, f"leaf {path!r}") for path, array in named)


def tree_tensors(params: Any, cfg: ModelConfig) -> Iterable[Tensor]:
    """The leaves of a whole tree, after its structure is checked against `cfg`."""
    check_structure(params, cfg)
    return leaf_tensors(zip(leaf_paths(params), jax.tree.leaves(params)))


def assemble(tensors: Iterable[Tensor], cfg: ModelConfig, *, base: Params | None = None,
             shardings: Params | None = None, cast: bool = False, copy: bool = True,
             check_finite: bool = True, source: str = "weights") -> Params:
    """Build the tree of `cfg` from `tensors`.

    Args:
        tensors: the arrays, each naming its leaf.
        base: when given, a subset of leaves is allowed: the others come from `base`.
        shardings: a `Params` tree of shardings to place each leaf on (None: leave arrays
            where they are, e.g. a training model's tree handed over as it is).
        cast: convert floating arrays to the model dtype (checkpoints); otherwise a
            different dtype is an error.
        copy: the arrays belong to a caller: the tree gets its own copies.
        check_finite: refuse NaN and infinite values.
        source: what the message for missing leaves calls the tensors ("checkpoint").

    Raises:
        CheckpointError: naming the first tensor that breaks a rule, or the missing leaves.
    """
    abstract = abstract_params(cfg)
    paths = leaf_paths(abstract)
    specs = dict(zip(paths, jax.tree.leaves(abstract)))
    placements = dict(zip(paths, jax.tree.leaves(shardings))) if shardings is not None else {}
    leaves: dict[str, Any] = {}
    on_device: list[tuple[str, Tensor]] = []  # finiteness checked in one program at the end
    local: list[tuple[str, jax.Array]] = []  # already on their targets' devices: copied in one program
    seen: set[str] = set()
    for t in tensors:
        array = _checked_new(t, specs, seen, cast, check_finite)
        seen.add(t.path)
        target = placements.get(t.path)
        if isinstance(array, jax.Array):
            on_device.append((t.path, t))
            if copy and target is not None and _device_order(array.sharding) == _device_order(target):
                local.append((t.path, array))
                continue
        leaves[t.path] = place(array, target, copy)
    if local:
        copies = _copier(tuple(placements[p] for p, _ in local))([a for _, a in local])
        leaves.update(zip((p for p, _ in local), copies))
    if check_finite and on_device:
        finite = jax.device_get(finite_leaves([leaves[p] for p, _ in on_device]))
        bad = [t for (_, t), ok in zip(on_device, finite) if not ok]
        if bad:
            raise CheckpointError(f"{bad[0].label} holds NaN or infinite values "
                                  "(load_config.check_finite=False accepts them)")
    return _complete(leaves, abstract, base, placements, source, cfg)


def check_bucket(tensors: Iterable[Tensor], cfg: ModelConfig, *, cast: bool = False,
                 check_finite: bool = True) -> dict[str, Any]:
    """Leaf path -> array of `tensors`, each checked by the rules above (names, shapes,
    dtypes, finiteness); nothing is placed. Device arrays are checked for finiteness where
    they lie, one small program each, so a bucket on another mesh moves nowhere to be checked.

    Raises:
        CheckpointError: naming the first tensor that breaks a rule.
    """
    specs = dict(zip(leaf_paths(abstract_params(cfg)), jax.tree.leaves(abstract_params(cfg))))
    leaves: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for t in tensors:
        leaves[t.path] = _checked_new(t, specs, leaves, cast, check_finite)
        labels[t.path] = t.label
    on_device = [p for p, a in leaves.items() if isinstance(a, jax.Array)]
    if check_finite and on_device:
        finite = jax.device_get([_all_finite(leaves[p]) for p in on_device])
        bad = [p for p, ok in zip(on_device, finite) if not ok]
        if bad:
            raise CheckpointError(f"{labels[bad[0]]} holds NaN or infinite values "
                                  "(load_config.check_finite=False accepts them)")
    return leaves


def _checked_new(t: Tensor, specs: dict[str, jax.ShapeDtypeStruct], seen: Container[str], cast: bool,
                 check_finite: bool) -> Any:
    """`_checked`, for a tensor naming a leaf of the model not `seen` before."""
    if t.path not in specs:
        raise CheckpointError(f"unexpected {t.label}: the model has no leaf {t.path!r} "
                              "(leaves are named like 'embed', 'layers.0.wq')")
    if t.path in seen:
        raise CheckpointError(f"{t.label} appears twice")
    return _checked(t, specs[t.path], cast, check_finite)


def _checked(t: Tensor, spec: jax.ShapeDtypeStruct, cast: bool, check_finite: bool) -> Any:
    """The tensor's array in leaf layout, once every per-tensor rule holds."""
    array = as_array(t.array, t.label)
    dtype = np.dtype(array.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise CheckpointError(f"{t.label} has dtype {dtype}; expected a floating type")
    optional = t.path.endswith(OPTIONAL_LEAF_SUFFIXES)
    if optional and array.size == 1:
        array = array.reshape(())  # FP8 exporters write KV scales as [] or [1]
    expected = spec.shape[::-1] if t.transposed else spec.shape
    if tuple(array.shape) != expected:
        raise CheckpointError(f"{t.label} has shape {tuple(array.shape)}; expected {expected}")
    converted = dtype != spec.dtype
    if converted and not cast:
        raise CheckpointError(f"{t.label} has dtype {dtype}; expected {np.dtype(spec.dtype).name} "
                              "(convert explicitly with .astype before handing it over)")
    if optional:
        value = float(np.asarray(jax.device_get(array), np.float32))  # explicit: one scalar
        if not (np.isfinite(value) and value > 0):
            raise CheckpointError(f"{t.label} is {value}; a KV cache scale must be a positive "
                                  "number (the cache stores values divided by it)")
    if t.transposed:
        # A transposed view goes to the device as it is: the transfer lays it out row-major
        # faster than a numpy copy would (and a cast keeps the view's order).
        array = array.T
    if converted:
        # Cast before the finiteness check: a float64 value beyond float32's range becomes inf.
        with np.errstate(over="ignore", invalid="ignore"):
            array = array.astype(spec.dtype)
    # isfinite reads a host array where it lies (bfloat16 included): no float32 copy.
    if check_finite and isinstance(array, np.ndarray) and not np.isfinite(array).all():
        detail = f" once converted to {np.dtype(spec.dtype).name}" if converted else ""
        raise CheckpointError(f"{t.label} holds NaN or infinite values{detail} "
                              "(load_config.check_finite=False accepts them)")
    return array


def as_array(value: Any, label: str) -> np.ndarray | jax.Array:
    """A numpy or JAX array holding `value`'s data.

    Torch tensors are read without importing torch: detached, moved to the host, and
    bfloat16 reinterpreted bit for bit (numpy has no bfloat16; ml_dtypes' is JAX's).
    """
    if isinstance(value, jax.ShapeDtypeStruct):
        raise CheckpointError(f"{label} is an abstract array ({type(value).__name__}) with no values")
    if isinstance(value, jax.Array):
        if value.is_deleted():
            raise CheckpointError(f"{label} is a deleted array (a runner's own buffers are deleted "
                                  "by sleep: hand over a copy, e.g. jax.device_get(tree))")
        return value
    if type(value).__module__.startswith("torch"):
        value = _torch_to_numpy(value)
    try:
        array = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - any object may fail its own conversion
        raise CheckpointError(f"{label} cannot be read as an array: {type(e).__name__}: {e}") from e
    if array.dtype.fields is not None or array.dtype == object:
        raise CheckpointError(f"{label} has dtype {array.dtype}; expected a floating type")
    return array


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        import torch  # only reached when the caller already has torch loaded

        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


def place(array: Any, sharding: Any, copy: bool) -> Any:
    """A checked array on `sharding`. A JAX array moves device to device (a trainer's tree
    on another mesh is resharded by `device_put`, never through host memory)."""
    if sharding is None and not copy:
        return array
    if copy and isinstance(array, np.ndarray):
        # On CPU, device_put may keep pointing at an aligned numpy buffer even with
        # may_alias=False: copy on the host first so the caller's array stays its own.
        array = np.array(array, copy=True)
    return jax.device_put(array, sharding, may_alias=False if copy else None)


def _complete(leaves: dict[str, Any], abstract: Params, base: Params | None,
              placements: dict[str, Any], source: str, cfg: ModelConfig) -> Params:
    """The full tree: `leaves`, then `base`'s leaves, then 1.0 for omitted KV scales."""
    paths = leaf_paths(abstract)
    if base is None:
        missing = [p for p in paths if p not in leaves and not p.endswith(OPTIONAL_LEAF_SUFFIXES)]
        if missing:
            names = [f"{p} ({checkpoint_name(p, cfg)[0]})" for p in missing]
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            raise CheckpointError(f"{source} lacks {len(missing)} tensor(s) the model needs: {shown} "
                                  "(a reload of only some tensors needs weights already loaded)")
        # FP8 KV scales a source omits are 1.0: values are stored unscaled.
        fill = {p: jax.device_put(np.ones((), np.float32), placements.get(p))
                for p in paths if p not in leaves}
    else:
        fill = dict(zip(paths, jax.tree.leaves(base)))
    return jax.tree.unflatten(jax.tree.structure(abstract),
                              [leaves[p] if p in leaves else fill[p] for p in paths])


def check_structure(params: Any, cfg: ModelConfig) -> None:
    """Refuse a tree whose containers or leaf paths differ from the model's."""
    abstract = abstract_params(cfg)
    try:
        got = leaf_paths(params)
        same = jax.tree.structure(params) == jax.tree.structure(abstract)
    except Exception as e:  # noqa: BLE001 - anything unflattenable is a structure error
        raise CheckpointError(f"params is not a parameter tree: {e}") from e
    if same:
        return
    expected = leaf_paths(abstract)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if not missing and not extra:
        raise CheckpointError(f"params tree has the model's leaves in other containers: got "
                              f"{jax.tree.structure(params)}; expected {jax.tree.structure(abstract)} "
                              "(a state.params.Params with a tuple of LayerParams)")
    raise CheckpointError(f"params tree does not match the model: missing leaves {missing[:8]}, "
                          f"unexpected leaves {extra[:8]} (expected a state.params.Params)")


def validate_params(params: Any, cfg: ModelConfig, *, check_finite: bool = True) -> None:
    """Check a complete tree in the runner's layout against `cfg`, building nothing.

    Raises:
        CheckpointError: naming the first leaf whose structure, shape, dtype or values differ.
    """
    check_structure(params, cfg)
    abstract = abstract_params(cfg)
    paths = leaf_paths(abstract)
    for path, leaf, spec in zip(paths, jax.tree.leaves(params), jax.tree.leaves(abstract)):
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or tuple(shape) != spec.shape:
            raise CheckpointError(f"leaf {path!r} has shape {shape}; expected {spec.shape}")
        if dtype != spec.dtype:
            raise CheckpointError(f"leaf {path!r} has dtype {dtype}; expected {spec.dtype} "
                                  "(convert explicitly with .astype before handing it over)")
    if check_finite:
        finite = jax.device_get(finite_leaves(jax.tree.leaves(params)))
        bad = [p for p, ok in zip(paths, finite) if not ok]
        if bad:
            raise CheckpointError(f"leaf {bad[0]!r} holds NaN or infinite values")


def _device_order(sharding: Any) -> tuple[jax.Device, ...] | None:
    """The devices of a sharding in mesh order (arrays one program takes must agree on it)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return tuple(sharding.mesh.devices.flat)
    return tuple(sharding.device_set) if len(sharding.device_set) == 1 else None


@functools.lru_cache(maxsize=16)
def _copier(targets: tuple[Any, ...]) -> Any:
    """One program copying device arrays onto `targets` (on the same devices: XLA moves
    shards between them): a whole tree costs one dispatch, not one transfer per leaf."""
    return jax.jit(lambda arrays: [jnp.copy(a) for a in arrays], out_shardings=list(targets))


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all()


@jax.jit
def finite_leaves(leaves: list[jax.Array]) -> jax.Array:
    """[num_leaves] bool: one program per tree shape, one transfer for the whole tree."""
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])
