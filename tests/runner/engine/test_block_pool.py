"""BlockPool: reference counts, prefix caching and lazy eviction, checked against a model.

The state machine below drives one pool with random allocate / free / lookup_prefix /
cache_blocks / reset_prefix_cache sequences and keeps its own record of what every block
holds: the whole token prefix whose KV a holder wrote into it. A revived block must hold
exactly the prefix it was looked up by, and the lookup must find the longest prefix the
model says is still cached.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from runner.engine.block_pool import BlockPool, NoFreeBlocksError, hash_block

NUM_BLOCKS = 12
BLOCK_SIZE = 2
# Prompts are prefixes of three sequences that share their first blocks, or random ones:
# lookups hit often, so sharing, revival and eviction really happen.
BASES = ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 0, 0, 7, 8, 9, 10], [1, 2, 0, 0, 5, 6, 7, 8, 9, 10])
tokens_strategy = st.one_of(
    st.builds(lambda base, n: BASES[base][:n], st.integers(0, len(BASES) - 1), st.integers(0, 10)),
    st.lists(st.integers(0, 1), max_size=8))


class Holder:
    """One request's view: its tokens, its blocks, and how many of them it has computed."""

    def __init__(self, tokens: list[int], blocks: list[int], hashes: list[bytes], computed: int):
        self.tokens = tokens
        self.blocks = blocks
        self.hashes = hashes
        self.computed = computed  # full blocks whose KV is written


class PoolMachine(RuleBasedStateMachine):
    @initialize(caching=st.sampled_from([True, True, True, False]))
    def setup(self, caching: bool) -> None:
        self.pool = BlockPool(NUM_BLOCKS, BLOCK_SIZE, caching)
        self.caching = caching
        self.live: list[Holder] = []
        self.content: dict[int, tuple[int, ...]] = {}  # block -> prefix whose KV it holds
        self.model_cache: dict[tuple[int, ...], int] = {}  # prefix -> block, as the pool should have it

    # -- helpers ------------------------------------------------------------------------

    def _take(self, n: int) -> list[int]:
        free_before = list(self.pool.free_queue)
        blocks = self.pool.allocate(n)
        assert blocks == free_before[:n], "allocation must follow the LRU order"
        for b in blocks:  # handed out: whatever prefix it cached is gone
            self.model_cache = {p: blk for p, blk in self.model_cache.items() if blk != b}
        return blocks

    def _expected_prefix(self, tokens: list[int]) -> int:
        if not self.caching:
            return 0
        n = 0
        while (n + 1) * BLOCK_SIZE <= len(tokens) and tuple(tokens[:(n + 1) * BLOCK_SIZE]) in self.model_cache:
            n += 1
        return n

    # -- rules --------------------------------------------------------------------------

    @rule(n=st.integers(0, 3) | st.just(NUM_BLOCKS + 1))
    def allocate(self, n: int):
        if n > self.pool.num_free_blocks:
            before = (list(self.pool.ref_counts), list(self.pool.free_queue))
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            assert (list(self.pool.ref_counts), list(self.pool.free_queue)) == before
            return
        self.live.append(Holder([], self._take(n), [], 0))

    @rule(tokens=tokens_strategy)
    def admit(self, tokens: list[int]):
        """lookup_prefix, then allocate the rest: what the scheduler does at admission."""
        expected = self._expected_prefix(tokens)
        free_before = self.pool.num_free_blocks
        revived_free = 0
        blocks, hashes = self.pool.lookup_prefix(tokens)
        assert len(blocks) == len(hashes) == expected, "lookup must find the longest cached prefix"
        for i, b in enumerate(blocks):
            assert self.content.get(b) == tuple(tokens[:(i + 1) * BLOCK_SIZE]), \
                f"revived block {b} holds the KV of another prefix"
            assert self.model_cache[tuple(tokens[:(i + 1) * BLOCK_SIZE])] == b
            revived_free += self.pool.ref_counts[b] == 1  # was free before this lookup
            event("revived a free block" if self.pool.ref_counts[b] == 1 else "shared a held block")
        assert self.pool.num_free_blocks == free_before - revived_free
        needed = -(-len(tokens) // BLOCK_SIZE) - len(blocks)
        if needed > self.pool.num_free_blocks:
            self.pool.free(blocks)
            event("admit: no room")
            return
        self.live.append(Holder(list(tokens), blocks + self._take(needed), hashes, len(blocks)))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.integers(1, 5))
    def compute(self, data, extra: int):
        """Write the KV of more full blocks, then register them with cache_blocks."""
        holder = data.draw(st.sampled_from(self.live))
        self._compute(holder, min(len(holder.tokens) // BLOCK_SIZE, holder.computed + extra))

    @rule(tokens=tokens_strategy)
    def first_uncached(self, tokens: list[int]):
        """What the scheduler asks before it admits: the first full block not cached."""
        got = self.pool.first_uncached(tokens)
        n = self._expected_prefix(tokens)
        if not self.caching or (n + 1) * BLOCK_SIZE > len(tokens):
            assert got is None
            return
        assert got == self.pool.next_hashes([], tokens, n + 1)[n]

    def _compute(self, holder: Holder, num_full: int) -> None:
        """`holder` writes its blocks up to `num_full`."""
        for i in range(holder.computed, num_full):
            b = holder.blocks[i]
            assert self.pool.ref_counts[b] == 1, "a request writes only blocks it alone holds"
            self.content[b] = tuple(holder.tokens[:(i + 1) * BLOCK_SIZE])
        before = len(holder.hashes)
        self.pool.cache_blocks(holder.blocks, holder.hashes, holder.tokens, num_full)
        event(f"compute: {num_full - holder.computed} new full blocks")
        holder.computed = num_full
        if not self.caching:
            assert holder.hashes == []
            return
        assert len(holder.hashes) == num_full
        parent = holder.hashes[before - 1] if before else None
        for i in range(before, num_full):
            digest = hash_block(parent, holder.tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
            assert holder.hashes[i] == digest, "hashes must chain over the whole prefix"
            parent = digest
            prefix = tuple(holder.tokens[:(i + 1) * BLOCK_SIZE])
            # A prefix already cached in another block stays there; a fresh block registers.
            self.model_cache.setdefault(prefix, holder.blocks[i])

    @precondition(lambda self: self.live)
    @rule()
    def release_oldest(self):
        self.release_holder(self.live[0])

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data):
        self.release_holder(data.draw(st.sampled_from(self.live)))

    def release_holder(self, holder: Holder) -> None:
        expected_tail = [b for b in reversed(holder.blocks) if self.pool.ref_counts[b] == 1]
        self.pool.free(holder.blocks)
        self.live.remove(holder)
        # Freed blocks join the LRU queue tail first (tail blocks are evicted first).
        assert list(self.pool.free_queue)[len(self.pool.free_queue) - len(expected_tail):] == expected_tail

    @precondition(lambda self: any(h.blocks for h in self.live))
    @rule(data=st.data())
    def double_free_is_refused_atomically(self, data):
        """Freeing one block more times than it is held raises and changes nothing."""
        holder = data.draw(st.sampled_from([h for h in self.live if h.blocks]))
        block = data.draw(st.sampled_from(holder.blocks))
        extra = self.pool.ref_counts[block] + 1
        other = data.draw(st.lists(st.sampled_from(holder.blocks), max_size=3))
        before = (list(self.pool.ref_counts), list(self.pool.free_queue), dict(self.pool.cached))
        with pytest.raises(RuntimeError, match="freed while not allocated"):
            self.pool.free(other + [block] * extra)
        assert (list(self.pool.ref_counts), list(self.pool.free_queue), dict(self.pool.cached)) == before

    @rule()
    def free_unallocated_block_is_refused(self):
        free = list(self.pool.free_queue)
        if not free:
            return
        before = (list(self.pool.ref_counts), list(self.pool.free_queue))
        with pytest.raises(RuntimeError):
            self.pool.free([free[0]])
        assert (list(self.pool.ref_counts), list(self.pool.free_queue)) == before

    @rule(roll=st.integers(0, 7))
    def reset(self, roll: int):
        if roll != 7:  # rare: a reset wipes what the other rules build up
            return
        self.pool.reset_prefix_cache()
        self.model_cache.clear()
        assert self.pool.cached == {}

    @invariant()
    def consistent(self):
        if not hasattr(self, "pool"):
            return
        self.pool.check_invariants([h.blocks for h in self.live])
        for h in self.live:
            assert len(set(h.blocks)) == len(h.blocks), "one request holds a block twice"
        digests = self._model_digests()
        assert {digests[p]: b for p, b in self.model_cache.items()} == self.pool.cached
        assert self.pool.num_free_blocks == NUM_BLOCKS - len({b for h in self.live for b in h.blocks})

    def _model_digests(self) -> dict[tuple[int, ...], bytes]:
        out = {}
        for prefix in self.model_cache:
            parent = None
            for i in range(0, len(prefix), BLOCK_SIZE):
                parent = hash_block(parent, prefix[i:i + BLOCK_SIZE])
            out[prefix] = parent
        return out

    def teardown(self):
        if not hasattr(self, "pool"):
            return
        for h in list(self.live):
            self.pool.free(h.blocks)
        self.live.clear()
        self.pool.check_invariants([])
        assert self.pool.num_free_blocks == NUM_BLOCKS
        assert sorted(self.pool.free_queue) == list(range(NUM_BLOCKS))


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestBlockPool = PoolMachine.TestCase


# -- directed cases ------------------------------------------------------------------------


def test_freed_prefix_is_revived_until_evicted():
    pool = BlockPool(3, 2, enable_caching=True)
    tokens = [1, 2, 3, 4, 5]
    blocks = pool.allocate(3)
    hashes: list[bytes] = []
    pool.cache_blocks(blocks, hashes, tokens, 2)
    pool.free(blocks)
    assert list(pool.free_queue) == [blocks[2], blocks[1], blocks[0]]  # tail evicted first
    revived, got = pool.lookup_prefix(tokens)
    assert revived == blocks[:2] and got == hashes
    assert pool.ref_counts[blocks[0]] == pool.ref_counts[blocks[1]] == 1
    pool.free(revived)
    # Handing out two blocks evicts the partial tail, then the second full block.
    pool.free(pool.allocate(2))
    assert pool.lookup_prefix(tokens)[0] == [blocks[0]]


def test_lookup_never_matches_a_partial_block_or_another_parent():
    pool = BlockPool(4, 2, enable_caching=True)
    a = pool.allocate(2)
    pool.cache_blocks(a, [], [7, 8, 9, 10], 2)
    assert pool.lookup_prefix([7])[0] == []  # no full block
    assert pool.lookup_prefix([0, 0, 9, 10])[0] == []  # same second block, other parent
    got, _ = pool.lookup_prefix([7, 8, 9])
    assert got == [a[0]]
    pool.free(got)
    pool.free(a)
    pool.check_invariants([])


def test_caching_disabled_never_shares():
    pool = BlockPool(4, 2, enable_caching=False)
    a = pool.allocate(2)
    hashes: list[bytes] = []
    pool.cache_blocks(a, hashes, [1, 2, 3, 4], 2)
    assert hashes == [] and pool.cached == {}
    pool.free(a)
    assert pool.lookup_prefix([1, 2, 3, 4]) == ([], [])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=12))
def test_free_rejects_duplicates_beyond_reference_count(blocks_to_free):
    pool = BlockPool(4, 2, enable_caching=True)
    held = pool.allocate(4)
    counts = {b: blocks_to_free.count(b) for b in set(blocks_to_free)}
    before = list(pool.ref_counts)
    if max(counts.values()) > 1:
        with pytest.raises(RuntimeError):
            pool.free(blocks_to_free)
        assert pool.ref_counts == before
        pool.check_invariants([held])
    else:
        pool.free(blocks_to_free)
        pool.check_invariants([[b for b in held if b not in counts]])


# -- faults inside the bookkeeping ------------------------------------------------------------


class InjectedFault(BaseException):
    """Stands for anything that can interrupt the pool mid-operation (KeyboardInterrupt too)."""


class FaultClock:
    """Counts the pool's internal calls and raises at call number `at` while armed."""

    def __init__(self) -> None:
        self.at: int | None = None
        self.calls = 0

    def arm(self, at: int) -> None:
        self.at, self.calls = at, 0

    def disarm(self) -> None:
        self.at = None

    def tick(self) -> None:
        if self.at is None:
            return
        self.calls += 1
        if self.calls == self.at:
            self.at = None  # one fault per operation: the recovery itself runs undisturbed
            raise InjectedFault(f"fault at internal call {self.calls}")


def _faulty(base: type, clock: FaultClock, methods: tuple[str, ...]) -> type:
    """A subclass of `base` whose `methods` tick `clock` before doing their work."""
    def wrap(name: str):
        original = getattr(base, name)

        def method(self, *args, **kwargs):
            clock.tick()
            return original(self, *args, **kwargs)
        return method
    return type(f"Faulty{base.__name__}", (base,), {m: wrap(m) for m in methods})


LIST_OPS = ("__getitem__", "__setitem__")
DICT_OPS = ("__getitem__", "__setitem__", "__delitem__", "__contains__", "get", "pop", "clear")
QUEUE_OPS = DICT_OPS + ("popitem", "move_to_end", "__iter__")


def _instrument(pool: BlockPool, clock: FaultClock) -> None:
    """Route every read and write of the pool's structures through `clock` (again after an
    operation that replaced a structure)."""
    for attr, base, ops in (("ref_counts", list, LIST_OPS), ("block_hash", list, LIST_OPS),
                            ("cached", dict, DICT_OPS), ("free_queue", OrderedDict, QUEUE_OPS)):
        value = getattr(pool, attr)
        if not type(value).__name__.startswith("Faulty"):
            setattr(pool, attr, _faulty(base, clock, ops)(value))


def _snapshot(pool: BlockPool) -> tuple:
    return (list(pool.ref_counts), list(pool.free_queue), dict(pool.cached), list(pool.block_hash))


fault_ops = st.lists(st.tuples(st.sampled_from(["admit", "allocate", "cache", "free", "reset"]),
                               tokens_strategy, st.integers(0, 3), st.integers(1, 16)),
                     min_size=1, max_size=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=fault_ops, caching=st.booleans())
def test_a_fault_at_any_internal_call_leaves_the_pool_as_it_was(ops, caching):
    """Whatever call inside an operation raises (a hash, a dict or list access), the operation
    leaves reference counts, free queue, cache and the caller's hash list exactly as they were;
    without a fault it behaves as usual. Blocks are conserved throughout."""
    clock = FaultClock()
    real_hash = hash_block

    def ticking_hash(parent, token_ids):
        clock.tick()
        return real_hash(parent, token_ids)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("runner.engine.block_pool.hash_block", ticking_hash)
        _run_with_faults(BlockPool(8, BLOCK_SIZE, caching), clock, ops)


def _run_with_faults(pool: BlockPool, clock: FaultClock, ops: list) -> None:
    live: list[Holder] = []
    faults = 0
    for op, tokens, n, at in ops:
        holder = live[n % len(live)] if live else None
        _instrument(pool, clock)
        before, hashes_before = _snapshot(pool), list(holder.hashes) if holder else None
        clock.arm(at)
        try:
            result = _fault_op(pool, op, tokens, n, holder)
        except InjectedFault:
            faults += 1
            clock.disarm()
            assert _snapshot(pool) == before, f"{op} changed the pool before failing"
            if holder is not None:
                assert holder.hashes == hashes_before, f"{op} changed the caller's hashes before failing"
        except NoFreeBlocksError:
            clock.disarm()
            assert _snapshot(pool) == before
        else:
            clock.disarm()
            _record(live, op, tokens, holder, result)
        pool.check_invariants([h.blocks for h in live])
        assert pool.num_free_blocks == 8 - len({b for h in live for b in h.blocks})
    event(f"faults injected: {min(faults, 3)}{'+' if faults >= 3 else ''}")
    for h in live:
        pool.free(h.blocks)
    pool.check_invariants([])
    assert sorted(pool.free_queue) == list(range(8))


def _fault_op(pool: BlockPool, op: str, tokens: list[int], n: int, holder: Holder | None) -> Any:
    if op == "admit":
        return pool.lookup_prefix(tokens)
    if op == "allocate":  # the blocks of `tokens`, or `n` blocks for no tokens
        return pool.allocate(-(-len(tokens) // BLOCK_SIZE) if tokens else n)
    if op == "cache" and holder is not None:
        num_full = len(holder.tokens) // BLOCK_SIZE
        pool.cache_blocks(holder.blocks, holder.hashes, holder.tokens, num_full)
        return None
    if op == "free" and holder is not None:
        pool.free(holder.blocks)
        return None
    if op == "reset":
        pool.reset_prefix_cache()
    return None


def _record(live: list[Holder], op: str, tokens: list[int], holder: Holder | None, result: Any) -> None:
    """What a completed operation changed in the requests' view."""
    if op == "admit":
        blocks, hashes = result
        live.append(Holder(list(tokens[:len(blocks) * BLOCK_SIZE]), blocks, hashes, len(blocks)))
    elif op == "allocate":
        live.append(Holder(list(tokens[:len(result) * BLOCK_SIZE]), result, [], 0))
    elif op == "free" and holder is not None:
        live.remove(holder)

