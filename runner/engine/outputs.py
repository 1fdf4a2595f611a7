"""What `LLM.generate` returns, shaped like vLLM's `RequestOutput`, and how finished
requests become those outputs (detokenized text, log-probability dicts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.engine.logprobs import Logprob
from state.request import Request


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # (index of the first token, weight version) per run of tokens sampled by one version of
    # the weights: one span unless the weights changed while the request ran.
    weight_versions: list[tuple[int, int]] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (`time.time()`) of one request's life."""

    arrival_time: float
    first_token_time: float | None
    finished_time: float | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None


def request_output(prompt_text: str | None, prompt_token_ids: list[int],
                   group: list[Request]) -> RequestOutput:
    """The output of one prompt from its `n` finished requests."""
    first = group[0]
    k = first.sampling_params.prompt_logprobs
    finished = [r.finished_time for r in group]
    return RequestOutput(
        request_id=first.request_id, prompt=prompt_text,
        prompt_token_ids=prompt_token_ids,
        prompt_logprobs=None if k is None else [None, *first.prompt_logprobs],
        outputs=[completion(i, r) for i, r in enumerate(group)],
        finished=all(r.is_finished for r in group), num_cached_tokens=first.num_cached_tokens,
        metrics=RequestMetrics(
            arrival_time=first.arrival_time,
            first_token_time=min((r.first_token_time for r in group if r.first_token_time), default=None),
            finished_time=None if None in finished else max(finished)))


def completion(index: int, r: Request) -> CompletionOutput:
    """One sequence's output; its text is what the incremental detokenizer kept (cut at a
    stop string, without the EOS or stop token id that ended it)."""
    p = r.sampling_params
    return CompletionOutput(
        index=index, text="" if r.detokenizer is None else r.detokenizer.text, token_ids=list(r.output_token_ids),
        cumulative_logprob=r.cumulative_logprob if p.logprobs is not None else None,
        logprobs=list(r.output_logprobs) if p.logprobs is not None else None,
        finish_reason=r.finish_reason, stop_reason=r.stop_reason, weight_versions=list(r.weight_versions))
