"""The KV block pool: reference counts, prefix caching, lazy LRU eviction.

A block is *free* when no request holds it (reference count 0). Free blocks wait in one
LRU queue; a free block that still carries a prefix hash keeps its KV contents and can be
revived by a later request with the same prefix until the queue hands it out again
(lazy eviction). A full block's hash chains its parent's: `sha256(parent_hash, token ids)`,
so equal hashes mean equal whole prefixes, not just equal blocks. The first block's parent
is the weight version's root (`version_root`): KV computed under one version of the
weights is found only by requests admitted under the same version.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np


class NoFreeBlocksError(RuntimeError):
    """Raised by `allocate` when the pool cannot hand out the blocks asked for."""


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained digest of one full block (sha256: a collision would serve wrong KV)."""
    h = hashlib.sha256(parent or b"")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def version_root(weight_version: int) -> bytes | None:
    """The parent of a first block's hash under `weight_version` (None for version 0)."""
    if weight_version == 0:
        return None
    return hashlib.sha256(b"weight version %d" % weight_version).digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding that prefix's KV
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        """`n` blocks with reference count 1, least recently freed first."""
        if n > len(self.free_queue):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self.free_queue)} free")
        blocks = list(itertools.islice(self.free_queue, n))
        digests = [self.block_hash[b] for b in blocks]
        try:
            for block in blocks:
                del self.free_queue[block]
                self._evict(block)
                self.ref_counts[block] = 1
        except BaseException:
            self._undo_allocate(blocks, digests)
            raise
        return blocks

    def _undo_allocate(self, blocks: list[int], digests: list[bytes | None]) -> None:
        """Put `blocks` back at the queue's head, free and cached as they were. Each step is
        idempotent, so it repairs an allocation interrupted at any point."""
        for block, digest in zip(reversed(blocks), reversed(digests)):
            self.ref_counts[block] = 0
            self.block_hash[block] = digest
            if digest is not None:
                self.cached[digest] = block
            self.free_queue[block] = None
            self.free_queue.move_to_end(block, last=False)

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody holds joins the LRU queue.

        Blocks are queued in reverse so a request's tail blocks (the least shareable) are
        evicted before its head. A list that would over-free any block (a block not held, or
        listed more often than it is held) is refused whole, before any count changes: a
        half-applied free would leave the pool inconsistent behind the error.
        """
        counts = Counter(blocks)
        for block, count in counts.items():
            if count > self.ref_counts[block]:
                raise RuntimeError(f"block {block} freed while not allocated "
                                   f"(freed {count} times, held {self.ref_counts[block]})")
        held = {block: self.ref_counts[block] for block in counts}
        try:
            for block in reversed(blocks):
                self.ref_counts[block] -= 1
                if self.ref_counts[block] == 0:
                    self.free_queue[block] = None
        except BaseException:
            # Every block listed was held, so none of them was in the free queue before.
            for block, count in held.items():
                self.ref_counts[block] = count
                self.free_queue.pop(block, None)
            raise

    def lookup_prefix(self, token_ids: Sequence[int],
                      weight_version: int = 0) -> tuple[list[int], list[bytes]]:
        """The cached blocks of the longest cached prefix of `token_ids`, and their hashes.

        Takes a reference to each block returned (reviving it from the free queue).
        """
        if not self.enable_caching:
            return [], []
        blocks, hashes = [], []
        for digest in self._prefix_hashes(token_ids, weight_version):
            block = self.cached.get(digest)
            if block is None:
                break
            blocks.append(block)
            hashes.append(digest)
        held = [self.ref_counts[b] for b in blocks]
        # Reviving removes blocks from the middle of the queue: only a copy of its order can
        # put them back where they were.
        order = list(self.free_queue) if 0 in held else None
        try:
            for block in blocks:
                if self.ref_counts[block] == 0:
                    del self.free_queue[block]
                self.ref_counts[block] += 1
        except BaseException:
            for block, count in zip(blocks, held):
                self.ref_counts[block] = count
            if order is not None:
                self.free_queue = OrderedDict.fromkeys(order)
            raise
        return blocks, hashes

    def first_uncached(self, token_ids: Sequence[int], weight_version: int = 0) -> bytes | None:
        """The hash of the first full block of `token_ids` that is not cached (None: none,
        or no prefix caching)."""
        if not self.enable_caching:
            return None
        for digest in self._prefix_hashes(token_ids, weight_version):
            if digest not in self.cached:
                return digest
        return None

    def _prefix_hashes(self, token_ids: Sequence[int], weight_version: int) -> Iterator[bytes]:
        """The chained hashes of the full blocks of `token_ids`, first to last."""
        parent = version_root(weight_version)
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            parent = hash_block(parent, token_ids[start:start + self.block_size])
            yield parent

    def cache_blocks(self, blocks: Sequence[int], hashes: list[bytes], token_ids: Sequence[int],
                     num_full_blocks: int, weight_version: int = 0) -> None:
        """Register the full blocks of a request beyond those already in `hashes`.

        `hashes` is the request's own list of its blocks' digests; it is extended in place.
        A prefix already cached in another block stays with that block.
        """
        if not self.enable_caching:
            return
        digests = self.next_hashes(hashes, token_ids, num_full_blocks, weight_version)
        fresh = [(digest, blocks[i]) for i, digest in enumerate(digests, start=len(hashes))
                 if digest not in self.cached and self.block_hash[blocks[i]] is None]
        known = len(hashes)
        try:
            for digest, block in fresh:
                self.cached[digest] = block
                self.block_hash[block] = digest
            hashes.extend(digests)
        except BaseException:
            del hashes[known:]
            for digest, block in fresh:  # both were unset before
                self.cached.pop(digest, None)
                self.block_hash[block] = None
            raise

    def next_hashes(self, hashes: Sequence[bytes], token_ids: Sequence[int], num_full_blocks: int,
                    weight_version: int = 0) -> list[bytes]:
        """Digests of full blocks `len(hashes)` .. `num_full_blocks - 1` of `token_ids`,
        chained on `hashes`, the digests of the blocks before them (on the version's root
        for the first block)."""
        digests = []
        for i in range(len(hashes), num_full_blocks):
            parent = digests[-1] if digests else hashes[-1] if hashes else version_root(weight_version)
            digests.append(hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size]))
        return digests

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: later requests recompute their whole prompt."""
        # Both replaced together: a cache entry must never outlive its block's hash, nor a
        # hash its cache entry.
        before = self.cached, self.block_hash
        try:
            self.cached, self.block_hash = {}, [None] * self.num_blocks
        except BaseException:
            self.cached, self.block_hash = before
            raise

    def _evict(self, block: int) -> None:
        digest = self.block_hash[block]
        if digest is not None:
            del self.cached[digest]
            self.block_hash[block] = None

    def check_invariants(self, held: Sequence[Sequence[int]] = ()) -> None:
        """Assert the pool is consistent with the block lists `held` by live requests."""
        expected = [0] * self.num_blocks
        for blocks in held:
            for b in blocks:
                expected[b] += 1
        if expected != self.ref_counts:
            raise AssertionError("reference counts disagree with the blocks requests hold")
        free = {b for b in range(self.num_blocks) if self.ref_counts[b] == 0}
        if free != set(self.free_queue):
            raise AssertionError("free queue disagrees with reference counts")
        for digest, block in self.cached.items():
            if self.block_hash[block] != digest:
                raise AssertionError(f"cached block {block} lost its hash")
