"""Prompt inputs as vLLM takes them: a string, a `TextPrompt` or a `TokensPrompt` dict."""

from __future__ import annotations

import operator
from typing import Any, TypedDict

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
    """Token ids as Python ints: a list or tuple (or 1-D numpy array) of non-negative ints."""
    if hasattr(ids, "tolist") and getattr(ids, "ndim", 1) == 1:
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"prompt {index}: prompt_token_ids: expected a list of ints, got {type(ids).__name__}")
    if not ids:
        raise ValueError(f"prompt {index}: prompt_token_ids: expected at least one token id, got []")
    out = []
    for j, t in enumerate(ids):
        try:
            if isinstance(t, bool) or hasattr(t, "dtype") and t.dtype == bool:
                raise TypeError
            value = operator.index(t)  # ints and numpy integers, not floats
        except TypeError:
            raise ValueError(f"prompt {index}: prompt_token_ids[{j}]: expected an int token id, got {t!r}") from None
        if value < 0:
            raise ValueError(f"prompt {index}: prompt_token_ids[{j}]: expected a token id >= 0, got {value}")
        out.append(value)
    return out


def parse_prompt(index: int, prompt: Any) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt: text only for a string or {"prompt": text}, ids for
    {"prompt_token_ids": ids} (with the text too when the dict also has "prompt"). Media and
    unknown keys are refused, naming the prompt's index and the key."""
    if isinstance(prompt, str):
        return prompt, None
    if not isinstance(prompt, dict):
        raise ValueError(f"prompt {index}: expected a str, {{'prompt': str}} or {{'prompt_token_ids': [int]}}, "
                         f"got {type(prompt).__name__}")
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
