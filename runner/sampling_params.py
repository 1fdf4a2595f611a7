"""`SamplingParams`: vLLM's per-request generation settings.

Validated at construction, as vLLM does, and mutable like vLLM's: a script may set
`params.max_tokens = 32` afterwards. The engine submits `params.validated(max_model_len,
prompt_len)`, a checked copy with its own containers, so changes made after submission never
reach a request in flight and a value broken after construction is refused at submission.
"""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.sampler import MAX_LOGPROBS
from runner.formats.generation_config import diff_sampling_params

# The most log-probabilities one position may ask for (vLLM's default max_logprobs).
# The sampler holds settings as float32 and top_k as int32: larger values would become inf
# (then NaN logits) or overflow when the batch is built, mid-generation.
FLOAT32_MAX = 3.4028234663852886e38
INT32_MAX = 2**31 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A real number float32 holds as a finite value (NaN and infinity are not numbers here)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and abs(value) <= FLOAT32_MAX
    except OverflowError:  # an int beyond float range
        return False


class RequestOutputKind(enum.Enum):
    """vLLM's output kinds. Offline generation returns finished requests, for which CUMULATIVE
    and FINAL_ONLY mean the same; DELTA (streamed pieces) is for `runner.AsyncLLM`."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# vLLM fields this engine does not implement: name -> (the one accepted value, what to do instead).
# A script passing the accepted value (the default) runs; any other value is refused by name.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "structured_outputs": (None, "structured (guided) decoding is not implemented"),
    "guided_decoding": (None, "structured (guided) decoding is not implemented"),
    "allowed_token_ids": (None, "not implemented; a logit_bias of -100 on other tokens is close"),
    "bad_words": (None, "not implemented"),
    "logits_processors": (None, "custom logits processors are not implemented"),
    "truncate_prompt_tokens": (None, "prompt truncation is not implemented; shorten the prompt"),
    "logprob_token_ids": (None, "not implemented; use logprobs=k"),
    "prompt_logprob_token_ids": (None, "not implemented; use prompt_logprobs=k"),
    "prompt_logprob_start": (None, "not implemented"),
    "thinking_token_budget": (None, "not implemented"),
    "repetition_detection": (None, "not implemented"),
    "trace_decode_token_ids": (None, "not implemented"),
    "flat_logprobs": (False, "logprobs are returned as one dict per position"),
    "detokenize": (True, "outputs are always detokenized"),
    "spaces_between_special_tokens": (True, "the tokenizers library decodes special tokens without spaces control"),
    "routed_experts_prompt_start": (0, "expert routing data is not returned"),
}


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Defaults match vLLM: temperature 1.0 (0 is greedy), top_p 1.0, top_k 0 (off), min_p 0,
    additive presence/frequency penalties, multiplicative repetition penalty,
    max_tokens 16 (None: up to the context length). Processing order in the sampler:
    float32 logits, logit_bias, penalties, temperature, min_p, top_k/top_p, sample.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM fields accepted for compatibility: honoured as far as an offline engine can, or
    # refused when set to something this engine does not do (see _UNSUPPORTED).
    best_of: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stream_interval: int | None = None
    extra_args: dict[str, Any] | None = None
    skip_clone: bool = False
    skip_reading_prefix_cache: bool | None = None
    structured_outputs: Any = None
    guided_decoding: Any = None
    allowed_token_ids: Sequence[int] | None = None
    bad_words: Sequence[str] | None = None
    logits_processors: Any = None
    truncate_prompt_tokens: int | None = None
    logprob_token_ids: Sequence[int] | None = None
    prompt_logprob_token_ids: Sequence[int] | None = None
    prompt_logprob_start: int | None = None
    thinking_token_budget: int | None = None
    repetition_detection: Any = None
    trace_decode_token_ids: Sequence[int] | None = None
    flat_logprobs: bool = False
    detokenize: bool = True
    spaces_between_special_tokens: bool = True
    routed_experts_prompt_start: int = 0

    def __post_init__(self) -> None:
        self._validate()

    # -- copies for the engine -------------------------------------------------------------

    def clone(self) -> SamplingParams:
        """A deep copy: changing it (or its logit_bias dict, stop list) leaves this one alone."""
        return copy.deepcopy(self)

    def validated(self, max_model_len: int | None = None, prompt_len: int = 0) -> SamplingParams:
        """A checked deep copy for one submitted request: containers copied (logit_bias a dict,
        stop and stop_token_ids lists), every field validated again (the caller may have
        changed them since construction), and max_tokens=None resolved to what fits after a
        prompt of `prompt_len` tokens in `max_model_len`, as vLLM does."""
        params = self.clone()
        if isinstance(params.logit_bias, Mapping):
            params.logit_bias = dict(params.logit_bias)
        if isinstance(params.stop, (list, tuple)):
            params.stop = list(params.stop)
        if isinstance(params.stop_token_ids, (list, tuple)):
            params.stop_token_ids = list(params.stop_token_ids)
        if params.max_tokens is None:
            params.max_tokens = _remaining_context(max_model_len, prompt_len)
        params._validate()
        return params

    # -- derived settings (read at use, so they follow mutation) ---------------------------

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._validate_stop()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    # -- validation ------------------------------------------------------------------------

    def _bad(self, name: str, expected: str) -> ValueError:
        return ValueError(f"SamplingParams.{name}: expected {expected}, got {getattr(self, name)!r}")

    def _validate(self) -> None:
        self._validate_sampling()
        self._validate_penalties()
        self._validate_stopping()
        self._validate_outputs()
        self._validate_compat()

    def _validate_sampling(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise self._bad("n", "an int >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise self._bad("temperature", "a finite number >= 0 (0 means greedy)")
        if self.temperature == 0 and self.n > 1:
            # vLLM refuses it too: greedy decoding would return n copies of one output.
            raise ValueError(f"SamplingParams.n: expected 1 with temperature=0 (greedy sampling gives "
                             f"{self.n} identical outputs), got {self.n}; use temperature > 0 for "
                             f"different samples")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise self._bad("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            raise self._bad("top_k", "an int in [-1, 2**31) (0 or -1 disables it)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise self._bad("min_p", "a number in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            raise self._bad("seed", "None or an int in [0, 2**32)")

    def _validate_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise self._bad(name, "a number in [-2, 2]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise self._bad("repetition_penalty", "a finite number > 0 (1.0 disables it)")
        if self.logit_bias is not None and not (
                isinstance(self.logit_bias, Mapping)
                and all(_is_int(k) and _is_number(v) for k, v in self.logit_bias.items())):
            raise self._bad("logit_bias", "None or a dict of int token id -> finite number")

    def _validate_stopping(self) -> None:
        self._validate_stop()
        if self.stop_token_ids is not None and not (
                isinstance(self.stop_token_ids, Sequence) and all(_is_int(t) for t in self.stop_token_ids)):
            raise self._bad("stop_token_ids", "None or a list of int token ids")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise self._bad("max_tokens", "None (up to the context length) or an int >= 1")
        upper = "" if self.max_tokens is None else f", max_tokens={self.max_tokens}"
        if not _is_int(self.min_tokens) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise self._bad("min_tokens", f"an int in [0{upper}]")

    def _validate_outputs(self) -> None:
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "skip_clone"):
            if not isinstance(getattr(self, name), bool):
                raise self._bad(name, "a bool")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            # -1: the whole vocabulary, as in vLLM; the engine resolves it against its
            # vocabulary and max_logprobs at submission.
            if value is not None and (not _is_int(value) or not -1 <= value <= MAX_LOGPROBS):
                raise self._bad(name, f"None, -1 (the whole vocabulary) or an int in [0, {MAX_LOGPROBS}]")

    def _validate_compat(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise self._bad("best_of", f"None or n={self.n} (best-of-n ranking is not implemented)")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise self._bad("output_kind", "a RequestOutputKind: CUMULATIVE, DELTA (streamed by AsyncLLM) or FINAL_ONLY")
        if self.stream_interval is not None and (not _is_int(self.stream_interval) or self.stream_interval < 1):
            raise self._bad("stream_interval", "None or an int >= 1")
        if self.extra_args is not None and not isinstance(self.extra_args, Mapping):
            raise self._bad("extra_args", "None or a dict")
        if self.skip_reading_prefix_cache is not None and not isinstance(self.skip_reading_prefix_cache, bool):
            raise self._bad("skip_reading_prefix_cache", "None or a bool")
        for name, (accepted, reason) in _UNSUPPORTED.items():
            value = getattr(self, name)
            if not (value is accepted or (value == accepted and type(value) is type(accepted))
                    or (name == "bad_words" and isinstance(value, (list, tuple)) and not value)):
                raise ValueError(f"SamplingParams.{name}: expected {accepted!r} ({reason}), got {value!r}")

    def _validate_stop(self) -> tuple[str, ...]:
        stop = self.stop
        if stop is None:
            return ()
        strings = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, Sequence) else None
        if strings is None or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"SamplingParams.stop: expected None, a non-empty string or a list of "
                             f"non-empty strings, got {stop!r}")
        return strings


def _remaining_context(max_model_len: int | None, prompt_len: int) -> int:
    """max_tokens=None: every position the context has left after the prompt."""
    if max_model_len is None:
        raise ValueError("SamplingParams.max_tokens: None means 'up to the context length', which needs "
                         "max_model_len; pass an int or validate with max_model_len")
    remaining = max_model_len - prompt_len
    if remaining < 1:
        raise ValueError(f"SamplingParams.max_tokens: None leaves no room: the prompt has {prompt_len} tokens "
                         f"and max_model_len={max_model_len}")
    return remaining


def default_sampling_params(folder: str | Path) -> SamplingParams:
    """vLLM's defaults with the folder's generation_config.json settings applied over them."""
    try:
        return SamplingParams(**diff_sampling_params(folder))
    except ValueError as e:
        raise ValueError(f"{Path(folder) / 'generation_config.json'}: {e}") from e
