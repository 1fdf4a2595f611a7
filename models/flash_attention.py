"""Tiled attention for general batches (prefills, chunks, mixes) over paged KV caches.

The general batch lists every sequence's context blocks once (`Batch.key_block_*`) and
every token with its owner sequence (`Batch.token_seq`). The reference reader scores each
token against every listed key, a `[T, N*S]` matrix, quadratic in the step's tokens. This
reader never builds it:

  * the step's tokens are cut into query tiles of `q_tile` tokens;
  * because `prepare_batch` lays tokens and blocks out sequence by sequence, the blocks a
    query tile can see form one contiguous run `[lo, hi)` of the listed blocks (from the
    first block of its first sequence to the last block at or before the last position of
    its last sequence);
  * all query tiles advance together through their own runs, `key_tile` blocks at a time,
    with an online softmax (running maximum, denominator and weighted sum), so one step
    holds `[T, key_tile*S]` scores and the loop runs as many steps as the longest run
    needs: blocks of other sequences, causally hidden blocks and blocks behind a sliding
    window are never read.

Every shape is a function of the buckets (T, N) and the tile sizes, and the trip count is a
traced value, so one program serves every mix of lengths within a bucket.

Both backends' layouts are read: the Pallas backend's heads-first `[K, P, S, Dh]` pages and
the reference backend's blocks-first `[P, S, K, Dh]` pages (`heads_first=False`). On the
reference backend this is the general step's reader too: a `[T, N*S]` reader would score
every token of a step against every sequence's keys, which grows with the square of the
number of prompts a step holds.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.attention_spec import AttentionSpec, capped, default_spec, in_window
from models.kv_codec import MASKED, dequantise
from state.batch import Batch
from models.kv_cache import KVCache

# Tokens per query tile and keys per key tile: a step's scores are T x KEY_TILE_KEYS per
# head, a few MiB at T = 1024, while tiles stay large enough for the matrix units.
Q_TILE = 64
KEY_TILE_KEYS = 128


class TileRuns(NamedTuple):
    """Per query tile, the run of listed blocks it reads: `[lo, hi)`, `steps` key tiles."""
    lo: jax.Array  # [nQ] int32
    hi: jax.Array  # [nQ] int32
    steps: jax.Array  # [] int32: key tiles the longest run needs


class Carry(NamedTuple):
    """Online-softmax state per query: running maximum, denominator and weighted sum."""
    m: jax.Array  # [nQ, K, G, TQ] float32
    l: jax.Array  # [nQ, K, G, TQ] float32
    acc: jax.Array  # [nQ, K, G, TQ, Dh] float32


def tile_sizes(num_tokens: int, num_blocks: int, block_size: int, q_tile: int = Q_TILE,
               key_tile_keys: int = KEY_TILE_KEYS) -> tuple[int, int]:
    """(tokens per query tile, blocks per key tile) for the given buckets."""
    tq = min(q_tile, num_tokens)
    if num_tokens % tq:
        tq = num_tokens  # buckets are powers of two; any other size is one tile
    return tq, max(1, min(num_blocks, key_tile_keys // block_size))


def tile_runs(batch: Batch, tq: int, key_tile: int, window: int | None = None,
              block_size: int = 1) -> TileRuns:
    """The contiguous run of listed blocks each query tile reads (see the module doc).

    Needs tokens and listed blocks ordered by owner sequence, padding blocks (owner < 0)
    after every listed one, as `prepare_batch` builds them. With a sliding `window`, the
    run starts at the first block of its first sequence that the tile's earliest query of
    that sequence still sees: blocks behind every window are never read.
    """
    seq = batch.token_seq.reshape(-1, tq)
    pos = batch.positions.reshape(-1, tq)
    live = seq >= 0
    big = jnp.iinfo(jnp.int32).max
    first_seq = jnp.where(live, seq, big).min(axis=1)  # [nQ]
    last_seq = jnp.where(live, seq, -1).max(axis=1)
    last_pos = jnp.where(live & (seq == last_seq[:, None]), pos, -1).max(axis=1)

    block_seq, block_pos = batch.key_block_seq, batch.key_block_pos  # padding blocks: seq -2
    listed = block_seq[None, :] >= 0
    lo = (listed & (block_seq[None, :] < first_seq[:, None])).sum(axis=1)
    if window is not None:
        first_pos = jnp.where(live & (seq == first_seq[:, None]), pos, big).min(axis=1)
        behind = (block_seq[None, :] == first_seq[:, None]) & (
            block_pos[None, :] + block_size - 1 <= first_pos[:, None] - window)
        lo = lo + behind.sum(axis=1)
    before_last = block_seq[None, :] < last_seq[:, None]
    last_visible = (block_seq[None, :] == last_seq[:, None]) & (block_pos[None, :] <= last_pos[:, None])
    hi = (listed & (before_last | last_visible)).sum(axis=1)
    hi = jnp.maximum(hi, lo)  # a tile of padding tokens only has an empty run
    steps = (-(-(hi - lo) // key_tile)).max()
    return TileRuns(lo.astype(jnp.int32), hi.astype(jnp.int32), steps.astype(jnp.int32))


def page_dims(pages: jax.Array, heads_first: bool) -> tuple[int, int]:
    """(KV heads, slots per block) of one layer's pages."""
    return (pages.shape[0], pages.shape[2]) if heads_first else (pages.shape[2], pages.shape[1])


def _read_tile(pages: jax.Array, block_ids: jax.Array, scale: jax.Array, heads_first: bool) -> jax.Array:
    """`[K, nQ, C, S, Dh]` float32: blocks `block_ids: [nQ, C]` of `[K, P, S, Dh]` pages
    (heads first) or `[P, S, K, Dh]` pages (blocks first: whole rows gathered, then
    transposed, the cheaper order on XLA's CPU backend)."""
    if heads_first:
        return dequantise(pages[:, block_ids], scale)
    return dequantise(pages[block_ids], scale).transpose(3, 0, 1, 2, 4)


def _step(j: jax.Array, carry: Carry, *, qg: jax.Array, cache: KVCache, batch: Batch,
          runs: TileRuns, tok_seq: jax.Array, tok_pos: jax.Array, key_tile: int,
          k_scale: jax.Array, v_scale: jax.Array, heads_first: bool, spec: AttentionSpec) -> Carry:
    """Fold key tile `j` of every query tile's run into the online softmax."""
    N = batch.key_block_ids.shape[0]
    _, S = page_dims(cache.k, heads_first)
    idx = runs.lo[:, None] + j * key_tile + jnp.arange(key_tile, dtype=jnp.int32)  # [nQ, C]
    in_run = idx < runs.hi[:, None]
    idx = jnp.minimum(idx, N - 1)
    block_ids = batch.key_block_ids[idx]
    key_seq = jnp.where(in_run, batch.key_block_seq[idx], -3)  # -3 matches no token
    key_seq = jnp.repeat(key_seq, S, axis=1)  # [nQ, C*S]
    key_pos = (batch.key_block_pos[idx][:, :, None] + jnp.arange(S, dtype=jnp.int32)).reshape(idx.shape[0], -1)
    visible = (key_seq[:, None, :] == tok_seq[:, :, None]) & in_window(key_pos[:, None, :], tok_pos[:, :, None], spec)

    keys = _read_tile(cache.k, block_ids, k_scale, heads_first)  # [K, nQ, C, S, Dh]
    values = _read_tile(cache.v, block_ids, v_scale, heads_first)
    K, nQ, C, _, Dh = keys.shape
    keys, values = keys.reshape(K, nQ, C * S, Dh), values.reshape(K, nQ, C * S, Dh)

    scores = capped(jnp.einsum("ikgqd,kind->ikgqn", qg, keys), spec)  # [nQ, K, G, TQ, C*S]
    mask = visible[:, None, None]
    scores = jnp.where(mask, scores, MASKED)
    m_new = jnp.maximum(carry.m, scores.max(axis=-1))
    # Masked scores contribute exactly nothing, also while a row has seen no key yet (its
    # maximum is then the mask value itself, and exp(0) would count them).
    p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
    correction = jnp.exp(carry.m - m_new)
    l_new = carry.l * correction + p.sum(axis=-1)
    acc = carry.acc * correction[..., None] + jnp.einsum("ikgqn,kind->ikgqd", p, values)
    return Carry(m_new, l_new, acc)


def flash_attention(q: jax.Array, cache: KVCache, batch: Batch, k_scale: jax.Array,
                    v_scale: jax.Array, q_tile: int = Q_TILE,
                    key_tile_keys: int = KEY_TILE_KEYS, heads_first: bool = True,
                    spec: AttentionSpec | None = None) -> jax.Array:
    """Causal attention of `q: [T, H, Dh]` over each token's own cached context.

    The same function as the plain definition (every token against every listed key, masked:
    `tests/models/reference_attention.py`) on a general batch built by
    `prepare_batch` (tokens and blocks in sequence order), computed tile by tile.
    """
    T, H, Dh = q.shape
    spec = spec or default_spec(Dh)
    K, S = page_dims(cache.k, heads_first)
    G = H // K
    N = batch.key_block_ids.shape[0]
    tq, key_tile = tile_sizes(T, N, S, q_tile, key_tile_keys)
    nQ = T // tq
    runs = tile_runs(batch, tq, key_tile, spec.window, S)
    # [nQ, K, G, TQ, Dh], scaled once here rather than every score tile.
    qg = (q.astype(jnp.float32) * spec.scale).reshape(nQ, tq, K, G, Dh).transpose(0, 2, 3, 1, 4)
    init = Carry(m=jnp.full((nQ, K, G, tq), MASKED, jnp.float32),
                 l=jnp.zeros((nQ, K, G, tq), jnp.float32),
                 acc=jnp.zeros((nQ, K, G, tq, Dh), jnp.float32))

    def body(j: jax.Array, carry: Carry) -> Carry:
        return _step(j, carry, qg=qg, cache=cache, batch=batch, runs=runs,
                     tok_seq=batch.token_seq.reshape(nQ, tq), tok_pos=batch.positions.reshape(nQ, tq),
                     key_tile=key_tile, k_scale=k_scale, v_scale=v_scale, heads_first=heads_first,
                     spec=spec)

    out = jax.lax.fori_loop(0, runs.steps, body, init)
    # Padding tokens saw no key: a zero output instead of 0/0.
    out = out.acc / jnp.where(out.l > 0, out.l, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(T, H, Dh).astype(q.dtype)
