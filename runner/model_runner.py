"""`ModelRunner`: holds the one `RunnerState` record and runs scheduled steps on it.

The jitted functions below are the whole device program. They take every array as an
argument (weights are never closed over, so a weight swap cannot recompile) and the KV
cache is donated (updated in place). Forward and sampling are two programs: their shape
keys differ (tokens and blocks versus sequences and sampler switches), so keeping them
apart makes the number of compilations a sum, not a product.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from models.llama import compute_logits, forward
from runner import distributed, lifecycle, sharding
from runner.loader import load_params, validate_params
from runner.prepare import BucketSizes, prepare_batch, prepare_sampling
from runner.sampler import SamplerFlags, SamplingMetadata, prompt_logprobs, sample
from runner.scheduler import SchedulerOutput
from state.batch import Batch, bucket
from state.config import ModelConfig, RunnerConfig
from state.kv_cache import KVCache, allocate_kv_cache, bytes_per_block, kv_cache_specs, resolve_num_blocks
from state.params import Params
from state.runner_state import RunnerState


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "kv_shardings"),
                   donate_argnames=("kv_cache",))
def _forward_step(params: Params, kv_cache: tuple[KVCache, ...], batch: Batch, cfg: ModelConfig,
                  backend: str, kv_shardings: Any) -> tuple[jax.Array, tuple[KVCache, ...]]:
    hidden, kv_cache = forward(params, kv_cache, batch, cfg, backend)
    if kv_shardings is not None:
        # The updated cache keeps the input's sharding: the next step then finds the same
        # signature (no recompilation) and the donated buffers can be reused in place.
        kv_cache = jax.lax.with_sharding_constraint(
            kv_cache, tuple(KVCache(k=k, v=v) for k, v in kv_shardings))
    return hidden, kv_cache


@functools.partial(jax.jit, static_argnames=("flags", "out_sharding"))
def _sample_step(params: Params, rows: jax.Array, meta: SamplingMetadata, flags: SamplerFlags,
                 out_sharding: Any):
    return _constrain(sample(compute_logits(params, rows), meta, flags), out_sharding)


@jax.jit
def select_rows(hidden: jax.Array, logits_indices: jax.Array) -> jax.Array:
    """[B, D] hidden states of the tokens that predict a next token."""
    return hidden[logits_indices]


@functools.partial(jax.jit, static_argnames=("out_sharding",))
def _prompt_logprobs_step(params: Params, hidden: jax.Array, next_ids: jax.Array, out_sharding: Any):
    return _constrain(prompt_logprobs(compute_logits(params, hidden), next_ids), out_sharding)


def forward_step(params: Params, kv_cache: tuple[KVCache, ...], batch: Batch, cfg: ModelConfig,
                 backend: str) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """One forward over the paged cache; `kv_cache` is donated and comes back on the
    shardings it went in with."""
    return _forward_step(params, kv_cache, batch, cfg=cfg, backend=backend,
                         kv_shardings=_named_shardings(kv_cache))


def sample_step(params: Params, rows: jax.Array, meta: SamplingMetadata, flags: SamplerFlags):
    """Sampled tokens and log-probabilities for `rows: [B, D]` hidden states, replicated on
    every device of the weights' mesh, so that every process can read them back."""
    return _sample_step(params, rows, meta, flags=flags, out_sharding=_replicated_like(params))


def prompt_logprobs_step(params: Params, hidden: jax.Array, next_ids: jax.Array):
    """Prompt log-probabilities of every scheduled token, replicated like `sample_step`'s."""
    return _prompt_logprobs_step(params, hidden, next_ids, out_sharding=_replicated_like(params))


def _constrain(tree: Any, placement: NamedSharding | None) -> Any:
    return tree if placement is None else jax.lax.with_sharding_constraint(tree, placement)


def _named_shardings(kv_cache: tuple[KVCache, ...]) -> tuple[tuple[Any, Any], ...] | None:
    """The cache's per-layer (k, v) shardings, when it is placed on a mesh (a static,
    hashable argument); None for arrays JAX placed itself."""
    first = kv_cache[0].k.sharding if kv_cache else None
    if not isinstance(first, NamedSharding):
        return None
    return tuple((c.k.sharding, c.v.sharding) for c in kv_cache)


def _replicated_like(params: Params) -> NamedSharding | None:
    placed = params.embed.sharding
    return sharding.replicated(placed.mesh) if isinstance(placed, NamedSharding) else None


@dataclass
class SequenceResult:
    token_id: int | None  # None when the step only advanced a prompt chunk
    logprob: float | None
    top_logprobs: dict[int, float] | None
    prompt_logprobs: list[dict[int, float] | None] | None  # this chunk's prompt positions


def free_device_bytes(device: jax.Device | None = None) -> int | None:
    """Free memory of `device` (default: this process's first), when its backend reports it
    (GPUs do, CPUs do not)."""
    stats = (device or jax.local_devices()[0]).memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def _free_kv_bytes(config: RunnerConfig, mesh: Mesh) -> int | None:
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


class ModelRunner:
    """The shell around one `RunnerState`: lifecycle operations swap it, steps read it."""

    def __init__(self, config: RunnerConfig, params: Params | None = None) -> None:
        """Build the device mesh of `config.parallel_config`, place the weights on their
        shardings (loading them straight there, or copying a caller's tree there, so the
        caller keeps its own arrays) and allocate the KV cache on its shardings."""
        mesh = sharding.make_mesh(config.parallel_config)
        param_shardings = sharding.param_shardings(config.model_config, mesh)
        if params is None:
            params = load_params(config, param_shardings)
        else:
            validate_params(params, config.model_config, check_finite=config.load_config.check_finite)
            params = jax.tree.map(lambda x, s: jax.device_put(x, s, may_alias=False), params, param_shardings)
        num_blocks = resolve_num_blocks(config, _free_kv_bytes(config, mesh))
        # Every process must allocate the same cache (they run one program): the smallest.
        num_blocks = min(distributed.allgather_objects(num_blocks))
        kv_shardings = sharding.kv_cache_shardings(config, mesh, num_blocks)
        kv_cache = allocate_kv_cache(config, num_blocks, kv_shardings)
        self._state = RunnerState(
            config=config, params=params, kv_cache=kv_cache, num_blocks=num_blocks,
            param_shardings=param_shardings, kv_shardings=kv_shardings)

    # -- the record --------------------------------------------------------------------

    @property
    def state(self) -> RunnerState:
        return self._state

    @property
    def config(self) -> RunnerConfig:
        return self._state.config

    @property
    def params(self) -> Params | None:
        return self._state.params

    @property
    def num_blocks(self) -> int:
        return self._state.num_blocks

    @property
    def mesh(self) -> Mesh:
        """The device mesh the weights and the KV cache are laid out on."""
        return self._state.param_shardings.embed.mesh

    # -- lifecycle: each builds a complete new record, then swaps -----------------------

    def update_config(self, overrides: dict[str, Any]) -> RunnerConfig:
        self._state = lifecycle.update_config(self._state, overrides)
        return self._state.config

    def reload_weights(self, weights_path: str | None = None, weights_iterator: Any = None,
                       params: Params | None = None, is_checkpoint_format: bool = True) -> None:
        self._state = lifecycle.reload_weights(self._state, weights_path=weights_path,
                                               weights_iterator=weights_iterator, params=params,
                                               is_checkpoint_format=is_checkpoint_format)

    def sleep(self, level: int = 1) -> None:
        self._state = lifecycle.sleep(self._state, level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self._state = lifecycle.wake_up(self._state, tags)

    # -- one step ----------------------------------------------------------------------

    def run_forward(self, batch: Batch) -> jax.Array:
        """The forward program on `batch`; the record takes the updated (donated) cache."""
        state = self._state
        state.check_servable()
        try:
            hidden, kv_cache = forward_step(state.params, state.kv_cache, batch,
                                            state.config.model_config.for_compile(),
                                            state.config.cache_config.attention_backend)
        except BaseException:
            # Interrupted after the cache was donated: the record would point at deleted
            # buffers. Start over from an empty cache (its contents are lost either way;
            # the engine drops its prefix cache when a call fails).
            if any(leaf.is_deleted() for leaf in jax.tree.leaves(state.kv_cache)):
                self._state = replace(state, kv_cache=allocate_kv_cache(
                    state.config, state.num_blocks, state.kv_shardings))
            raise
        # The old cache buffers were donated: the record must point at the new ones now.
        self._state = replace(state, kv_cache=kv_cache)
        return hidden

    def run_sampler(self, rows: jax.Array, meta: SamplingMetadata, flags: SamplerFlags) -> Any:
        return sample_step(self._state.params, rows, meta, flags)

    def run_prompt_logprobs(self, hidden: jax.Array, next_ids: Any) -> Any:
        return prompt_logprobs_step(self._state.params, hidden, next_ids)

    def execute_model(self, out: SchedulerOutput) -> dict[str, SequenceResult]:
        """Run one scheduled step: write its KV, sample the next token of finished prefills
        and decodes, gather requested log-probabilities. Returns results by request id.

        A step mixing single-token sequences (decodes) with longer ones (prefills, chunks)
        runs as two programs: the decodes through the decode batch, the rest through the
        general batch. The general batch's masked attention costs its tokens times every
        key it lists; keeping decode contexts out of it is worth reading the weights twice
        (measured on W1 at batch 32: mixed steps 4x cheaper). Both shapes are ones the
        warm-up compiles already, and each sequence's computation is the same either way.
        """
        decodes = [s for s in out.scheduled if s.num_tokens == 1]
        if decodes and len(decodes) < len(out.scheduled):
            results = self._execute(SchedulerOutput(decodes))
            results.update(self._execute(SchedulerOutput([s for s in out.scheduled if s.num_tokens > 1])))
            return results
        return self._execute(out)

    def _execute(self, out: SchedulerOutput) -> dict[str, SequenceResult]:
        config = self._state.config
        batch, sizes = prepare_batch(out, config.cache_config.block_size,
                                     config.scheduler_config.max_num_seqs)
        meta, flags = prepare_sampling(out, sizes.num_seqs, config.model_config.vocab_size,
                                       bucket(config.scheduler_config.max_model_len))
        hidden = self.run_forward(batch)
        sampled = self.run_sampler(select_rows(hidden, batch.logits_indices), meta, flags)
        chunk_logprobs = self._prompt_logprobs(out, hidden, sizes)
        sampled = jax.device_get(sampled)
        results = {}
        offset = 0
        for i, s in enumerate(out.scheduled):
            p = s.request.sampling_params
            token = logprob = top = None
            if s.samples:
                token, logprob = int(sampled.token_ids[i]), float(sampled.logprobs[i])
                if p.logprobs is not None:
                    top = _top_dict(sampled.top_ids[i], sampled.top_logprobs[i], p.logprobs, token, logprob)
            plp = chunk_logprobs[offset:offset + s.num_tokens] if chunk_logprobs is not None else None
            results[s.request.request_id] = SequenceResult(token, logprob, top, plp)
            offset += s.num_tokens
        return results

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: jax.Array,
                         sizes: BucketSizes) -> list[dict[int, float] | None] | None:
        """Per scheduled token: the prompt-logprob entry of the *next* prompt position."""
        wanted = [s for s in out.scheduled
                  if s.request.sampling_params.prompt_logprobs is not None and s.request.is_prefilling_prompt]
        if not wanted:
            return None
        next_ids = np.zeros(sizes.num_tokens, np.int32)
        offset = 0
        for s in out.scheduled:
            prompt = s.request.prompt_token_ids
            for j, pos in enumerate(range(s.start, s.end)):
                if pos + 1 < len(prompt):
                    next_ids[offset + j] = prompt[pos + 1]
            offset += s.num_tokens
        chosen, top_ids, top_lps = jax.device_get(self.run_prompt_logprobs(hidden, next_ids))
        entries: list[dict[int, float] | None] = []
        offset = 0
        for s in out.scheduled:
            prompt = s.request.prompt_token_ids
            k = s.request.sampling_params.prompt_logprobs
            for j, pos in enumerate(range(s.start, s.end)):
                t = offset + j
                if k is None or pos + 1 >= len(prompt):
                    entries.append(None)
                else:
                    entries.append(_top_dict(top_ids[t], top_lps[t], k, int(next_ids[t]), float(chosen[t])))
            offset += s.num_tokens
        return entries


def _top_dict(ids: np.ndarray, logprobs: np.ndarray, k: int, token: int, logprob: float) -> dict[int, float]:
    """The top `k` entries plus the chosen token, as vLLM reports them."""
    entries = {int(i): float(lp) for i, lp in zip(ids[:k], logprobs[:k])}
    entries[token] = logprob
    return entries

