"""What a `generate` call may be given, checked before any request exists.

Prompts come as vLLM takes them (a string, a `TextPrompt` or a `TokensPrompt` dict) and
become token ids here; sampling settings become one validated `SamplingParams` per
prompt; and each (ids, settings) pair is checked against the model (vocabulary,
max_model_len) and the KV pool. A bad prompt or setting fails the whole call with
nothing run.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

from runner.sampling_params import SamplingParams
from runner.engine.scheduler import Scheduler
from runner.formats.tokenizer import Tokenizer
from state.config import RunnerConfig

class _MediaFields(TypedDict, total=False):
    """Optional vLLM keys for multimodal models; refused here (the models take text only)."""

    multi_modal_data: Any
    mm_processor_kwargs: Any


class TextPrompt(_MediaFields):
    """A prompt given as text, tokenized by the engine."""

    prompt: str


class _TokensPromptText(_MediaFields, total=False):
    prompt: str


class TokensPrompt(_TokensPromptText):
    """A prompt given as token ids; `prompt` may carry its text for the output record."""

    prompt_token_ids: list[int]


_KNOWN_KEYS = frozenset({"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"})
_MEDIA_KEYS = ("multi_modal_data", "mm_processor_kwargs")


def _token_ids(index: int, ids: Any) -> list[int]:
    """Token ids as Python ints: a list or tuple (or 1-D numpy array) of ints (their range is
    checked against the vocabulary by `encode_prompt`)."""
    if hasattr(ids, "tolist") and getattr(ids, "ndim", 1) == 1:
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"prompt {index}: prompt_token_ids: expected a list of ints, got {type(ids).__name__}")
    out = []
    for j, t in enumerate(ids):
        try:
            if isinstance(t, bool) or hasattr(t, "dtype") and t.dtype == bool:
                raise TypeError
            value = operator.index(t)  # ints and numpy integers, not floats
        except TypeError:
            raise ValueError(f"prompt {index}: prompt_token_ids[{j}]: expected an int token id, got {t!r}") from None
        out.append(value)
    return out


def _is_token_list(prompt: Any) -> bool:
    """A list, tuple or 1-D array whose first item is an int: vLLM reads it as one prompt
    of token ids (a list of such lists is several prompts)."""
    if hasattr(prompt, "tolist") and getattr(prompt, "ndim", None) == 1:
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return False
    first = prompt[0]
    return not isinstance(first, bool) and hasattr(first, "__index__")


def parse_prompt(index: int, prompt: Any) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt: text only for a string or {"prompt": text}, ids for
    a list of ints or {"prompt_token_ids": ids} (with the text too when the dict also has
    "prompt"). Media and unknown keys are refused, naming the prompt's index and the key."""
    if isinstance(prompt, str):
        return prompt, None
    if _is_token_list(prompt):
        return None, _token_ids(index, prompt)
    if not isinstance(prompt, dict):
        raise ValueError(f"prompt {index}: expected a str, a list of int token ids, {{'prompt': str}} or "
                         f"{{'prompt_token_ids': [int]}}, got {type(prompt).__name__}")
    unknown = sorted(set(prompt) - _KNOWN_KEYS, key=str)
    if unknown:
        raise ValueError(f"prompt {index}: unknown key {unknown[0]!r}; expected 'prompt' or 'prompt_token_ids'")
    for key in _MEDIA_KEYS:
        if prompt.get(key) is not None:
            raise ValueError(f"prompt {index}: {key!r} is not supported: this model takes text only")
    text = prompt.get("prompt")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"prompt {index}: 'prompt': expected a str, got {type(text).__name__}")
    if "prompt_token_ids" in prompt:
        return text, _token_ids(index, prompt["prompt_token_ids"])
    if text is None:
        raise ValueError(f"prompt {index}: expected a 'prompt' or 'prompt_token_ids' key, got {sorted(prompt)}")
    return text, None


Prompt = str | dict[str, Any] | Sequence[int]


def prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt or a sequence of them, as a list. A flat list of ints is one prompt of
    token ids, as in vLLM; a list of such lists is several."""
    if isinstance(prompts, (str, dict)) or _is_token_list(prompts):
        return [prompts]
    if isinstance(prompts, Iterable) and not isinstance(prompts, (bytes, bytearray)):
        return list(prompts)
    # None, a number, bytes (which would iterate as ints): refused, named.
    raise ValueError(f"prompts: expected a string, a {{'prompt_token_ids': [...]}} dict, or a "
                     f"list of them, got {type(prompts).__name__}")


def sampling_list(sampling_params: Any, n: int) -> list[SamplingParams]:
    """One `SamplingParams` per prompt (None: the defaults)."""
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    if (not isinstance(sampling_params, Iterable)
            or isinstance(sampling_params, (str, bytes, Mapping))):  # e.g. a dict of settings
        raise ValueError(f"sampling_params: expected one SamplingParams or a list of {n} "
                         f"(one per prompt), got {type(sampling_params).__name__}")
    params_list = list(sampling_params)
    if len(params_list) != n or not all(isinstance(p, SamplingParams) for p in params_list):
        raise ValueError(f"sampling_params: expected one SamplingParams or a list of {n} "
                         f"(one per prompt), got {len(params_list)} items")
    return params_list


def encode_prompt(index: int, prompt: Prompt, tokenizer: Tokenizer | None, config: RunnerConfig,
                  why_no_tokenizer: str = "the model folder has no tokenizer.json") -> tuple[str | None, list[int]]:
    """(text, token ids) of one prompt, the ids checked against the vocabulary and
    max_model_len. `why_no_tokenizer` completes the message for text without a tokenizer."""
    text, ids = parse_prompt(index, prompt)
    if ids is None:
        if tokenizer is None:
            raise ValueError(f"prompt {index} is text but there is no tokenizer ({why_no_tokenizer}); "
                             "pass token ids ({'prompt_token_ids': [...]} or a list of ints) instead")
        try:
            ids = tokenizer.encode(text)
        except ValueError as e:
            raise ValueError(f"prompt {index}: {e}") from None
    if not ids:
        raise ValueError(f"prompt {index} is empty: at least one token is needed")
    vocab = config.model_config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt {index}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    max_len = config.scheduler_config.max_model_len
    if len(ids) >= max_len:
        raise ValueError(f"prompt {index} has {len(ids)} tokens; max_model_len={max_len} "
                         "leaves no room for a generated token")
    return text, ids


def check_request(index: int, ids: list[int], params: SamplingParams, config: RunnerConfig,
                  scheduler: Scheduler, tokenizer: Tokenizer | None, max_logprobs: int) -> SamplingParams:
    """The engine's own copy of `params`, validated again (the caller may have changed
    them since they were built, and later changes must not reach the request), with
    `max_tokens=None` resolved; plus what SamplingParams cannot check alone: token ids
    against this vocabulary, stop strings against the tokenizer, logprobs against
    `max_logprobs`, and the request's KV against the whole pool."""
    try:
        params = params.validated(config.scheduler_config.max_model_len, len(ids))
    except ValueError as e:
        raise ValueError(f"prompt {index}: {e}") from None
    vocab = config.model_config.vocab_size
    for name in ("logprobs", "prompt_logprobs"):
        asked = getattr(params, name)
        if asked == -1:  # vLLM's whole vocabulary, bounded by max_logprobs as there
            if vocab > max_logprobs:
                raise ValueError(f"prompt {index}: SamplingParams.{name}=-1 asks for the whole vocabulary "
                                 f"({vocab} entries per position), more than max_logprobs={max_logprobs}; "
                                 f"ask for at most {max_logprobs}")
            setattr(params, name, vocab)
        elif (asked or 0) > max_logprobs:
            raise ValueError(f"prompt {index}: SamplingParams.{name}={asked} exceeds "
                             f"max_logprobs={max_logprobs} (raise it when building the LLM)")
    for name, tokens in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids or ())):
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"SamplingParams.{name}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if params.stop_strings and tokenizer is None:
        raise ValueError("SamplingParams.stop needs a tokenizer to detokenize the output")
    try:
        scheduler.check_fits(len(ids), params.max_tokens)
    except ValueError as e:
        raise ValueError(f"prompt {index}: {e}") from None
    return params
