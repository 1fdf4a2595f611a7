"""What `LLM.generate` returns, shaped like vLLM's `RequestOutput`, and how finished
requests become those outputs (detokenized text, log-probability dicts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runner.tokenizer import Tokenizer
from state.request import Request


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


def top_logprobs(ids: np.ndarray, logprobs: np.ndarray, k: int, token: int, logprob: float) -> dict[int, float]:
    """The top `k` entries plus the chosen token, as vLLM reports them."""
    entries = {int(i): float(lp) for i, lp in zip(ids[:k], logprobs[:k])}
    entries[token] = logprob
    return entries


def request_output(prompt: Any, prompt_token_ids: list[int], group: list[Request],
                   tokenizer: Tokenizer | None) -> RequestOutput:
    """The output of one prompt from its `n` finished requests."""
    first = group[0]
    k = first.sampling_params.prompt_logprobs
    return RequestOutput(
        request_id=first.request_id, prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=prompt_token_ids,
        prompt_logprobs=None if k is None else [None, *first.prompt_logprobs],
        outputs=[completion(i, r, tokenizer) for i, r in enumerate(group)],
        finished=all(r.is_finished for r in group), num_cached_tokens=first.num_cached_tokens)


def completion(index: int, r: Request, tokenizer: Tokenizer | None) -> CompletionOutput:
    p = r.sampling_params
    shown = r.output_token_ids
    if (r.finish_reason == "stop" and not isinstance(r.stop_reason, str)
            and not p.include_stop_str_in_output):
        shown = shown[:-1]  # the EOS or stop token id that ended it: in token_ids, not in text
    text = "" if tokenizer is None else tokenizer.decode(shown, skip_special_tokens=p.skip_special_tokens)
    if isinstance(r.stop_reason, str):
        cut = text.find(r.stop_reason)
        text = text[:cut + len(r.stop_reason)] if p.include_stop_str_in_output else text[:cut]
    return CompletionOutput(
        index=index, text=text, token_ids=list(r.output_token_ids),
        cumulative_logprob=r.cumulative_logprob if p.logprobs is not None else None,
        logprobs=list(r.output_logprobs) if p.logprobs is not None else None,
        finish_reason=r.finish_reason, stop_reason=r.stop_reason)
