"""Weight loading: every format fills the one abstract parameter tree.

Formats: `safetensors` (HF layout, single file or sharded with an index), `dummy` (seeded
random weights, no file read), `orbax` (a checkpoint of the runner's own tree), and `auto`
(whichever of these the folder holds). Checkpoints are read only through safetensors and
orbax: pickle-based `.bin`/`.pt` files are refused, since unpickling runs code.

Every tensor is checked (name, shape, dtype, finiteness) before the tree is returned, so a
caller swapping trees never sees a half-loaded one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.checkpoint import Piece, leaf_for, skipped_shape
from runner.formats import orbax_io
from runner.formats.param_tree import CheckpointError, Tensor, as_array, assemble
from runner.formats.safetensors_io import INDEX_FILE, iter_safetensors, refuse_pickle
from state.config import ModelConfig, RunnerConfig
from state.params import Params, abstract_params, leaf_paths, param_specs


def resolve_format(config: RunnerConfig) -> str:
    """The concrete format `auto` stands for, given the folder's contents."""
    fmt = config.load_config.load_format
    if fmt != "auto":
        return fmt
    folder = _model_folder(config.model_config)
    if (folder / INDEX_FILE).is_file() or any(folder.glob("*.safetensors")):
        return "safetensors"
    if orbax_io.is_orbax_folder(folder):
        return "orbax"
    refuse_pickle(folder)
    raise CheckpointError(f"no weights in {str(folder)!r}: expected *.safetensors files "
                          f"(or {INDEX_FILE}), or an orbax checkpoint")


def _model_folder(cfg: ModelConfig) -> Path:
    if cfg.model is None:
        raise CheckpointError("model_config.model is not set: no checkpoint folder to load from")
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {cfg.model!r} does not exist")
    return folder


def checkpoint_tensors(named: Iterable[tuple[str, Any]], cfg: ModelConfig) -> Iterator[Tensor]:
    """`(checkpoint name, array)` pairs in HF layout as leaf `Tensor`s, through the name
    tables of `models.checkpoint`.

    A fused tensor (Phi-3's `qkv_proj`, `gate_up_proj`) yields one Tensor per leaf it
    holds; per-expert tensors are stacked into their `[E, ...]` leaf once all E arrived.
    Names that carry no weights of ours are skipped, each at most once and only in the
    shape the model would give them: an iterator repeating them forever ends in an error.

    Raises:
        CheckpointError: a name that is not a tensor of this model, a skipped name that
            repeats or has the wrong shape, a fused tensor of the wrong height, or an
            expert leaf some of whose experts are missing or repeated.
    """
    skipped: set[str] = set()
    experts = _ExpertStacks(cfg)
    for name, array in named:
        try:
            pieces = leaf_for(name, cfg)
        except KeyError as e:
            raise CheckpointError(e.args[0]) from None
        if pieces is None:
            if name in skipped:
                raise CheckpointError(f"tensor {name!r} appears twice")
            skipped.add(name)
            expected, shape = skipped_shape(name, cfg), tuple(getattr(array, "shape", ()))
            if expected is not None and shape != expected:
                raise CheckpointError(f"tensor {name!r} has shape {shape}; expected {expected}")
            continue
        label = f"tensor {name!r}"
        if pieces[0].rows is not None:
            yield from _split_fused(name, array, pieces, cfg)
        elif pieces[0].expert is not None:
            yield from experts.add(pieces[0], as_array(array, label), label)
        else:
            yield Tensor(pieces[0].leaf, array, label, pieces[0].transpose)
    experts.check_complete()


def _split_fused(name: str, array: Any, pieces: tuple[Piece, ...], cfg: ModelConfig) -> Iterator[Tensor]:
    """The row blocks of a fused `[rows, D]` tensor, one Tensor per leaf."""
    array = as_array(array, f"tensor {name!r}")
    expected = (pieces[-1].rows[1], cfg.hidden_size)
    if tuple(array.shape) != expected:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}; expected {expected} "
                              f"(the rows of {', '.join(p.leaf for p in pieces)} stacked)")
    for p in pieces:
        yield Tensor(p.leaf, array[p.rows[0]:p.rows[1]], f"rows {p.rows[0]}:{p.rows[1]} of tensor {name!r}",
                     p.transpose)


class _ExpertStacks:
    """Per-expert checkpoint tensors gathered into their stacked `[E, ...]` leaves."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.specs = dict(zip(leaf_paths(abstract_params(cfg)), jax.tree.leaves(abstract_params(cfg))))
        self.pending: dict[str, dict[int, np.ndarray]] = {}
        self.labels: dict[str, str] = {}

    def add(self, piece: Piece, array: Any, label: str) -> Iterator[Tensor]:
        stack = self.pending.setdefault(piece.leaf, {})
        if piece.expert in stack:
            raise CheckpointError(f"{label} appears twice")
        expected = self.specs[piece.leaf].shape[1:]
        expected = expected[::-1] if piece.transpose else expected
        if tuple(array.shape) != expected:
            raise CheckpointError(f"{label} has shape {tuple(array.shape)}; expected {expected}")
        stack[piece.expert] = array.T if piece.transpose else array
        self.labels[piece.leaf] = label
        if len(stack) == self.cfg.moe.num_experts:
            del self.pending[piece.leaf]
            # np.stack promotes mixed dtypes; assemble casts (or refuses) the result as a whole.
            arrays = [np.asarray(stack[e]) for e in range(len(stack))]
            yield Tensor(piece.leaf, np.stack(arrays), f"the experts of {label}")

    def check_complete(self) -> None:
        for leaf, stack in self.pending.items():
            missing = sorted(set(range(self.cfg.moe.num_experts)) - set(stack))
            raise CheckpointError(f"checkpoint lacks experts {missing[:8]} of {leaf!r} (it has "
                                  f"{len(stack)} of {self.cfg.moe.num_experts}, e.g. {self.labels[leaf]})")


def _known(name: str, cfg: ModelConfig) -> bool:
    """A checkpoint name the model reads or deliberately skips."""
    try:
        leaf_for(name, cfg)
    except KeyError as e:
        raise CheckpointError(e.args[0]) from None
    return True


def params_from_checkpoint(named: Iterable[tuple[str, Any]], cfg: ModelConfig, *,
                           base: Params | None = None, check_finite: bool = True,
                           shardings: Params | None = None, copy: bool = True) -> Params:
    """Build a tree from `(checkpoint name, array)` pairs in HF layout.

    Args:
        named: the tensors; names go through the tables of `models.checkpoint`, floating dtypes
            are cast to the model's.
        cfg: the architecture the tensors must fit.
        base: when given, a subset of names is allowed: the other leaves come from `base`.
        check_finite: refuse tensors holding NaN or infinity.
        shardings: per-leaf shardings to place each tensor on as it is read.
        copy: the arrays are a caller's (False for arrays this process just read).

    Raises:
        CheckpointError: an unexpected, duplicate, missing or wrongly shaped tensor.
    """
    return assemble(checkpoint_tensors(named, cfg), cfg, base=base, shardings=shardings, cast=True,
                    copy=copy, check_finite=check_finite, source="checkpoint")


def dummy_params(cfg: ModelConfig, seed: int, shardings: Params | None = None) -> Params:
    """Seeded random weights: normal(0, initializer_range) matrices, unit norms and scales.

    Each leaf draws from `fold_in(seed, leaf index)`, so a leaf's values do not depend on
    the others, and the arrays are created on device (and on their shardings) directly.
    """
    specs = param_specs(cfg)
    flat, treedef = jax.tree.flatten(specs)
    placed = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat)
    key = jax.random.key(seed)
    leaves = []
    for i, (spec, sharding) in enumerate(zip(flat, placed)):
        if spec.init == "ones":
            leaves.append(jnp.ones(spec.shape, spec.dtype, device=sharding))
        else:
            draw = _normal_drawer(spec.shape, spec.dtype, sharding)
            leaves.append(draw(jax.random.fold_in(key, i), cfg.initializer_range))
    return jax.tree.unflatten(treedef, leaves)


@functools.lru_cache(maxsize=64)
def _normal_drawer(shape: tuple[int, ...], dtype: jnp.dtype, sharding: Any) -> Any:
    """One compiled sampler per distinct leaf shape (the layers share theirs)."""
    def draw(key: jax.Array, std: jax.Array) -> jax.Array:
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.jit(draw, out_shardings=sharding)


def load_params(config: RunnerConfig, shardings: Params | None = None) -> Params:
    """Weights as `config` says: its format, its checkpoint folder, its seed."""
    fmt = resolve_format(config)
    cfg, load = config.model_config, config.load_config
    if fmt == "dummy":
        return dummy_params(cfg, load.seed, shardings)
    if fmt == "orbax":
        return orbax_io.restore_params(_model_folder(cfg), cfg, shardings, check_finite=load.check_finite)
    # Arrays read from the files belong to nobody else: no copy.
    # Names are checked from each file's header, before any tensor is read.
    named = iter_safetensors(_model_folder(cfg), expected=lambda name: _known(name, cfg))
    return params_from_checkpoint(named, cfg, copy=False,
                                  check_finite=load.check_finite, shardings=shardings)
