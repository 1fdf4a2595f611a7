"""Serving one model across several processes (hosts) with `jax.distributed`.

JAX runs multi-process programs SPMD: every process runs the same Python program, owns its
local devices, and a mesh over `jax.devices()` spans the devices of all processes. So the
recipe is: call `initialize` first thing in every process, then build the same `LLM` and
make the same calls in every process:

    import jax
    from runner import LLM, SamplingParams
    from runner.device import distributed

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

import dataclasses
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from runner.formats.files import parse_json
from state.config import (CacheConfig, LoadConfig, ModelConfig, ParallelConfig, RopeScaling, RunnerConfig,
                          SamplerConfig, SchedulerConfig)


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

    Values travel as JSON through `multihost_utils.process_allgather` (first the sizes,
    then the bytes, padded to the longest), so what a peer sends is only ever parsed as
    data, never run. `obj` may be built of None, bools, ints, finite floats, strings,
    lists, tuples, dicts with str or int keys, and the config records of `state.config`;
    tuples and records come back as what they were.

    Raises:
        ValueError: `obj` holds anything else (in every process: a process whose value
            cannot be sent still takes part in the exchange, so none is left waiting), or
            a peer sent bytes that are not such a value.
    """
    try:
        message = ["value", _to_json(obj)]
    except RecursionError:
        message = ["refused", "allgather_objects: the value nests too deeply to send"]
    except ValueError as e:
        message = ["refused", str(e)]
    if message[0] == "refused" and not is_multiprocess():
        raise ValueError(message[1])
    if not is_multiprocess():
        return [obj]
    gathered = [_parse_message(i, raw) for i, raw in enumerate(_allgather_bytes(_dump(message)))]
    refused = [(i, m[1]) for i, m in enumerate(gathered) if m[0] == "refused"]
    if refused:
        raise ValueError(f"allgather_objects: process {refused[0][0]} cannot send its value: {refused[0][1]}")
    return [_from_json(m[1]) for m in gathered]


def _allgather_bytes(data: bytes) -> list[bytes]:
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = np.frombuffer(data, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [gathered[i, :n].tobytes() for i, n in enumerate(sizes)]


def _dump(message: list[Any]) -> bytes:
    return json.dumps(message, allow_nan=False, separators=(",", ":")).encode()


def _parse_message(process: int, raw: bytes) -> list[Any]:
    try:
        message = parse_json(raw)
    except ValueError as e:
        raise ValueError(f"allgather_objects: process {process} sent bytes that are not JSON: {e}") from None
    if not (isinstance(message, list) and len(message) == 2 and message[0] in ("value", "refused")):
        raise ValueError(f"allgather_objects: process {process} sent {str(message)[:200]}, which is not "
                         "a message of this exchange")
    return message


# A record travels as its class name and fields and is rebuilt through its constructor,
# which validates it again; no other class is ever instantiated.
_RECORDS = {cls.__name__: cls for cls in (RunnerConfig, ModelConfig, RopeScaling, LoadConfig, CacheConfig,
                                          SchedulerConfig, ParallelConfig, SamplerConfig)}
_RECORD_NAMES = {cls: name for name, cls in _RECORDS.items()}


def _to_json(value: Any) -> Any:
    """`value` as JSON data: scalars as themselves, everything else tagged with its kind.

    Types are matched exactly: a subclass (an enum, a namedtuple) would come back as its
    base type, so it is refused instead.
    """
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"allgather_objects: {value} is not a finite float; only JSON values travel")
        return value
    if kind in (list, tuple):
        return {kind.__name__: [_to_json(v) for v in value]}
    if kind is dict:
        bad = [k for k in value if type(k) not in (str, int)]
        if bad:
            raise ValueError(f"allgather_objects: dict key {bad[0]!r} is not a str or int")
        return {"dict": [[k, _to_json(v)] for k, v in value.items()]}
    if kind in _RECORD_NAMES:
        return {"record": [_RECORD_NAMES[kind], {f.name: _to_json(getattr(value, f.name))
                                                 for f in dataclasses.fields(value)}]}
    raise ValueError(f"allgather_objects: cannot send a {type(value).__name__}; expected None, bool, int, "
                     f"float, str, list, tuple, dict or a state.config record")


def _from_json(data: Any) -> Any:
    """The value `_to_json` encoded; ValueError for anything it cannot have produced."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if not (isinstance(data, dict) and len(data) == 1):
        raise ValueError(f"allgather_objects: a peer sent {str(data)[:200]}, which is not an encoded value")
    (kind, body), = data.items()
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_from_json(v) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and isinstance(body, list) and all(
            isinstance(p, list) and len(p) == 2 and type(p[0]) in (str, int) for p in body):
        return {k: _from_json(v) for k, v in body}
    if kind == "record" and isinstance(body, list) and len(body) == 2 and body[0] in _RECORDS \
            and isinstance(body[1], dict):
        cls = _RECORDS[body[0]]
        try:
            return cls(**{k: _from_json(v) for k, v in body[1].items()})
        except TypeError as e:  # unknown or missing fields
            raise ValueError(f"allgather_objects: a peer sent a {body[0]} that does not fit it: {e}") from None
    raise ValueError(f"allgather_objects: a peer sent {str(data)[:200]}, which is not an encoded value")


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
