"""The device-side input of one step, and the shape buckets it is padded to.

A `Batch` is a pytree of int32 arrays only; its shapes and which optional fields are set
are the compile key. Sizes are padded up to powers of two so the number of compilations is
small and fixed:

    T   tokens scheduled this step          (token_ids, positions, slot_mapping, token_seq)
    B   sequences scheduled this step       (logits_indices, block_tables, seq_lens)
    N   KV blocks the step's attention reads (key_block_*)
    Nb  blocks per sequence of a decode step (block_tables)

Two kinds of batch, told apart by which fields are set:
  * general (any mix of prefills, chunks, decodes): every sequence's context blocks are
    listed once in `key_block_ids`, with the sequence owning each and the position of its
    first slot, so one masked attention serves all of them;
  * decode (one new token per sequence, T = B): `block_tables` and `seq_lens`, the shape
    paged-attention kernels take, with no cross-sequence masking work at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

# Smallest token bucket of a general batch: below this, padding costs less than another
# compilation.
MIN_TOKEN_BUCKET = 8
# Smallest decode batch: one row. (A one-row scatter into a reshaped cache made XLA copy
# the whole cache; `models.attention.write_kv` indexes the 4-d cache instead.)
MIN_DECODE_BUCKET = 1


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    token_ids: Any  # [T] int32, pad 0
    positions: Any  # [T] int32, pad 0
    slot_mapping: Any  # [T] int32 cache slot to write, -1: write nothing
    logits_indices: Any  # [B] int32 token whose hidden state predicts the next token
    # general batches
    token_seq: Any = None  # [T] int32 index of the token's sequence in this batch, pad -1
    key_block_ids: Any = None  # [N] int32 KV blocks attention reads, pad 0
    key_block_seq: Any = None  # [N] int32 sequence owning each block, pad -2 (matches no token)
    key_block_pos: Any = None  # [N] int32 position of each block's first slot
    # decode batches
    block_tables: Any = None  # [B, Nb] int32 blocks of each sequence, pad 0
    seq_lens: Any = None  # [B] int32 context length including the new token, pad 0

    @property
    def is_decode(self) -> bool:
        return self.block_tables is not None

    # The padding values live here only: a padded token writes nothing (slot -1), belongs to
    # no sequence (-1), and a padded key block is owned by no sequence (-2 matches no token).

    @classmethod
    def empty_general(cls, T: int, N: int, B: int) -> Batch:
        """An all-padding general batch of `T` tokens, `N` key blocks and `B` sampled rows."""
        return cls(token_ids=np.zeros(T, np.int32), positions=np.zeros(T, np.int32),
                   slot_mapping=np.full(T, -1, np.int32), logits_indices=np.zeros(B, np.int32),
                   token_seq=np.full(T, -1, np.int32), key_block_ids=np.zeros(N, np.int32),
                   key_block_seq=np.full(N, -2, np.int32), key_block_pos=np.zeros(N, np.int32))

    @classmethod
    def empty_decode(cls, B: int, Nb: int) -> Batch:
        """An all-padding decode batch of `B` rows with `Nb` blocks per row."""
        return cls(token_ids=np.zeros(B, np.int32), positions=np.zeros(B, np.int32),
                   slot_mapping=np.full(B, -1, np.int32), logits_indices=np.arange(B, dtype=np.int32),
                   block_tables=np.zeros((B, Nb), np.int32), seq_lens=np.zeros(B, np.int32))


def cdiv(a: int, b: int) -> int:
    """Ceiling division: blocks of `b` slots holding `a` tokens."""
    return -(-a // b)


def bucket(n: int, minimum: int = 1, largest: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), and never above `largest` (the largest size
    there is, when one is known: padding past it is only waste) unless n itself is."""
    b = 1 << (max(n, minimum) - 1).bit_length()
    return b if largest is None else min(b, max(largest, n))


def buckets_up_to(limit: int, minimum: int = 1, capped: bool = False) -> list[int]:
    """Every bucket `bucket()` can return for sizes 1..limit (with `largest=limit` when
    `capped`)."""
    sizes, b = [], bucket(1, minimum)
    while True:
        sizes.append(min(b, limit) if capped else b)
        if b >= limit:
            return sizes
        b *= 2
