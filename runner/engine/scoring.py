"""Logits of given tokens through the serving forward: chunks over the paged KV cache.

A trainer recomputing its rollouts' log-probabilities, a notebook checking a checkpoint, and
the parity tests against transformers all ask the same question: what logits does the served
model give at every position of these tokens? `forward_tokens` answers it with the programs'
own forward and attention backend, one chunk per device call, each chunk reading the keys
the chunks before it wrote into the paged cache (a chunk of one token is a decode step, read
through the decode attention). Nothing is sampled and nothing enters the prefix cache: the
blocks come from the scheduler's pool and go back to it, whatever happens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runner.device.model_runner import ModelRunner
from runner.device.prepare import prepare_batch
from runner.engine.block_pool import NoFreeBlocksError
from runner.engine.scheduler import Scheduler
from state.batch import cdiv
from state.request import Request
from state.step import ScheduledRequest, SchedulerOutput


def forward_tokens(runner: ModelRunner, scheduler: Scheduler, token_ids: Sequence[int],
                   chunk_sizes: Sequence[int] | None = None) -> np.ndarray:
    """float32 logits [len(token_ids), vocab]: row i is the next-token distribution after
    token_ids[:i + 1].

    `chunk_sizes` splits the tokens into consecutive forwards (default: one); they must be
    positive and add up to len(token_ids).
    """
    config = runner.config
    ids = _checked_ids(token_ids, config.model_config.vocab_size, scheduler.max_model_len)
    sizes = _checked_chunks(chunk_sizes, len(ids))
    needed = cdiv(len(ids), scheduler.block_size)
    try:
        blocks = scheduler.pool.allocate(needed)
    except NoFreeBlocksError as e:
        raise ValueError(f"forward_tokens: {len(ids)} tokens need {needed} KV blocks of "
                         f"{scheduler.block_size} tokens; {e} (requests in flight hold the rest)") from None
    request = Request("forward_tokens", ids, sampling_params=None, seed=0, block_ids=blocks)
    try:
        rows, start = [], 0
        for size in sizes:
            step = SchedulerOutput([ScheduledRequest(request, start, size)])
            batch, _ = prepare_batch(step, scheduler.block_size, scheduler.max_num_seqs)
            rows.append(np.asarray(runner.run_forward(batch)[:size], np.float32))
            start += size
    finally:
        scheduler.pool.free(blocks)
    return np.concatenate(rows)


def _checked_ids(token_ids: Sequence[int], vocab_size: int, max_model_len: int) -> list[int]:
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"forward_tokens: token_ids must be a non-empty sequence of ints, got {token_ids!r:.80}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"forward_tokens: token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    if ids.size > max_model_len:
        raise ValueError(f"forward_tokens: {ids.size} tokens exceed max_model_len={max_model_len}")
    return ids.tolist()


def _checked_chunks(chunk_sizes: Sequence[int] | None, total: int) -> list[int]:
    if chunk_sizes is None:
        return [total]
    sizes = list(chunk_sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes) \
            or sum(sizes) != total:
        raise ValueError(f"forward_tokens: chunk_sizes must be positive ints adding up to the {total} "
                         f"tokens, got {sizes}")
    return [int(s) for s in sizes]
