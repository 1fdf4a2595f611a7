"""Serving one model across several processes (hosts) with `jax.distributed`.

JAX runs multi-process programs SPMD: every process runs the same Python program, owns its
local devices, and a mesh over `jax.devices()` spans the devices of all processes. So the
recipe is: call `initialize` first thing in every process, then build the same `LLM` and
make the same calls in every process:

    import jax
    from runner import LLM, SamplingParams, distributed

    distributed.initialize("10.0.0.1:4321", num_processes=2, process_id=RANK)
    llm = LLM("path/to/model", tensor_parallel_size=jax.device_count())
    outputs = llm.generate(prompts, SamplingParams(temperature=0))  # same outputs in every process

Every process must see the same checkpoint folder (or pass the same `params`) and make the
same calls with the same arguments: a process that skips a step, or steps with other
inputs, leaves the others waiting in a collective. What a step returns to the host
(sampled tokens, log-probabilities) is replicated on every device, so each process reads
its own copy; `LLM.collective_rpc` gathers its per-process results with
`jax.experimental.multihost_utils`.

On one machine, CPU processes can stand in for hosts (tests do): give each process
simulated devices with `XLA_FLAGS=--xla_force_host_platform_device_count=N` (set before
JAX is imported) and `JAX_PLATFORMS=cpu`; `initialize` then selects the gloo collectives
CPU processes need to talk to each other.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               local_device_ids: int | Sequence[int] | None = None, platform: str | None = None,
               initialization_timeout: int = 300) -> None:
    """Join this process to a `num_processes` JAX cluster. Call it before any other JAX call.

    Args:
        coordinator_address: `host:port` of process 0, reachable from every process.
        num_processes: processes in the cluster.
        process_id: this process's rank, 0 .. num_processes - 1.
        local_device_ids: the local devices this process uses (default: all of them).
        platform: the platform the devices are on; default: the first of `JAX_PLATFORMS`,
            else "cpu" unless a GPU or TPU plugin is installed. On "cpu" the processes
            exchange data through gloo collectives.
        initialization_timeout: seconds to wait for every process to join.
    """
    if (platform or _default_platform()) == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)


def shutdown() -> None:
    """Leave the cluster (also done at interpreter exit)."""
    jax.distributed.shutdown()


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def allgather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, in process order; every process must call it.

    Objects travel pickled through `multihost_utils.process_allgather` (first the sizes,
    then the bytes, padded to the longest): meant for the small results of lifecycle calls
    among the processes of one job, which trust each other.
    """
    if not is_multiprocess():
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[i, :n].tobytes()) for i, n in enumerate(sizes)]


def _default_platform() -> str:
    configured = jax.config.jax_platforms
    if configured:
        return configured.split(",")[0].strip().lower()
    for gpu_plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin"):
        if importlib.util.find_spec(gpu_plugin) is not None:
            return "gpu"
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    return "cpu"


def call_everywhere(name: str, call: Callable[[], Any]) -> list:
    """Run `call` in this process (every process makes the same call) and gather every
    process's result, in process order. A failure in any process raises in all of them."""
    try:
        result, error = call(), None
    except Exception as e:  # noqa: BLE001 - raised below, once every process has reported
        result, error = None, e
    gathered = allgather_objects((result, None if error is None else repr(error)))
    if error is not None:
        raise error
    failed = [(i, e) for i, (_, e) in enumerate(gathered) if e is not None]
    if failed:
        raise RuntimeError(f"collective_rpc({name!r}) failed in process {failed[0][0]}: {failed[0][1]}")
    return [r for r, _ in gathered]
