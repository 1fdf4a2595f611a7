"""Scheduler decisions -> padded arrays: the `Batch`, the decode state and the row settings.

Plain numpy on the host. Sizes are padded to power-of-two buckets (see `state.batch`),
so the set of shapes the device ever sees is small and known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.decode_loop import DecodeState, RowSettings
from models.sampler import SamplingMetadata
from state.step import SchedulerOutput
from state.batch import MIN_DECODE_BUCKET, MIN_TOKEN_BUCKET, Batch, bucket, cdiv
from state.config import LOGPROBS_MODES

# Narrowest logit_bias and stop-token tables: narrower ones pad to this, so common requests
# share one program; a request with more entries compiles its width on first use.
MIN_TABLE_WIDTH = 8


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


def multi_step_block_tables(out: SchedulerOutput, max_blocks: int | None = None) -> np.ndarray:
    """[B, Nb] every block each decoding request holds: the scheduler reserved the slots of
    all the decode steps of the call. Nb is a power of two capped at `max_blocks`, the
    blocks one request of `max_model_len` tokens holds: decode attention reads all Nb
    blocks of every row, so a bucket past what any request can hold would only add masked
    keys."""
    B = bucket(len(out.scheduled), MIN_DECODE_BUCKET)
    rows = [s.request.block_ids for s in out.scheduled] + [[]] * (B - len(out.scheduled))
    longest = max((len(r) for r in rows), default=1)
    return _pad_rows(rows, 0, np.int32, bucket(longest, largest=max_blocks))


def _pad_rows(rows: list[list[int]], fill: int, dtype: type, width: int | None = None) -> np.ndarray:
    width = width or bucket(max((len(r) for r in rows), default=1))
    out = np.full((len(rows), width), fill, dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def prepare_rows(out: SchedulerOutput, num_seqs: int, vocab_size: int, history_width: int,
                 max_model_len: int, block_tables: np.ndarray,
                 logprobs_mode: str = "raw_logprobs") -> RowSettings:
    """Per-row settings of a step or a multi-step decode, padded to `num_seqs` rows.

    Every sampler field is set, whatever the rows ask for (no bias: ids past the
    vocabulary; no penalty: 0, 0, 1), so one program serves every mix of requests.
    `history_width` fixes the width of the token tables the penalties read (the runner
    passes the bucket of max_model_len); the logit_bias and stop-token tables are at least
    `MIN_TABLE_WIDTH` wide.
    """
    requests = [s.request for s in out.scheduled]
    params = [r.sampling_params for r in requests]
    pad = num_seqs - len(requests)

    def column(values: list, fill: float, dtype: type) -> np.ndarray:
        return np.asarray(list(values) + [fill] * pad, dtype)

    bias = [list((p.logit_bias or {}).items()) for p in params] + [[]] * pad
    sampling = SamplingMetadata(
        temperature=column([p.temperature for p in params], 0.0, np.float32),
        top_k=column([max(p.top_k, 0) for p in params], 0, np.int32),
        top_p=column([p.top_p for p in params], 1.0, np.float32),
        min_p=column([p.min_p for p in params], 0.0, np.float32),
        seeds=column([r.seed for r in requests], 0, np.uint32),
        counters=column([len(r.output_token_ids) for r in requests], 0, np.int32),
        bias_ids=_table([[t for t, _ in row] for row in bias], vocab_size, np.int32),
        bias_values=_table([[v for _, v in row] for row in bias], 0.0, np.float32),
        prompt_ids=_pad_rows([r.prompt_token_ids for r in requests] + [[]] * pad, vocab_size,
                             np.int32, history_width),
        presence_penalty=column([p.presence_penalty for p in params], 0.0, np.float32),
        frequency_penalty=column([p.frequency_penalty for p in params], 0.0, np.float32),
        repetition_penalty=column([p.repetition_penalty for p in params], 1.0, np.float32),
        logprobs_mode=np.full(num_seqs, LOGPROBS_MODES.index(logprobs_mode), np.int32))
    return RowSettings(
        block_tables=block_tables,
        max_out=column([min(p.max_tokens, max_model_len - len(r.prompt_token_ids))
                        for r, p in zip(requests, params)], 0, np.int32),
        min_out=column([p.min_tokens for p in params], 0, np.int32),
        stop_ids=_table([_stop_ids(r) for r in requests] + [[]] * pad, -1, np.int32),
        num_logprobs=column([-1 if p.logprobs is None else p.logprobs for p in params], -1, np.int32),
        sampling=sampling)


def prepare_state(out: SchedulerOutput, num_seqs: int, vocab_size: int, history_width: int) -> DecodeState:
    """Each scheduled request's next input (the token at its first scheduled position) and
    its outputs so far; padding rows are done."""
    requests = [s.request for s in out.scheduled]
    pad = num_seqs - len(requests)
    return DecodeState(
        token_ids=np.asarray([r.all_token_ids[s.start] for s, r in zip(out.scheduled, requests)] + [0] * pad,
                             np.int32),
        positions=np.asarray([s.start for s in out.scheduled] + [0] * pad, np.int32),
        num_out=np.asarray([len(r.output_token_ids) for r in requests] + [0] * pad, np.int32),
        output_ids=_pad_rows([r.output_token_ids for r in requests] + [[]] * pad, vocab_size,
                             np.int32, history_width),
        is_done=np.asarray([False] * len(requests) + [True] * pad))


def _table(rows: list[list], fill: float, dtype: type) -> np.ndarray:
    return _pad_rows(rows, fill, dtype, bucket(max(len(r) for r in rows), MIN_TABLE_WIDTH))


def _stop_ids(request) -> list[int]:
    """Tokens that end the request once it has min_tokens outputs."""
    p = request.sampling_params
    eos = () if p.ignore_eos else request.eos_token_ids
    return sorted(set(eos) | set(p.stop_token_ids or ()))
