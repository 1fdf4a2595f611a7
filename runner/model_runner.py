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

from models.llama import compute_logits, forward
from runner import lifecycle
from runner.loader import load_params, validate_params
from runner.prepare import BucketSizes, prepare_batch, prepare_sampling
from runner.sampler import SamplerFlags, SamplingMetadata, prompt_logprobs, sample
from runner.scheduler import SchedulerOutput
from state.batch import Batch
from state.config import ModelConfig, RunnerConfig
from state.kv_cache import KVCache, allocate_kv_cache, resolve_num_blocks
from state.params import Params, param_bytes
from state.runner_state import RunnerState


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("kv_cache",))
def forward_step(params: Params, kv_cache: tuple[KVCache, ...], batch: Batch, cfg: ModelConfig,
                 backend: str) -> tuple[jax.Array, tuple[KVCache, ...]]:
    return forward(params, kv_cache, batch, cfg, backend)


@functools.partial(jax.jit, static_argnames=("flags",))
def sample_step(params: Params, hidden: jax.Array, logits_indices: jax.Array,
                meta: SamplingMetadata, flags: SamplerFlags):
    return sample(compute_logits(params, hidden[logits_indices]), meta, flags)


@jax.jit
def prompt_logprobs_step(params: Params, hidden: jax.Array, next_ids: jax.Array):
    return prompt_logprobs(compute_logits(params, hidden), next_ids)


@dataclass
class SequenceResult:
    token_id: int | None  # None when the step only advanced a prompt chunk
    logprob: float | None
    top_logprobs: dict[int, float] | None
    prompt_logprobs: list[dict[int, float] | None] | None  # this chunk's prompt positions


def free_device_bytes() -> int | None:
    """Free memory of the first device, when its backend reports it (GPUs do, CPUs do not)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


class ModelRunner:
    """The shell around one `RunnerState`: lifecycle operations swap it, steps read it."""

    def __init__(self, config: RunnerConfig, params: Params | None = None) -> None:
        if params is None:
            params = load_params(config)
        else:
            validate_params(params, config.model_config, check_finite=config.load_config.check_finite)
        free = free_device_bytes()
        num_blocks = resolve_num_blocks(config, None if free is None else free - param_bytes(params))
        kv_cache = allocate_kv_cache(config, num_blocks)
        self._state = RunnerState(
            config=config, params=params, kv_cache=kv_cache, num_blocks=num_blocks,
            param_shardings=jax.tree.map(lambda x: x.sharding, params),
            kv_shardings=jax.tree.map(lambda x: x.sharding, kv_cache))

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

    def execute_model(self, out: SchedulerOutput) -> dict[str, SequenceResult]:
        """Run one scheduled step: write its KV, sample the next token of finished prefills
        and decodes, gather requested log-probabilities. Returns results by request id."""
        state = self._state
        state.check_servable()
        cfg = state.config.model_config
        batch, sizes = prepare_batch(out, state.config.cache_config.block_size)
        meta, flags = prepare_sampling(out, sizes.num_seqs, cfg.vocab_size)
        hidden, kv_cache = forward_step(state.params, state.kv_cache, batch, cfg.for_compile(),
                                        state.config.cache_config.attention_backend)
        # The old cache buffers were donated: the record must point at the new ones now.
        self._state = state = replace(state, kv_cache=kv_cache)
        sampled = sample_step(state.params, hidden, batch.logits_indices, meta, flags)
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
        chosen, top_ids, top_lps = jax.device_get(prompt_logprobs_step(self._state.params, hidden, next_ids))
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

