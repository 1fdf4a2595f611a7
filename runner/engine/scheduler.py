"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each step has a token budget (`max_num_batched_tokens`) and a sequence limit
(`max_num_seqs`). Running requests are served first, in admission order: a decode takes
one token, an unfinished prompt the next chunk that fits. Waiting requests are then
admitted while budget, sequence slots and KV blocks last, each starting after the longest
prefix the block pool already holds; one whose prefix a running request is still
computing waits for it (so the `n` samples of one prompt compute it once). When a running
request needs a block and none is free, the most recently admitted request is preempted:
its blocks are freed, its progress reset to zero, and it goes back to the front of the
queue with its outputs kept.

When every running request decodes, a step is a multi-step decode of `num_steps` tokens
per request in one device call (see `_num_decode_steps`): the KV slots of all the steps
are reserved up front, and a request that ends early returns them with the rest of its
blocks when it finishes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from state.batch import cdiv
from runner.engine.block_pool import BlockPool
from state.config import RunnerConfig
from state.request import Request, RequestStatus
from state.step import ScheduledRequest, SchedulerOutput


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission)
    num_cached_prompt_tokens: int = 0  # of those, served from the prefix cache
    num_computed_tokens: int = 0  # positions run through the model (a multi-step decode's: those kept)


class Scheduler:
    """Host bookkeeping of every live request. Its limits are read from `config`, which the
    engine replaces when `update_config` changes them (they take effect at the next step)."""

    def __init__(self, config: RunnerConfig, num_blocks: int) -> None:
        self.config = config
        cache = config.cache_config
        self.pool = BlockPool(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        # The version of the weights serving now: requests admitted from here on hash their
        # blocks under it (`BlockPool` roots), so cached KV of other versions is never found.
        self.weight_version = 0
        # Most decode steps one device call may run while a sequence slot is free, and while
        # every slot is taken; None: no cap. A streaming front end sets them from the
        # measured time per step, so that no call outlasts its budget.
        self.step_cap: int | None = None
        self.full_step_cap: int | None = None

    @property
    def block_size(self) -> int:
        return self.config.cache_config.block_size

    @property
    def max_num_seqs(self) -> int:
        return self.config.scheduler_config.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self.config.scheduler_config.max_num_batched_tokens

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler_config.max_model_len

    @property
    def chunked_prefill(self) -> bool:
        return self.config.scheduler_config.enable_chunked_prefill

    # -- queue -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.check_fits(len(request.prompt_token_ids), request.sampling_params.max_tokens)
        self.waiting.append(request)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request whose KV could not fit in the whole pool even alone: it would
        grow until it preempts itself, be readmitted, and do it again forever. Its KV
        covers at most every token but the last one sampled."""
        max_len = min(num_prompt_tokens + max_tokens, self.max_model_len)
        needed = self._blocks_for(max_len - 1)
        if needed > self.pool.num_blocks:
            raise ValueError(
                f"{num_prompt_tokens} prompt tokens plus max_tokens={max_tokens} need up to {needed} "
                f"KV blocks of {self.block_size} tokens, but the cache has {self.pool.num_blocks} "
                "(num_kv_blocks); lower max_tokens or shorten the prompt, or raise num_kv_blocks")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def live_requests(self) -> Iterable[Request]:
        return [*self.running, *self.waiting]

    # -- one step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(num_steps=self._num_decode_steps())
        budget = self.max_num_batched_tokens
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            ahead = n if n > 1 else self.decode_step_tokens(request, out.num_steps)
            if not self._reserve(request, request.num_computed_tokens + ahead, out):
                continue  # the request preempted itself
            out.scheduled.append(ScheduledRequest(request, request.num_computed_tokens, n))
            budget -= n
        # No admission into a multi-step decode: a one-token prefill would run its steps on
        # slots nobody reserved (a request preempted above waits for the next step).
        if self.waiting and out.num_steps == 1:
            self._admit_waiting(budget, out)
        if not out.scheduled and self.has_unfinished():
            # Every live request fits the pool alone (`check_fits`), so an empty step means
            # the bookkeeping lost blocks: stop here rather than loop on empty steps.
            raise RuntimeError(
                f"no request could be scheduled: {len(self.running)} running, {len(self.waiting)} "
                f"waiting, {self.pool.num_free_blocks} of {self.pool.num_blocks} KV blocks free "
                "(abort the requests, e.g. by interrupting generate, and submit them again)")
        self.stats.num_steps += 1
        return out

    def _num_decode_steps(self) -> int:
        """Decode steps for this step's device call.

        One step while a prompt chunk runs or a waiting prompt can be admitted (its
        prefill should not wait for a multi-step decode). Otherwise the configured
        `decode_steps`, or with `decode_steps=0` the automatic count: `AUTO_DECODE_STEPS`,
        cut to end when the first running request reaches its length limit if a prompt
        waits for its sequence slot; at most `step_cap`, or `full_step_cap` while every
        sequence slot is taken (no new request could join before one finishes). Halved
        until the steps' KV slots fit the free blocks, so a tight pool runs fewer steps per
        call before it preempts.
        """
        cap = self.full_step_cap if len(self.running) >= self.max_num_seqs else self.step_cap
        steps = min(self.config.scheduler_config.max_decode_steps, cap or 2**31)
        if steps == 1 or not self.running:
            return 1
        if any(r.num_tokens - r.num_computed_tokens > 1 for r in self.running):
            return 1
        if self.waiting:
            if len(self.running) < self.max_num_seqs:
                return 1
            if self.config.scheduler_config.decode_steps == 0:
                steps = min(steps, min(self._remaining(r) for r in self.running))
        while steps > 1 and self._decode_step_blocks(steps) > self.pool.num_free_blocks:
            steps //= 2
        return steps

    def _remaining(self, request: Request) -> int:
        """Outputs `request` may still produce (max_tokens, capped by max_model_len)."""
        limit = min(request.sampling_params.max_tokens, self.max_model_len - len(request.prompt_token_ids))
        return max(limit - len(request.output_token_ids), 1)

    def decode_step_tokens(self, request: Request, num_steps: int) -> int:
        """KV positions a decoding `request` may write in `num_steps` decode steps."""
        return min(num_steps, self._remaining(request))

    def _decode_step_blocks(self, num_steps: int) -> int:
        return sum(max(self._blocks_for(r.num_computed_tokens + self.decode_step_tokens(r, num_steps))
                       - len(r.block_ids), 0) for r in self.running)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        """Admit waiting requests in order while budget, sequence slots and blocks last.

        A request whose next uncached prompt block a running request is still computing
        waits for it, and is passed over (not in the way of those behind it): the `n`
        samples of one prompt, or equal prompts, then find it cached and compute the prompt
        once, each only the part after its last full block. Computing it beside the writer
        in one step would cost as much: the attention of a general step reads each
        sequence's context blocks, and a step holding one long prompt `n` times reads it
        `n` times.
        """
        coming = self._blocks_coming()
        for request in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                return
            # Hashing a prompt costs a pass over it: only when some prefill is running.
            if coming and self._next_block(request) in coming:
                continue
            if not self._admit(request, budget, out):
                return
            coming |= self._blocks_coming([request])
            budget -= out.scheduled[-1].num_tokens

    def _blocks_coming(self, requests: Iterable[Request] | None = None) -> set[bytes]:
        """Hashes of the full blocks that running `requests` (default: all) have still to
        compute: prompt blocks, or the outputs' blocks a preempted request recomputes."""
        coming: set[bytes] = set()
        if not self.pool.enable_caching:
            return coming
        for r in self.running if requests is None else requests:
            if r.num_tokens - r.num_computed_tokens > 1:
                coming.update(self.pool.next_hashes(r.block_hashes, r.all_token_ids, r.num_tokens // self.block_size,
                                                    r.kv_weight_version))
        return coming

    def _next_block(self, request: Request) -> bytes | None:
        """The hash of the first full block of `request` the prefix cache does not hold."""
        if request.sampling_params.prompt_logprobs is not None:  # it takes nothing cached
            return None
        return self.pool.first_uncached(request.all_token_ids, self.weight_version)

    def _admit(self, request: Request, budget: int, out: SchedulerOutput) -> bool:
        """Start (or resume) a waiting request, if it fits now. It starts after the prefix
        it finds cached."""
        first_admission = request.num_preemptions == 0
        tokens = request.all_token_ids
        # Prompt logprobs need every prompt position computed: such requests skip the cache.
        wants_prompt_logprobs = request.sampling_params.prompt_logprobs is not None
        blocks, hashes = ([], []) if wants_prompt_logprobs else self.pool.lookup_prefix(
            tokens, self.weight_version)
        # At least one token must run through the model to produce the next token's logits.
        while blocks and len(blocks) * self.block_size >= len(tokens):
            self.pool.free([blocks.pop()])
            hashes.pop()
        num_cached = len(blocks) * self.block_size
        n = len(tokens) - num_cached
        # Without chunked prefill a prefill waits for a step with room for all of it; one
        # larger than a whole step's budget (a long prompt, or prompt plus outputs of a
        # preempted request) would wait forever, so it is chunked anyway.
        if n > budget and not self.chunked_prefill and n <= self.max_num_batched_tokens:
            self.pool.free(blocks)
            return False
        n = min(n, budget)
        needed = self._blocks_for(num_cached + n) - len(blocks)
        if needed > self.pool.num_free_blocks:
            self.pool.free(blocks)
            return False
        request.block_ids = blocks + self.pool.allocate(needed)
        request.block_hashes = hashes
        request.kv_weight_version = self.weight_version
        request.num_computed_tokens = num_cached
        if first_admission:
            request.num_cached_tokens = num_cached
            self.stats.num_prompt_tokens += len(request.prompt_token_ids)
            self.stats.num_cached_prompt_tokens += num_cached
        request.status = RequestStatus.RUNNING
        self.waiting.remove(request)
        self.running.append(request)
        out.scheduled.append(ScheduledRequest(request, num_cached, n))
        return True

    def _reserve(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give `request` blocks for `num_tokens`, preempting later requests as needed.

        Returns False when `request` itself had to be preempted.
        """
        needed = self._blocks_for(num_tokens) - len(request.block_ids)
        while needed > self.pool.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is request:
                return False
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        return True

    def preempt_all(self) -> None:
        """Free every running request's KV; each is recomputed from its tokens when it is
        next admitted (after a weight change: under the new weights). Their order is kept."""
        for request in list(reversed(self.running)):
            self._preempt(request)

    def _preempt(self, request: Request, out: SchedulerOutput | None = None) -> None:
        self.running.remove(request)
        if out is not None:
            out.scheduled = [s for s in out.scheduled if s.request is not request]
        self.pool.free(request.block_ids)
        request.block_ids, request.block_hashes = [], []
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1

    def _blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # -- after the step ----------------------------------------------------------------

    def advance(self, s: ScheduledRequest, num_tokens: int = 1) -> None:
        """Count a computed step of `s.request` and offer its full blocks to the prefix cache.

        A multi-step decode computes `num_tokens` positions from `s.start` (one per token it
        kept); other steps compute `s.num_tokens`.
        """
        request = s.request
        request.num_computed_tokens = s.end + num_tokens - 1
        self.stats.num_computed_tokens += request.num_computed_tokens - s.start
        self.pool.cache_blocks(request.block_ids, request.block_hashes, request.all_token_ids,
                               request.num_computed_tokens // self.block_size, request.kv_weight_version)

    def finish(self, request: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Retire a request and return its blocks to the pool (its cached prefix stays)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        if request.status is not RequestStatus.FINISHED:
            self.pool.free(request.block_ids)
            request.block_ids = []
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason

    def abort_all(self) -> None:
        """Retire every live request (used when a generate call is interrupted)."""
        for request in list(self.live_requests()):
            self.finish(request, "abort")

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
