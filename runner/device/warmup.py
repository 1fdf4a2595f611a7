"""Warm-up: compile every program the serving loop can ask for, before it asks.

The shapes a step can have are known from the config alone (see `state.batch`):

    general step       T in buckets(max_num_batched_tokens), N in buckets(KV blocks), with
                       the N a batch of T tokens can actually need (at least T/2 tokens
                       means at least T/(2*block_size) blocks); sampling is inside, its
                       stages switched on the device, so sampler settings add no programs
    multi-step decode  B in buckets(max_num_seqs), Nb in buckets(blocks per sequence); one
                       program for one-step calls and one for every call of more steps, up
                       to `max_decode_steps` (`runner.device.model_runner.multi_step_program`)
    prompt logprobs    T in the general step's buckets

Each is run once on an all-padding input that writes nothing to the cache. Requests with
more than `MIN_TABLE_WIDTH` logit_bias entries or stop tokens use programs compiled on
their first use (those tables' width follows the number of entries).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from runner.device.compilation import CompileCounter
from runner.device.prepare import prepare_rows, prepare_state, sampled_rows
from state.step import SchedulerOutput
from state.batch import MIN_DECODE_BUCKET, MIN_TOKEN_BUCKET, Batch, bucket, buckets_up_to, cdiv
from state.config import RunnerConfig
from models.kv_cache import blocks_per_seq


@dataclass(frozen=True)
class WarmupReport:
    num_forward_shapes: int  # general steps
    num_decode_shapes: int  # multi-step decodes
    num_compilations: int
    seconds: float


def general_shapes(config: RunnerConfig, num_blocks: int) -> Iterator[tuple[int, int]]:
    """(T, N) of every general batch the scheduler can form."""
    S = config.cache_config.block_size
    sched = config.scheduler_config
    max_blocks = min(num_blocks, sched.max_num_seqs * blocks_per_seq(config))
    for T in buckets_up_to(sched.max_num_batched_tokens, MIN_TOKEN_BUCKET):
        fewest = cdiv(T // 2 + 1, S) if T > MIN_TOKEN_BUCKET else 1
        for N in buckets_up_to(max_blocks):
            if N >= fewest // 2:  # a bucket below the fewest blocks' own bucket is unreachable
                yield T, N


def decode_shapes(config: RunnerConfig) -> Iterator[tuple[int, int]]:
    """(B, Nb) of every multi-step decode."""
    for B in buckets_up_to(config.scheduler_config.max_num_seqs, MIN_DECODE_BUCKET):
        for Nb in buckets_up_to(blocks_per_seq(config), capped=True):
            yield B, Nb


def warmup(runner) -> WarmupReport:
    """Run every shape once on `runner` (a `ModelRunner`); report counts and time."""
    config, num_blocks = runner.config, runner.num_blocks
    start = time.perf_counter()
    max_seqs = config.scheduler_config.max_num_seqs
    V, max_len = config.model_config.vocab_size, config.scheduler_config.max_model_len
    width, none = bucket(max_len), SchedulerOutput()

    def padding(B: int, tables: np.ndarray) -> tuple:
        return prepare_rows(none, B, V, width, max_len, tables), prepare_state(none, B, V, width)

    general = list(general_shapes(config, num_blocks))
    decode = list(decode_shapes(config))
    with CompileCounter() as compiles:
        for T, N in general:
            B = sampled_rows(T, max_seqs)
            _, hidden = runner.run_general(Batch.empty_general(T, N, B), *padding(B, np.zeros((B, 1), np.int32)))
            runner.run_prompt_logprobs(hidden, np.zeros(T, np.int32))
        for B, Nb in decode:
            for num_steps in sorted({1, config.scheduler_config.max_decode_steps}):
                runner.run_decode(*padding(B, np.zeros((B, Nb), np.int32)), num_steps)
    return WarmupReport(len(general), len(decode), compiles.count, time.perf_counter() - start)
