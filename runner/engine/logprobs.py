"""`Logprob` and the per-position dicts vLLM returns for logprobs and prompt_logprobs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Logprob:
    """One token's log-probability, its 1-based rank in the full distribution, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def position_logprobs(token_id: int, logprob: float, rank: int, top_ids: Sequence[int],
                      top_logprobs: Sequence[float], k: int,
                      decode: Callable[[int], str] | None = None) -> dict[int, Logprob]:
    """vLLM's dict for one position: the chosen (sampled or prompt) token first with its own
    rank, then the k most likely tokens with ranks 1..k. A chosen token among the top k
    appears once, keeping its own entry. `top_ids`/`top_logprobs` are sorted by descending
    logprob and may be wider than k (the device returns a fixed width)."""
    if not 0 <= k <= min(len(top_ids), len(top_logprobs)):
        raise ValueError(f"k: expected 0 <= k <= {min(len(top_ids), len(top_logprobs))} (the top-k width), got {k}")

    def entry(tid: int, lp: float, r: int) -> Logprob:
        return Logprob(float(lp), int(r), None if decode is None else decode(tid))

    out = {int(token_id): entry(int(token_id), logprob, rank)}
    for i in range(k):
        tid = int(top_ids[i])
        if tid not in out:
            out[tid] = entry(tid, top_logprobs[i], i + 1)
    return out
