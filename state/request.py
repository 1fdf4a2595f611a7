"""Host-side state of one request as the scheduler moves it through its life."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Mutable bookkeeping, owned by the scheduler; the device never sees this object.

    `num_computed_tokens` counts tokens whose KV is in the cache; the tokens after it are
    what the next steps compute. Preemption resets it to 0 (recompute), keeping outputs.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # runner.SamplingParams
    seed: int  # per-request seed: sampling depends on (seed, output index) only
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    # The weight version its KV was computed under (set at each admission): the root of its
    # block hashes, so KV of older weights is never found by requests admitted later.
    kv_weight_version: int = 0
    # (index of the first output token, weight version) per run of tokens sampled under one
    # version: one span unless the weights changed while the request ran.
    weight_versions: list[tuple[int, int]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    detokenizer: Any = None  # runner.engine.detokenizer.IncrementalDetokenizer, when there is a tokenizer
    arrival_time: float = 0.0  # time.time() when the request was made
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_prefilling_prompt(self) -> bool:
        """Still computing prompt positions (prompt logprobs are gathered only then)."""
        return self.num_computed_tokens < len(self.prompt_token_ids)
