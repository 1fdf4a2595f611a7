"""Warm-up: compile every program the serving loop can ask for, before it asks.

The shapes a step can have are known from the config alone (see `state.batch`):

    general forward   T in buckets(max_num_batched_tokens), N in buckets(KV blocks), with
                      the N a batch of T tokens can actually need (at least T/2 tokens
                      means at least T/(2*block_size) blocks)
    decode forward    B in buckets(max_num_seqs), Nb in buckets(blocks per sequence)
    sampler           B in buckets(max_num_seqs) x the common switches: greedy, random,
                      random with top-k/top-p, each with and without logprobs, and each
                      with and without penalties (their token tables have a fixed width)

Each is run once on an all-padding batch that writes nothing to the cache. Requests with
logit_bias or min_tokens use programs compiled on their first use (their table width
follows the number of biased tokens).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from runner.compilation import CompileCounter
from runner.model_runner import select_rows
from runner.prepare import sampled_rows
from runner.sampler import SamplerFlags, SamplingMetadata
from runner.sampling_params import MAX_LOGPROBS
from state.batch import MIN_DECODE_BUCKET, MIN_TOKEN_BUCKET, Batch, bucket, buckets_up_to, cdiv
from state.config import RunnerConfig
from state.kv_cache import blocks_per_seq


@dataclass(frozen=True)
class WarmupReport:
    num_forward_shapes: int
    num_sampler_shapes: int
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
    """(B, Nb) of every decode batch."""
    for B in buckets_up_to(config.scheduler_config.max_num_seqs, MIN_DECODE_BUCKET):
        for Nb in buckets_up_to(blocks_per_seq(config)):
            yield B, Nb


def sampler_inputs(config: RunnerConfig) -> Iterator[tuple[int, SamplingMetadata, SamplerFlags]]:
    """(B, metadata, flags) for every common sampler variant."""
    # Decode batches have at least MIN_DECODE_BUCKET rows, so their sampler does too.
    for B in buckets_up_to(max(config.scheduler_config.max_num_seqs, MIN_DECODE_BUCKET)):
        meta = SamplingMetadata(
            temperature=np.zeros(B, np.float32), top_k=np.zeros(B, np.int32),
            top_p=np.ones(B, np.float32), min_p=np.zeros(B, np.float32),
            seeds=np.zeros(B, np.uint32), counters=np.zeros(B, np.int32))
        width = bucket(config.scheduler_config.max_model_len)
        vocab = config.model_config.vocab_size
        penalised = dataclasses.replace(
            meta, prompt_ids=np.full((B, width), vocab, np.int32),
            output_ids=np.full((B, width), vocab, np.int32), presence_penalty=np.zeros(B, np.float32),
            frequency_penalty=np.zeros(B, np.float32), repetition_penalty=np.ones(B, np.float32))
        for greedy, sort in ((True, False), (False, False), (False, True)):
            for num_logprobs in (0, MAX_LOGPROBS):
                flags = SamplerFlags(all_greedy=greedy, needs_sort=sort, num_logprobs=num_logprobs)
                yield B, meta, flags
                yield B, penalised, flags


def warmup(runner) -> WarmupReport:
    """Run every shape once on `runner` (a `ModelRunner`); report counts and time."""
    config, num_blocks = runner.config, runner.num_blocks
    start = time.perf_counter()
    max_seqs = config.scheduler_config.max_num_seqs
    forward = [Batch.empty_general(T, N, sampled_rows(T, max_seqs)) for T, N in general_shapes(config, num_blocks)]
    forward += [Batch.empty_decode(B, Nb) for B, Nb in decode_shapes(config)]
    samplers = list(sampler_inputs(config))
    with CompileCounter() as compiles:
        for batch in forward:
            hidden = runner.run_forward(batch)
            select_rows(hidden, batch.logits_indices)
            if not batch.is_decode:
                runner.run_prompt_logprobs(hidden, np.zeros(hidden.shape[0], np.int32))
        for B, meta, flags in samplers:
            # Rows cut from a real hidden state carry the sharding serving will pass, which
            # is part of a compiled program's signature.
            runner.run_sampler(select_rows(hidden, np.zeros(B, np.int32)), meta, flags)
    return WarmupReport(len(forward), len(samplers), compiles.count, time.perf_counter() - start)
