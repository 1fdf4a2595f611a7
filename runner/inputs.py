"""What a `generate` call may be given, checked before any request exists.

Prompts become token ids here, sampling settings become one `SamplingParams` per prompt,
and each (ids, settings) pair is checked against the model (vocabulary, max_model_len)
and the KV pool. A bad prompt or setting fails the whole call with nothing run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from runner.sampling_params import SamplingParams
from runner.scheduler import Scheduler
from runner.tokenizer import Tokenizer
from state.config import RunnerConfig

Prompt = str | dict[str, Any]


def prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt or a sequence of them, as a list."""
    if isinstance(prompts, (str, dict)):
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


def encode_prompt(index: int, prompt: Prompt, tokenizer: Tokenizer | None,
                  config: RunnerConfig) -> list[int]:
    """Token ids of one prompt, checked against the vocabulary and max_model_len."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"prompt {index} is text but the model has no tokenizer.json; "
                             "pass {'prompt_token_ids': [...]} instead")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"prompt {index}: prompt_token_ids must be a list of ints")
        ids = [int(t) for t in ids]
    else:
        raise ValueError(f"prompt {index}: expected a string or a dict with only "
                         f"'prompt_token_ids', got {type(prompt).__name__}")
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
    return ids


def check_request(index: int, ids: list[int], params: SamplingParams, config: RunnerConfig,
                  scheduler: Scheduler, tokenizer: Tokenizer | None) -> None:
    """What SamplingParams cannot check alone: token ids against this vocabulary, stop
    strings against the tokenizer, and the request's KV against the whole pool."""
    vocab = config.model_config.vocab_size
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
