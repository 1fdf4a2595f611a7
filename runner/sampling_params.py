"""`SamplingParams`: vLLM's per-request generation settings, validated at construction."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# The most log-probabilities one position may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
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


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Defaults match vLLM: temperature 1.0 (0 is greedy), top_p 1.0, top_k 0 (off), min_p 0,
    additive presence/frequency penalties, multiplicative repetition penalty,
    max_tokens 16. Processing order in the sampler: float32 logits, logit_bias, penalties,
    temperature, min_p, top_k/top_p, sample.
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
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    _stop_strings: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}: expected {expected}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an int >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0 (0 means greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            raise bad("top_k", "an int in [-1, 2**31) (0 or -1 disables it)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            raise bad("seed", "None or an int in [0, 2**32)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "a number in [-2, 2]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a finite number > 0 (1.0 disables it)")
        if self.logit_bias is not None and not (
                isinstance(self.logit_bias, Mapping)
                and all(_is_int(k) and _is_number(v) for k, v in self.logit_bias.items())):
            raise bad("logit_bias", "None or a dict of int token id -> finite number")
        object.__setattr__(self, "_stop_strings", self._validate_stop())
        if self.stop_token_ids is not None and not (
                isinstance(self.stop_token_ids, Sequence) and all(_is_int(t) for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "None or a list of int token ids")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an int >= 1")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"an int in [0, max_tokens={self.max_tokens}]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"None or an int in [0, {MAX_LOGPROBS}]")

    def _validate_stop(self) -> tuple[str, ...]:
        stop = self.stop
        if stop is None:
            return ()
        strings = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, Sequence) else None
        if strings is None or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"SamplingParams.stop: expected None, a non-empty string or a list of "
                             f"non-empty strings, got {stop!r}")
        return strings

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stop_strings

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)
