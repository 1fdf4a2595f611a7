"""The engine: requests in, one step at a time, finished requests out.

One step is three calls, each owned by one stage:

    out = scheduler.schedule()             which tokens of which requests run now
    results = runner.execute_model(out)    the device computes them
    finished = update(scheduler, out, results, tokenizer)   the one writer of results

`update` is the only code that appends tokens and log-probabilities to a request or
decides that it finished (EOS, stop token ids, stop strings, length). The `Engine` also
pairs each lifecycle call with what it means for the cached prefixes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np


from runner.engine.detokenizer import IncrementalDetokenizer, find_stop
from runner.engine.logprobs import position_logprobs
from runner.device.model_runner import ModelRunner, SequenceResult
from runner.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from runner.formats.tokenizer import Tokenizer
from state.config import Effect, RunnerConfig, changed_fields
from state.config import update_config as merge_config
from state.request import Request

if TYPE_CHECKING:  # the public API's record, above this layer
    from runner.sampling_params import SamplingParams


class Engine:
    """A `ModelRunner`, a `Scheduler` over its KV blocks, and the tokenizer."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer | None, seed: int = 0) -> None:
        self.runner = runner
        self.scheduler = Scheduler(runner.config, runner.num_blocks)
        self.scheduler.weight_version = runner.weight_version
        self.tokenizer = tokenizer
        self._rng = np.random.default_rng(seed)
        self._next_id = 0

    # -- requests ------------------------------------------------------------------------

    def make_requests(self, prompt_token_ids: list[int], params: SamplingParams) -> list[Request]:
        """The `n` requests of one prompt; unseeded ones draw their seed here."""
        eos = self.runner.config.model_config.eos_token_ids
        requests = []
        for i in range(params.n):
            seed = (params.seed + i) % 2**32 if params.seed is not None else int(self._rng.integers(2**32))
            detok = (None if self.tokenizer is None
                     else IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens))
            requests.append(Request(request_id=str(self._next_id), prompt_token_ids=list(prompt_token_ids),
                                    sampling_params=params, seed=seed, eos_token_ids=eos,
                                    detokenizer=detok, arrival_time=time.time()))
            self._next_id += 1
        return requests

    def add_requests(self, requests: Iterable[Request]) -> None:
        for r in requests:
            self.scheduler.add_request(r)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Request]:
        """Run one step; returns the requests it finished."""
        out = self.scheduler.schedule()
        results = self.runner.execute_model(out)
        return update(self.scheduler, out, results, self.tokenizer)

    def abort_all(self) -> None:
        """Retire every live request. A step interrupted mid-flight may have lost the cache
        contents, so no cached prefix can be trusted any more either."""
        self.scheduler.abort_all()
        self.scheduler.reset_prefix_cache()

    # -- lifecycle: prefixes computed under the old state are dropped first ---------------

    @property
    def model_runner(self) -> ModelRunner:
        """vLLM's name for a worker's runner (`collective_rpc` callables receive the engine)."""
        return self.runner

    def update_config(self, overrides: dict[str, Any]) -> RunnerConfig:
        # KV computed under other RoPE or norm settings would be reused silently: found out
        # on the merged record (pure), dropped before the swap.
        if isinstance(overrides, dict) and any(
                effect is Effect.RECOMPILE and name.startswith("model_config.")
                for name, effect in changed_fields(self.runner.config, merge_config(self.runner.config, overrides))):
            self.scheduler.reset_prefix_cache()
        new = self.runner.update_config(overrides)
        self.scheduler.config = new
        return new

    def reload_weights(self, **source: Any) -> None:
        self.scheduler.reset_prefix_cache()  # first: an interrupt after it leaves nothing stale
        self.runner.reload_weights(**source)
        self.scheduler.config = self.runner.config  # a weights_path becomes model_config.model
        self.scheduler.weight_version = self.runner.weight_version

    def update_weights(self, buckets: Any, **options: Any) -> None:
        """A streamed update (`runner.device.weight_sync`). Requests still running keep
        their KV and continue on the new weights (their outputs' `weight_versions` show
        where); their blocks hash under the version they were admitted with, so no request
        admitted later reuses KV computed under older weights."""
        before = self.runner.state
        try:
            self.runner.update_weights(buckets, **options)
        finally:
            # Only once a bucket landed: a refused first bucket changes nothing, cache included.
            if self.runner.state is not before:
                self.scheduler.reset_prefix_cache()
            self.scheduler.weight_version = self.runner.weight_version

    def sleep(self, level: int) -> None:
        self.scheduler.reset_prefix_cache()  # the KV contents are about to go
        self.runner.sleep(level)

    def wake_up(self, tags: list[str] | None) -> None:
        self.runner.wake_up(tags)


def update(scheduler: Scheduler, out: SchedulerOutput, results: dict[str, SequenceResult],
           tokenizer: Tokenizer | None = None) -> list[Request]:
    """Write one step's results into its requests; returns those that finished.

    A multi-step decode brings several tokens per request: they are taken in order, each
    checked as if it came alone, and those after the one that finishes are dropped (their
    KV is never read again).

    A token that ends the request by id (EOS, a stop token id) adds no text unless
    `include_stop_str_in_output`. Stop strings are searched in the text the token added,
    once more than `min_tokens` tokens exist (as vLLM does); one completed by a request's
    last allowed token still wins (finish_reason "stop", the text cut at the string).
    """
    finished = []
    now = time.time()
    for s in out.scheduled:
        request, result = s.request, results[s.request.request_id]
        if result.prompt_logprobs is not None:
            _record_prompt_logprobs(s, result, tokenizer)
        if not s.samples:
            scheduler.advance(s)
            continue
        request.first_token_time = request.first_token_time or now
        num_kept, reason = _record_tokens(request, result, scheduler.max_model_len, tokenizer)
        scheduler.advance(s, num_kept)
        if reason is not None:
            scheduler.finish(request, *reason)
            request.finished_time = now
            finished.append(request)
    return finished


def _record_tokens(request: Request, result: SequenceResult, max_model_len: int,
                   tokenizer: Tokenizer | None) -> tuple[int, tuple[str, int | str | None] | None]:
    """Append the step's tokens in order up to the first that ends the request. Returns
    how many were kept and the reason."""
    for j, token in enumerate(result.token_ids):
        _record_sample(request, result, j, tokenizer)
        reason = _token_stop(request, token, max_model_len)
        hit = _add_text(request, token, by_id=reason is not None and reason[0] == "stop")
        reason = ("stop", hit) if hit is not None else reason
        if reason is not None:
            return j + 1, reason
    return len(result.token_ids), None


def _add_text(request: Request, token: int, by_id: bool) -> str | None:
    """Detokenize the new token; the stop string it completes, if any (the text is cut)."""
    params, detok = request.sampling_params, request.detokenizer
    if detok is None or (by_id and not params.include_stop_str_in_output):
        return None
    grown = detok.push([token])
    if by_id or len(request.output_token_ids) <= params.min_tokens:
        return None
    hit = find_stop(detok.text, grown, params.stop_strings)
    if hit is None:
        return None
    stop, at = hit
    detok.truncate(at + len(stop) if params.include_stop_str_in_output else at)
    return stop


def _decoder(tokenizer: Tokenizer | None) -> Callable[[int], str] | None:
    """Each logprob entry's text, as vLLM gives it: the token alone, special tokens shown."""
    return None if tokenizer is None else (lambda t: tokenizer.decode([t], skip_special_tokens=False))


def _record_sample(request: Request, result: SequenceResult, j: int, tokenizer: Tokenizer | None) -> None:
    token, logprob = result.token_ids[j], result.logprobs[j]
    request.output_token_ids.append(token)
    spans = request.weight_versions
    if not spans or spans[-1][1] != result.weight_version:
        spans.append((len(request.output_token_ids) - 1, result.weight_version))
    request.cumulative_logprob += logprob
    k = request.sampling_params.logprobs
    if k is not None:
        request.output_logprobs.append(position_logprobs(
            token, logprob, result.ranks[j], result.top_ids[j], result.top_logprobs[j], k,
            _decoder(tokenizer)))


def _record_prompt_logprobs(s: ScheduledRequest, result: SequenceResult, tokenizer: Tokenizer | None) -> None:
    """Row j of the chunk is computed at position start + j and belongs to the prompt's next
    position; a recomputation after preemption revisits positions already recorded."""
    request, plp = s.request, result.prompt_logprobs
    prompt, k = request.prompt_token_ids, request.sampling_params.prompt_logprobs
    for j, pos in enumerate(range(s.start, s.end)):
        if pos == len(request.prompt_logprobs) and pos + 1 < len(prompt):
            request.prompt_logprobs.append(position_logprobs(
                prompt[pos + 1], float(plp.next_logprobs[j]), int(plp.ranks[j]), plp.top_ids[j],
                plp.top_logprobs[j], k, _decoder(tokenizer)))


def _token_stop(request: Request, token: int, max_model_len: int) -> tuple[str, int | None] | None:
    """(finish reason, stop reason) when `token` ends the request, from token ids alone."""
    params = request.sampling_params
    num_out = len(request.output_token_ids)
    if num_out >= params.min_tokens:
        if not params.ignore_eos and token in request.eos_token_ids:
            return "stop", None
        if params.stop_token_ids and token in params.stop_token_ids:
            return "stop", token
    if num_out >= params.max_tokens or request.num_tokens >= max_model_len:
        return "length", None
    return None
