"""Tensor parallelism: one rules table from logical axis names to mesh axes.

Every parameter leaf names its axes (`state.params.param_specs`), and so does every KV cache
array (`models.kv_cache.KV_LAYOUTS`, per attention backend). `RULES` maps each logical axis to the mesh axis it
is split over, or to None (replicated). The model code never mentions devices: the jitted
step receives arrays laid out by these shardings and XLA's SPMD partitioner inserts the
collectives (an all-reduce after `wo` and `w_down`, one after the vocabulary-split
embedding lookup, and small reductions over the vocabulary-split logits in the sampler).

The mesh has two axes, `("data", "model")`, of sizes `(data_parallel_size,
tensor_parallel_size)`. No rule maps to "data" yet: with `data_parallel_size > 1` weights
and KV cache are replicated over it and every data replica runs the same batch.

Divisibility is checked on the units a logical axis is made of, not on the flattened
width: `q_heads` (`H*Dh` values) splits only when the head count `H` divides by the mesh
axis, so no head is ever cut in two. An axis whose units do not divide falls back to
replication (never to an uneven split).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from state.config import ModelConfig, ParallelConfig, RunnerConfig
from models.kv_cache import KVCache, kv_axes, kv_axis_sizes
from state.params import Params, param_specs

DATA, MODEL = "data", "model"

# Logical axis -> the mesh axis it is split over (None: replicated on every device).
RULES: dict[str, str | None] = {
    # Attention is split by heads, Megatron style: wq/wk/wv by output heads, wo by input
    # heads, so each device attends over its own heads and one all-reduce follows wo.
    "q_heads": MODEL,
    # KV heads split with the query heads they serve. When tensor_parallel_size is a
    # multiple of num_key_value_heads there is not one KV head per device: the KV heads
    # (wk, wv and the cache) are then replicated on every device, through the divisibility
    # fallback below. (vLLM replicates too, but keeps on each rank only the head its query
    # heads read; one "model" mesh axis cannot express that partial replication.)
    "kv_heads": MODEL,
    # MLP intermediate width: w_gate/w_up split by columns, w_down by rows (one all-reduce).
    "mlp": MODEL,
    # Vocabulary split, as vLLM's VocabParallelEmbedding/ParallelLMHead: embedding and
    # output projection are a large share of small models (a quarter of Qwen3-0.6B) and a
    # decode step reads the whole output projection, so replicating them would cost every
    # device that memory and bandwidth. The price is a masked lookup plus an all-reduce of
    # [T, D] activations, and the sampler's reductions over the vocabulary (log-sum-exp,
    # per-device top-k then a merge), all small next to the weights. Vocabularies that do
    # not divide fall back to replication.
    "vocab": MODEL,
    # Experts split over "model" (expert parallelism): each device holds whole experts and
    # computes the tokens routed to them; one all-reduce follows the expert down projection.
    # When the expert count does not divide, each expert's intermediate width splits instead.
    "experts": MODEL,
    "moe_mlp": MODEL,
    # Model width and per-head width stay whole: splitting them would need an all-reduce
    # inside every matmul and every norm.
    "embed": None,
    "head_dim": None,
    # KV cache blocks and slots: every device holds all blocks of its own KV heads.
    "kv_blocks": None,
    "block_slots": None,
}

def make_mesh(parallel_config: ParallelConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """A `("data", "model")` mesh of `data_parallel_size x tensor_parallel_size` devices.

    The first `dp * tp` of `devices` (default: `jax.devices()`, which spans every process
    after `jax.distributed.initialize`). Axes are `Auto`: the partitioner propagates
    shardings through the model code, which is written without sharding annotations.

    Raises:
        ValueError: fewer devices than the mesh needs, or, with several processes, a mesh
            that leaves some process's devices out (every process runs the same program).
    """
    dp, tp = parallel_config.data_parallel_size, parallel_config.tensor_parallel_size
    devices = list(jax.devices() if devices is None else devices)
    need = dp * tp
    if need > len(devices):
        platform = devices[0].platform if devices else "none"
        hint = (" (simulate more CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N "
                "set before JAX is imported)" if platform == "cpu" else "")
        raise ValueError(f"tensor_parallel_size={tp} x data_parallel_size={dp} needs {need} devices; "
                         f"{len(devices)} {platform} device(s) available{hint}")
    if jax.process_count() > 1 and need != len(devices):
        raise ValueError(f"with {jax.process_count()} processes the mesh must span all {len(devices)} "
                         f"devices; tensor_parallel_size={tp} x data_parallel_size={dp} = {need}")
    return jax.make_mesh((dp, tp), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:need])


def axis_units(model_config: ModelConfig) -> dict[str, int]:
    """How many indivisible units each logical weight axis holds (heads, not head values)."""
    m = model_config
    return {"vocab": m.vocab_size, "embed": m.hidden_size, "q_heads": m.num_attention_heads,
            "kv_heads": m.num_key_value_heads, "mlp": m.intermediate_size, "head_dim": m.head_dim,
            "experts": m.moe.num_experts if m.moe else 1, "moe_mlp": m.moe.intermediate_size if m.moe else 1}


def partition_spec(axes: tuple[str | None, ...], units: dict[str, int], mesh: Mesh) -> PartitionSpec:
    """The `PartitionSpec` of an array with logical `axes`, by `RULES`.

    A logical axis is split over its mesh axis only when its units divide by the mesh
    axis size; otherwise (or when the mesh axis is already used by an earlier dimension)
    that dimension is replicated.

    Raises:
        KeyError: a logical axis `RULES` does not know.
    """
    used: set[str] = set()
    spec: list[str | None] = []
    for axis in axes:
        if axis is None:
            spec.append(None)
            continue
        if axis not in RULES:
            raise KeyError(f"logical axis {axis!r} has no sharding rule; known axes: {', '.join(RULES)}")
        mesh_axis = RULES[axis]
        if (mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1
                or units[axis] % mesh.shape[mesh_axis] != 0):
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    # Trailing replicated dimensions are dropped, as in the shardings jitted programs
    # return: equal shardings keep every step's signature (and its compiled program) equal.
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_shardings(model_config: ModelConfig, mesh: Mesh) -> Params:
    """A `Params` tree of `NamedSharding`: where every weight lives on `mesh`."""
    units = axis_units(model_config)
    return jax.tree.map(lambda spec: NamedSharding(mesh, partition_spec(spec.axes, units, mesh)),
                        param_specs(model_config))


def kv_cache_shardings(config: RunnerConfig, mesh: Mesh, num_blocks: int) -> tuple[KVCache, ...]:
    """Per-layer `KVCache` of `NamedSharding`, for the configured backend's layout."""
    # A cache axis's units are its size: KV heads are whole heads already.
    sharding = NamedSharding(mesh, partition_spec(kv_axes(config), kv_axis_sizes(config, num_blocks), mesh))
    return tuple(KVCache(k=sharding, v=sharding) for _ in range(config.model_config.num_hidden_layers))


@functools.lru_cache(maxsize=16)
def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (what the host reads back from a step)."""
    return NamedSharding(mesh, PartitionSpec())


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of placed (or abstract, sharded) arrays."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total
