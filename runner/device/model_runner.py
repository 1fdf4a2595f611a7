"""`ModelRunner`: holds the one `RunnerState` record and runs scheduled steps on it.

The jitted functions below are the whole device program. They take every array as an
argument (weights are never closed over, so a weight swap cannot recompile) and the KV
cache is donated (updated in place). Two programs serve a step: the general step (forward
of prefills and chunks, then sampling of the rows that finish their known tokens) and the
multi-step decode (`models.decode_loop`: up to K decode steps with sampling inside). Sampling
sits in the same program as the forward: the sampler's stages are switched on the device
(`sample_switched`), so its switches add no compilations, and no hidden state or logits
cross a program boundary (a separate sampler program would add a call and a logits round
trip to every step).

The programs read the record's weights through `program_params`: the same tree, except
that on CPU a tied model's projection comes from a `[D, V]` copy of the embedding, made
once per weight tree and dropped with it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from models.llama import compute_logits, forward
from runner.device import lifecycle, sharding, weight_sync
from models.decode_loop import DecodeState, MultiStepOutput, RowSettings, multi_step_decode, step_metadata
from runner.device.prepare import (BucketSizes, multi_step_block_tables, prepare_batch, prepare_rows,
                                   prepare_state)
from models.sampler import SamplerOutput, prompt_logprobs, sample_switched
from state.step import SchedulerOutput
from state.batch import Batch, bucket
from state.config import ModelConfig, RunnerConfig
from models.kv_cache import KVCache, allocate_kv_cache, blocks_per_seq
from state.params import Params
from runner.device.runner_state import RunnerState


def _keep_shardings(kv_cache: tuple[KVCache, ...], kv_shardings: Any) -> tuple[KVCache, ...]:
    """The updated cache keeps the input's sharding: the next step then finds the same
    signature (no recompilation) and the donated buffers can be reused in place."""
    if kv_shardings is None:
        return kv_cache
    return jax.lax.with_sharding_constraint(kv_cache, tuple(KVCache(k=k, v=v) for k, v in kv_shardings))


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "kv_shardings"),
                   donate_argnames=("kv_cache",))
def _forward_logits(params: Params, kv_cache: tuple[KVCache, ...], batch: Batch, cfg: ModelConfig,
                    backend: str, kv_shardings: Any) -> tuple[jax.Array, tuple[KVCache, ...]]:
    hidden, kv_cache = forward(params, kv_cache, batch, cfg, backend)
    logits = compute_logits(params, hidden, cfg.final_logit_softcapping)
    return logits, _keep_shardings(kv_cache, kv_shardings)


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "kv_shardings", "out_sharding"),
                   donate_argnames=("kv_cache",))
def _general_step(params: Params, kv_cache: tuple[KVCache, ...], batch: Batch, rows: RowSettings,
                  state: DecodeState, cfg: ModelConfig, backend: str, kv_shardings: Any,
                  out_sharding: Any) -> tuple[SamplerOutput, jax.Array, tuple[KVCache, ...]]:
    hidden, kv_cache = forward(params, kv_cache, batch, cfg, backend)
    kv_cache = _keep_shardings(kv_cache, kv_shardings)
    logits = compute_logits(params, hidden[batch.logits_indices], cfg.final_logit_softcapping)
    sampled = sample_switched(logits, step_metadata(rows, state), rows.num_logprobs)
    return _constrain(sampled, out_sharding), hidden, kv_cache


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "max_steps", "block_size", "kv_shardings",
                                             "out_sharding"),
                   donate_argnames=("kv_cache",))
def _multi_step(params: Params, kv_cache: tuple[KVCache, ...], rows: RowSettings, state: DecodeState,
                num_steps: jax.Array, cfg: ModelConfig, backend: str, max_steps: int, block_size: int,
                kv_shardings: Any, out_sharding: Any) -> tuple[MultiStepOutput, tuple[KVCache, ...]]:
    kv_cache, _, out = multi_step_decode(params, kv_cache, rows, state, num_steps, cfg, backend, max_steps,
                                         block_size)
    return _constrain(out, out_sharding), _keep_shardings(kv_cache, kv_shardings)


# Rows of logits the prompt-logprobs program holds at once: a step's T x V logits would be
# 2.5 GB float32 at T = 4096 with a 152k vocabulary.
PROMPT_LOGPROBS_ROWS = 512


@functools.partial(jax.jit, static_argnames=("logit_cap", "out_sharding"))
def _prompt_logprobs_step(params: Params, hidden: jax.Array, next_ids: jax.Array, logit_cap: float | None,
                          out_sharding: Any):
    T, D = hidden.shape
    rows = min(T, PROMPT_LOGPROBS_ROWS)
    rows = rows if T % rows == 0 else T  # T is a power-of-two bucket: the chunks tile it
    chunks = jax.lax.map(lambda c: prompt_logprobs(compute_logits(params, c[0], logit_cap), c[1]),
                         (hidden.reshape(T // rows, rows, D), next_ids.reshape(T // rows, rows)))
    return _constrain(jax.tree.map(lambda a: a.reshape(T, *a.shape[2:]), chunks), out_sharding)


def forward_logits(params: Params, kv_cache: tuple[KVCache, ...], batch: Batch, cfg: ModelConfig,
                   backend: str) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Forward of `batch` and the logits of every position, no sampling: ([T, V], the
    donated cache on the shardings it came in with). The scoring seam
    (`runner.engine.scoring`), not a serving program."""
    return _forward_logits(params, kv_cache, batch, cfg=cfg, backend=backend,
                           kv_shardings=_named_shardings(kv_cache))


def general_step(params: Params, kv_cache: tuple[KVCache, ...], batch: Batch, rows: RowSettings,
                 state: DecodeState, cfg: ModelConfig, backend: str) -> tuple[Any, jax.Array, Any]:
    """Forward of a general batch and the sampled next token of each of its `rows`:
    (sampled, replicated like `multi_step`'s tokens; hidden [T, D]; the donated cache)."""
    return _general_step(params, kv_cache, batch, rows, state, cfg=cfg, backend=backend,
                         kv_shardings=_named_shardings(kv_cache), out_sharding=_replicated_like(params))


def multi_step(params: Params, kv_cache: tuple[KVCache, ...], rows: RowSettings, state: DecodeState,
               num_steps: int, cfg: ModelConfig, backend: str, max_steps: int,
               block_size: int) -> tuple[Any, Any]:
    """Up to `num_steps` decode steps (one program for every `num_steps <= max_steps`):
    (the steps' tokens, replicated on every device of the weights' mesh so that every
    process can read them back; the donated cache)."""
    return _multi_step(params, kv_cache, rows, state, np.int32(num_steps), cfg=cfg, backend=backend,
                       max_steps=max_steps, block_size=block_size, kv_shardings=_named_shardings(kv_cache),
                       out_sharding=_replicated_like(params))


def prompt_logprobs_step(params: Params, hidden: jax.Array, next_ids: jax.Array, logit_cap: float | None):
    """Prompt log-probabilities of every scheduled token, replicated like `multi_step`'s tokens.
    `logit_cap`: the model's `final_logit_softcapping`."""
    return _prompt_logprobs_step(params, hidden, next_ids, logit_cap=logit_cap,
                                 out_sharding=_replicated_like(params))


@jax.jit
def _transposed(x: jax.Array) -> jax.Array:
    return x.T


def program_params(params: Params) -> Params:
    """The weights as the step programs read them.

    On CPU a tied model's projection also gets a `[D, V]` copy of the embedding as its
    `lm_head`: XLA's CPU dot reads `[B, D] x [D, V]` faster than the embedding's own
    `[B, D] x [V, D]` contraction. The copy costs V x D more weight memory. On GPUs the
    matrix units take either layout and the tree is used as it is.
    """
    if params.lm_head is not None or next(iter(params.embed.devices())).platform != "cpu":
        return params
    return replace(params, lm_head=_transposed(params.embed))


def multi_step_program(config: RunnerConfig, num_steps: int) -> int:
    """The static length (`max_steps`) of the program that runs `num_steps` decode steps
    in one call.

    One-step calls (between prefill chunks, or with `decode_steps=1`) run their own
    program: on the reference backend a multi-step decode first copies every row's blocks
    (`models.multi_step_attention`), which only pays over several steps; a single step
    would pay for the copy and then read it once.
    """
    return 1 if num_steps == 1 else config.scheduler_config.max_decode_steps


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
    `update` turns them into outputs): one token, or a multi-step decode's tokens."""

    token_ids: tuple[int, ...] = ()  # in order; empty when the step only advanced a prompt chunk
    logprobs: tuple[float, ...] = ()
    ranks: tuple[int, ...] = ()  # of each token in the full distribution, when logprobs are asked
    top_ids: np.ndarray | None = None  # [n, MAX_LOGPROBS] most likely tokens per step, when asked
    top_logprobs: np.ndarray | None = None  # [n, MAX_LOGPROBS] their log-probabilities
    prompt_logprobs: PromptLogprobs | None = None  # this chunk's positions, when asked
    weight_version: int = 0  # of the weights that computed it


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
        """Create the runner's first record (`runner.device.lifecycle.create`)."""
        self._state = lifecycle.create(config, params)
        # (the record's params, `program_params` of them): derived once per weight tree
        self._program_params: tuple[Params, Params] | None = None

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

    @property
    def weight_version(self) -> int:
        return self._state.weight_version

    def reload_weights(self, weights_path: str | None = None, weights_iterator: Any = None,
                       params: Params | None = None, is_checkpoint_format: bool = True,
                       assume_same_model: bool = False, donate: bool = False,
                       version: int | None = None) -> None:
        self._state = lifecycle.reload_weights(self._state, weights_path=weights_path,
                                               weights_iterator=weights_iterator, params=params,
                                               is_checkpoint_format=is_checkpoint_format,
                                               assume_same_model=assume_same_model, donate=donate,
                                               version=version)
        self._program_params = None  # derived from the old tree: not kept alive past the swap

    def update_weights(self, buckets: Any, *, version: int | None = None, is_checkpoint_format: bool = True,
                       donate: bool = False) -> None:
        """A streamed update (`runner.device.weight_sync.streamed_update`): the record is
        swapped at every step, so an error leaves the last one, which says what is stale."""
        updates = weight_sync.streamed_update(self._state, buckets, version=version,
                                              is_checkpoint_format=is_checkpoint_format, donate=donate)
        self._program_params = None  # a derived copy would outlive the leaves it came from
        for state in updates:
            self._state = state

    def sleep(self, level: int = 1) -> None:
        old = self._state
        self._state = lifecycle.sleep(old, level)
        self._program_params = None  # the derived copies go with the weights
        lifecycle.release(old)  # only once no record points at the buffers any more

    def wake_up(self, tags: list[str] | None = None) -> None:
        self._state = lifecycle.wake_up(self._state, tags)

    # -- one step ----------------------------------------------------------------------

    def run_general(self, batch: Batch, rows: RowSettings, state: DecodeState) -> tuple[Any, jax.Array]:
        """The general step on `batch`; the record takes the updated (donated) cache."""
        s = self._state
        sampled, hidden, kv_cache = self._donating(
            general_step, batch, rows, state, s.config.model_config.for_compile(),
            s.config.cache_config.attention_backend)
        return sampled, hidden

    def run_forward(self, batch: Batch) -> jax.Array:
        """The logits [T, V] of every position of `batch`, whose KV the cache takes."""
        config = self._state.config
        logits, _ = self._donating(forward_logits, batch, config.model_config.for_compile(),
                                   config.cache_config.attention_backend)
        return logits

    def run_decode(self, rows: RowSettings, state: DecodeState, num_steps: int) -> Any:
        """`num_steps` decode steps in one call; the record takes the updated (donated) cache."""
        config = self._state.config
        out, _ = self._donating(multi_step, rows, state, num_steps, config.model_config.for_compile(),
                                config.cache_config.attention_backend, multi_step_program(config, num_steps),
                                config.cache_config.block_size)
        return out

    def _donating(self, program: Any, *args: Any) -> tuple:
        """Run `program(params, kv_cache, *args)`, whose last result is the updated cache."""
        state = self._state
        state.check_servable()
        try:
            *results, kv_cache = program(self._weights(), state.kv_cache, *args)
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
        return (*results, kv_cache)

    def _weights(self) -> Params:
        """The record's weights as the programs read them (`program_params`)."""
        params = self._state.params
        if self._program_params is None or self._program_params[0] is not params:
            self._program_params = (params, program_params(params))
        return self._program_params[1]

    def run_prompt_logprobs(self, hidden: jax.Array, next_ids: Any) -> Any:
        return prompt_logprobs_step(self._weights(), hidden, next_ids,
                                    self._state.config.model_config.final_logit_softcapping)

    def execute_model(self, out: SchedulerOutput) -> dict[str, SequenceResult]:
        """Run one scheduled step: write its KV, sample the next token of finished prefills
        and decodes (`out.num_steps` tokens in one call for decodes), gather requested
        log-probabilities. Returns results by request id.

        Chunks `in_decode_program` (decodes; not prompt positions whose logprobs are wanted)
        run through the multi-step decode, the rest through the general batch. The general
        batch's masked attention costs its tokens times every key it lists; keeping decode
        contexts out of it is worth reading the weights twice. Both shapes are ones the
        warm-up compiles already, and each
        sequence's computation is the same either way.

        The general batch runs first: a one-token chunk may read prompt blocks that a
        prefill of the same step writes (the scheduler shares them, e.g. between the `n`
        samples of one prompt). The scheduler shares only blocks the general batch writes,
        for the same reason (`Scheduler._blocks_written`).
        """
        decodes = [s for s in out.scheduled if s.in_decode_program]
        rest = [s for s in out.scheduled if s not in decodes]
        results = self._execute_general(SchedulerOutput(rest)) if rest else {}
        if decodes:
            results.update(self._execute_multi_step(SchedulerOutput(decodes, out.num_steps)))
        return results

    def _tables(self) -> tuple[int, int, int]:
        """(vocab size, penalty history width, max_model_len) the row settings are built with."""
        config = self._state.config
        max_len = config.scheduler_config.max_model_len
        return config.model_config.vocab_size, bucket(max_len), max_len

    def _execute_multi_step(self, out: SchedulerOutput) -> dict[str, SequenceResult]:
        V, width, max_len = self._tables()
        tables = multi_step_block_tables(out, blocks_per_seq(self._state.config))
        B = tables.shape[0]
        rows = prepare_rows(out, B, V, width, max_len, tables, self._state.config.sampler_config.logprobs_mode)
        steps = self.run_decode(rows, prepare_state(out, B, V, width), out.num_steps)
        # Read back what the host needs only: the top entries exist when some row asked.
        wants = any(s.request.sampling_params.logprobs is not None for s in out.scheduled)
        host = jax.device_get((steps.token_ids, steps.logprobs, steps.num_tokens)
                              + ((steps.ranks, steps.top_ids, steps.top_logprobs) if wants else ()))
        token_ids, logprobs, num_tokens = host[:3]
        results = {}
        for i, s in enumerate(out.scheduled):
            n = int(num_tokens[i]) if s.samples else 0
            fields: dict[str, Any] = dict(token_ids=tuple(token_ids[i, :n].tolist()),
                                          logprobs=tuple(logprobs[i, :n].tolist()))
            if s.request.sampling_params.logprobs is not None:
                fields.update(ranks=tuple(host[3][i, :n].tolist()), top_ids=host[4][i, :n],
                              top_logprobs=host[5][i, :n])
            results[s.request.request_id] = SequenceResult(**fields, weight_version=self._state.weight_version)
        return results

    def _execute_general(self, out: SchedulerOutput) -> dict[str, SequenceResult]:
        config = self._state.config
        V, width, max_len = self._tables()
        batch, sizes = prepare_batch(out, config.cache_config.block_size,
                                     config.scheduler_config.max_num_seqs)
        B = sizes.num_seqs
        rows = prepare_rows(out, B, V, width, max_len, np.zeros((B, 1), np.int32),
                            config.sampler_config.logprobs_mode)
        sampled, hidden = self.run_general(batch, rows, prepare_state(out, B, V, width))
        prompt = self._prompt_logprobs(out, hidden, sizes)
        sampled = jax.device_get(sampled)
        results = {}
        offset = 0
        for i, s in enumerate(out.scheduled):
            fields: dict[str, Any] = {}
            if s.samples:
                fields.update(token_ids=(int(sampled.token_ids[i]),), logprobs=(float(sampled.logprobs[i]),))
                if s.request.sampling_params.logprobs is not None:
                    fields.update(ranks=(int(sampled.ranks[i]),), top_ids=sampled.top_ids[i:i + 1],
                                  top_logprobs=sampled.top_logprobs[i:i + 1])
            if prompt is not None and s.request.sampling_params.prompt_logprobs is not None:
                rows_ = slice(offset, offset + s.num_tokens)
                fields["prompt_logprobs"] = PromptLogprobs(*(a[rows_] for a in prompt))
            results[s.request.request_id] = SequenceResult(**fields, weight_version=self._state.weight_version)
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
