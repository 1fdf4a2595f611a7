"""Scheduler decisions -> padded int32 arrays: the `Batch` and the `SamplingMetadata`.

Plain numpy on the host. Sizes are padded to power-of-two buckets (see `state.batch`),
so the set of shapes the device ever sees is small and known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runner.sampler import SamplerFlags, SamplingMetadata
from runner.sampling_params import MAX_LOGPROBS
from runner.scheduler import SchedulerOutput
from state.batch import MIN_DECODE_BUCKET, MIN_TOKEN_BUCKET, Batch, bucket, cdiv


@dataclass(frozen=True)
class BucketSizes:
    num_tokens: int  # T
    num_key_blocks: int  # N (general batches) or Nb (decode batches)
    num_seqs: int  # B


def prepare_batch(out: SchedulerOutput, block_size: int, max_num_seqs: int) -> tuple[Batch, BucketSizes]:
    """The model input of one step, as numpy arrays padded to their buckets."""
    if out.is_decode:
        return _decode_batch(out, block_size)
    return _general_batch(out, block_size, max_num_seqs)


def sampled_rows(num_tokens: int, max_num_seqs: int) -> int:
    """Rows a general batch of `num_tokens` (a bucket) samples: a function of T alone, so the
    sampler's programs are keyed by sequence buckets only, never by (T, B) pairs."""
    return min(num_tokens, bucket(max_num_seqs))


def _slots(blocks: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    return blocks[positions // block_size] * block_size + positions % block_size


def _general_batch(out: SchedulerOutput, block_size: int, max_num_seqs: int) -> tuple[Batch, BucketSizes]:
    sched = out.scheduled
    T = bucket(out.num_tokens, MIN_TOKEN_BUCKET)
    N = bucket(sum(cdiv(s.end, block_size) for s in sched))
    B = sampled_rows(T, max_num_seqs)
    batch = Batch.empty_general(T, N, B)  # filled in place below: fresh host arrays
    t = n = 0
    for i, s in enumerate(sched):
        pos = np.arange(s.start, s.end, dtype=np.int32)
        blocks = np.asarray(s.request.block_ids, np.int32)
        batch.token_ids[t:t + s.num_tokens] = s.request.all_token_ids[s.start:s.end]
        batch.positions[t:t + s.num_tokens] = pos
        batch.slot_mapping[t:t + s.num_tokens] = _slots(blocks, pos, block_size)
        batch.token_seq[t:t + s.num_tokens] = i
        nb = cdiv(s.end, block_size)
        batch.key_block_ids[n:n + nb] = blocks[:nb]
        batch.key_block_seq[n:n + nb] = i
        batch.key_block_pos[n:n + nb] = np.arange(nb, dtype=np.int32) * block_size
        batch.logits_indices[i] = t + s.num_tokens - 1
        t += s.num_tokens
        n += nb
    return batch, BucketSizes(T, N, B)


def _decode_batch(out: SchedulerOutput, block_size: int) -> tuple[Batch, BucketSizes]:
    """One new token per sequence: token i belongs to sequence i, T = B."""
    sched = out.scheduled
    B = bucket(len(sched), MIN_DECODE_BUCKET)
    Nb = bucket(max(cdiv(s.end, block_size) for s in sched))
    batch = Batch.empty_decode(B, Nb)  # filled in place below: fresh host arrays
    for i, s in enumerate(sched):
        blocks = s.request.block_ids[:cdiv(s.end, block_size)]
        batch.token_ids[i] = s.request.all_token_ids[s.start]
        batch.positions[i] = s.start
        batch.slot_mapping[i] = blocks[s.start // block_size] * block_size + s.start % block_size
        batch.block_tables[i, :len(blocks)] = blocks
        batch.seq_lens[i] = s.end
    return batch, BucketSizes(B, Nb, B)


def _pad_rows(rows: list[list[int]], fill: int, dtype: type, width: int | None = None) -> np.ndarray:
    width = width or bucket(max((len(r) for r in rows), default=1))
    out = np.full((len(rows), width), fill, dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def prepare_sampling(out: SchedulerOutput, num_seqs: int, vocab_size: int,
                     history_width: int | None = None) -> tuple[SamplingMetadata, SamplerFlags]:
    """Per-row sampling settings, padded to `num_seqs` rows (padding rows are greedy).

    `history_width` fixes the width of the token tables penalties read (the runner passes
    the bucket of max_model_len): a width that followed each step's longest request would
    compile a new sampler program for every combination of widths.
    """
    requests = [s.request for s in out.scheduled]
    params = [r.sampling_params for r in requests]
    pad = num_seqs - len(requests)

    def column(values: list, fill: float, dtype: type) -> np.ndarray:
        return np.asarray(list(values) + [fill] * pad, dtype)

    meta = dict(
        temperature=column([p.temperature for p in params], 0.0, np.float32),
        top_k=column([max(p.top_k, 0) for p in params], 0, np.int32),
        top_p=column([p.top_p for p in params], 1.0, np.float32),
        min_p=column([p.min_p for p in params], 0.0, np.float32),
        seeds=column([r.seed for r in requests], 0, np.uint32),
        counters=column([len(r.output_token_ids) for r in requests], 0, np.int32),
    )
    bias_rows = [_bias_entries(r) for r in requests]
    if any(bias_rows):
        bias_rows += [[]] * pad
        meta["bias_ids"] = _pad_rows([[i for i, _ in row] for row in bias_rows], vocab_size, np.int32)
        values = _pad_rows([[0] * len(row) for row in bias_rows], 0, np.float32)
        for i, row in enumerate(bias_rows):
            values[i, :len(row)] = [v for _, v in row]
        meta["bias_values"] = values
    if any(p.uses_penalties for p in params):
        meta["prompt_ids"] = _pad_rows([r.prompt_token_ids for r in requests] + [[]] * pad, vocab_size,
                                       np.int32, history_width)
        meta["output_ids"] = _pad_rows([r.output_token_ids for r in requests] + [[]] * pad, vocab_size,
                                       np.int32, history_width)
        meta["presence_penalty"] = column([p.presence_penalty for p in params], 0.0, np.float32)
        meta["frequency_penalty"] = column([p.frequency_penalty for p in params], 0.0, np.float32)
        meta["repetition_penalty"] = column([p.repetition_penalty for p in params], 1.0, np.float32)
    flags = SamplerFlags(
        all_greedy=all(p.is_greedy for p in params),
        needs_sort=any(not p.is_greedy and (p.top_k > 0 or p.top_p < 1) for p in params),
        num_logprobs=MAX_LOGPROBS if any(p.logprobs is not None for p in params) else 0,
    )
    return SamplingMetadata(**meta), flags


def _bias_entries(request) -> list[tuple[int, float]]:
    """logit_bias, plus -inf on EOS and stop tokens while below min_tokens."""
    p = request.sampling_params
    entries = list((p.logit_bias or {}).items())
    if len(request.output_token_ids) < p.min_tokens:
        banned = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(request.eos_token_ids))
        entries += [(t, -np.inf) for t in sorted(banned)]
    return entries
