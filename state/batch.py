"""The device-side input of one step, and the shape buckets it is padded to.

A `Batch` is a pytree of int32 arrays only; its shapes are the compile key. Three sizes
vary, each padded up to a power of two so the number of compilations is small and fixed:

    T   tokens scheduled this step          (token_ids, positions, slot_mapping, token_seq)
    B   sequences scheduled this step       (logits_indices)
    N   KV blocks the step's attention reads (key_block_*)

Attention metadata is flat: every sequence's context blocks are listed once in
`key_block_ids` with the sequence they belong to and the position of their first slot, so
one masked attention serves any mix of prefills, prefill chunks and decodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    token_ids: Any  # [T] int32, pad 0
    positions: Any  # [T] int32, pad 0
    slot_mapping: Any  # [T] int32 cache slot to write, -1: write nothing
    token_seq: Any  # [T] int32 index of the token's sequence in this batch, pad -1
    key_block_ids: Any  # [N] int32 KV blocks attention reads, pad 0
    key_block_seq: Any  # [N] int32 sequence owning each block, pad -2 (matches no token)
    key_block_pos: Any  # [N] int32 position of each block's first slot
    logits_indices: Any  # [B] int32 token whose hidden state predicts the next token


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def buckets_up_to(limit: int, minimum: int = 1) -> list[int]:
    """Every bucket `bucket()` can return for sizes 1..limit."""
    sizes, b = [], bucket(1, minimum)
    while True:
        sizes.append(b)
        if b >= limit:
            return sizes
        b *= 2
