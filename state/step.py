"""The records of one engine step: which tokens of which requests the scheduler chose.

The scheduler writes a `SchedulerOutput`; the device side reads it (`ModelRunner.execute_model`)
and the engine's `update` writes the results back into its requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from state.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    start: int  # first position computed this step
    num_tokens: int  # positions start .. start + num_tokens - 1
    # Whether this step completes the request's known tokens, so its logits matter. Fixed
    # when the step is scheduled: once `update` appends the sampled token, comparing with
    # the request's length would say False for every step that sampled.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", self.end == self.request.num_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def in_decode_program(self) -> bool:
        """Whether the chunk runs in the decode program, which a step runs after its
        general batch (`ModelRunner.execute_model`): one token, and no prompt positions
        whose log-probabilities its request gathers (only the general batch returns them)."""
        return self.num_tokens == 1 and not (self.request.sampling_params.prompt_logprobs is not None
                                             and self.request.is_prefilling_prompt)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Decode steps the single-token requests run in this step's device call (a multi-step
    # decode when above 1); their KV slots for all of them are reserved.
    num_steps: int = 1

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_decode(self) -> bool:
        """Every scheduled request computes one token: the step fits a decode batch."""
        return all(s.num_tokens == 1 for s in self.scheduled)
