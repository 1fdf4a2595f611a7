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
from runner import lifecycle, sharding
from runner.prepare import BucketSizes, prepare_batch, prepare_sampling
from runner.sampler import SamplerFlags, SamplingMetadata, prompt_logprobs, sample
from runner.scheduler import SchedulerOutput
from state.batch import Batch, bucket
from state.config import ModelConfig, RunnerConfig
from state.kv_cache import KVCache, allocate_kv_cache
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


@functools.partial(jax.jit, static_argnames=("flags", "logit_cap", "out_sharding"))
def _sample_step(params: Params, rows: jax.Array, meta: SamplingMetadata, flags: SamplerFlags,
                 logit_cap: float | None, out_sharding: Any):
    return _constrain(sample(compute_logits(params, rows, logit_cap), meta, flags), out_sharding)


@jax.jit
def select_rows(hidden: jax.Array, logits_indices: jax.Array) -> jax.Array:
    """[B, D] hidden states of the tokens that predict a next token."""
    return hidden[logits_indices]


@functools.partial(jax.jit, static_argnames=("logit_cap", "out_sharding"))
def _prompt_logprobs_step(params: Params, hidden: jax.Array, next_ids: jax.Array, logit_cap: float | None,
                          out_sharding: Any):
    return _constrain(prompt_logprobs(compute_logits(params, hidden, logit_cap), next_ids), out_sharding)


def forward_step(params: Params, kv_cache: tuple[KVCache, ...], batch: Batch, cfg: ModelConfig,
                 backend: str) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """One forward over the paged cache; `kv_cache` is donated and comes back on the
    shardings it went in with."""
    return _forward_step(params, kv_cache, batch, cfg=cfg, backend=backend,
                         kv_shardings=_named_shardings(kv_cache))


def sample_step(params: Params, rows: jax.Array, meta: SamplingMetadata, flags: SamplerFlags,
                logit_cap: float | None):
    """Sampled tokens and log-probabilities for `rows: [B, D]` hidden states, replicated on
    every device of the weights' mesh, so that every process can read them back.
    `logit_cap`: the model's `final_logit_softcapping`."""
    return _sample_step(params, rows, meta, flags=flags, logit_cap=logit_cap,
                        out_sharding=_replicated_like(params))


def prompt_logprobs_step(params: Params, hidden: jax.Array, next_ids: jax.Array, logit_cap: float | None):
    """Prompt log-probabilities of every scheduled token, replicated like `sample_step`'s."""
    return _prompt_logprobs_step(params, hidden, next_ids, logit_cap=logit_cap,
                                 out_sharding=_replicated_like(params))


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


@dataclass(frozen=True)
class SequenceResult:
    """What one step computed for one scheduled request, as host values (the engine's
    `update` turns them into outputs)."""

    token_id: int | None = None  # None when the step only advanced a prompt chunk
    logprob: float | None = None
    rank: int | None = None  # of the token in the full distribution, when logprobs are asked
    top_ids: np.ndarray | None = None  # [MAX_LOGPROBS] most likely next tokens, when asked
    top_logprobs: np.ndarray | None = None  # [MAX_LOGPROBS] their log-probabilities
    prompt_logprobs: PromptLogprobs | None = None  # this chunk's positions, when asked


@dataclass(frozen=True)
class PromptLogprobs:
    """Per token of a prompt chunk: the log-probability of the prompt's next token and
    the most likely next tokens. Row j belongs to position start + j; rows whose next
    position lies outside the prompt hold nothing meaningful."""

    next_logprobs: np.ndarray  # [n]
    top_ids: np.ndarray  # [n, MAX_LOGPROBS]
    top_logprobs: np.ndarray  # [n, MAX_LOGPROBS]
    ranks: np.ndarray  # [n] 1-based rank of the next prompt token


class ModelRunner:
    """The shell around one `RunnerState`: lifecycle operations swap it, steps read it."""

    def __init__(self, config: RunnerConfig, params: Params | None = None) -> None:
        """Create the runner's first record (`runner.lifecycle.create`)."""
        self._state = lifecycle.create(config, params)

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
                       params: Params | None = None, is_checkpoint_format: bool = True,
                       assume_same_model: bool = False) -> None:
        self._state = lifecycle.reload_weights(self._state, weights_path=weights_path,
                                               weights_iterator=weights_iterator, params=params,
                                               is_checkpoint_format=is_checkpoint_format,
                                               assume_same_model=assume_same_model)

    def sleep(self, level: int = 1) -> None:
        old = self._state
        self._state = lifecycle.sleep(old, level)
        lifecycle.release(old)  # only once no record points at the buffers any more

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
                # The same allocation as creation and wake_up.
                self._state = replace(state, kv_cache=allocate_kv_cache(
                    state.config, state.num_blocks, state.kv_shardings))
            raise
        # The old cache buffers were donated: the record must point at the new ones now.
        self._state = replace(state, kv_cache=kv_cache)
        return hidden

    def run_sampler(self, rows: jax.Array, meta: SamplingMetadata, flags: SamplerFlags) -> Any:
        return sample_step(self._state.params, rows, meta, flags,
                           self._state.config.model_config.final_logit_softcapping)

    def run_prompt_logprobs(self, hidden: jax.Array, next_ids: Any) -> Any:
        return prompt_logprobs_step(self._state.params, hidden, next_ids,
                                    self._state.config.model_config.final_logit_softcapping)

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
        prompt = self._prompt_logprobs(out, hidden, sizes)
        sampled = jax.device_get(sampled)
        results = {}
        offset = 0
        for i, s in enumerate(out.scheduled):
            fields: dict[str, Any] = {}
            if s.samples:
                fields.update(token_id=int(sampled.token_ids[i]), logprob=float(sampled.logprobs[i]))
                if s.request.sampling_params.logprobs is not None:
                    fields.update(rank=int(sampled.ranks[i]), top_ids=sampled.top_ids[i],
                                  top_logprobs=sampled.top_logprobs[i])
            if prompt is not None and s.request.sampling_params.prompt_logprobs is not None:
                rows = slice(offset, offset + s.num_tokens)
                fields["prompt_logprobs"] = PromptLogprobs(*(a[rows] for a in prompt))
            results[s.request.request_id] = SequenceResult(**fields)
            offset += s.num_tokens
        return results

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: jax.Array,
                         sizes: BucketSizes) -> tuple[np.ndarray, ...] | None:
        """Per scheduled token: the log-probability of the *next* prompt token and the top
        entries there, for steps where some request still gathers prompt logprobs."""
        if not any(s.request.sampling_params.prompt_logprobs is not None and s.request.is_prefilling_prompt
                   for s in out.scheduled):
            return None
        next_ids = np.zeros(sizes.num_tokens, np.int32)
        offset = 0
        for s in out.scheduled:
            prompt = s.request.prompt_token_ids
            for j, pos in enumerate(range(s.start, s.end)):
                if pos + 1 < len(prompt):
                    next_ids[offset + j] = prompt[pos + 1]
            offset += s.num_tokens
        return jax.device_get(self.run_prompt_logprobs(hidden, next_ids))
