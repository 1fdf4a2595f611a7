"""Logprobs a trainer can trust: for every sampled token of seeded rollouts, the logprob
the runner reports equals the trainer's recomputation `log_softmax(logits / T)` over the
whole sequence (the served forward run densely) within 2e-5 in float32 — in the mode that
means it: raw_logprobs at T = 1, processed_logprobs otherwise."""

from __future__ import annotations

import pytest

from benchmarks.logprob_gap import CASES, make_llm, rollout_gaps

TOLERANCE = 2e-5


@pytest.mark.parametrize("model", ["builtin", "qwen3"])
@pytest.mark.parametrize("temperature,mode", CASES)
def test_sampled_token_logprobs_match_the_dense_recomputation(model: str, temperature: float, mode: str) -> None:
    llm = make_llm(model, "float32", mode)
    gaps = rollout_gaps(llm, llm, temperature, n=4, max_tokens=32)
    assert gaps.size == 4 * 4 * 32
    assert gaps.max() <= TOLERANCE


def test_raw_logprobs_are_not_what_a_tempered_trainer_computes() -> None:
    """The mismatch the modes exist for: at T = 0.7, raw logprobs are off by far more."""
    llm = make_llm("qwen3", "float32", "raw_logprobs")
    assert rollout_gaps(llm, llm, 0.7, n=2, max_tokens=16).max() > 100 * TOLERANCE
