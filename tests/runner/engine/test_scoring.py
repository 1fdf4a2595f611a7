"""`LLM.forward_tokens`: the served forward's logits of given tokens, against transformers,
whatever the chunking, and its refusals, which change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runner import LLM, SamplingParams
from tests.hf_models import LLM_ARGS

TOKENS = [int(t) for t in np.random.default_rng(5).integers(3, 97, 21)]


@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    folder, hf = hf_checkpoint("qwen3_tied")
    with torch.no_grad():
        reference = hf(torch.tensor([TOKENS])).logits[0].numpy()
    return LLM(str(folder), **LLM_ARGS), reference


@pytest.mark.parametrize("chunks", [None, [8, 8, 5], [20, 1], [3, 1, 1, 16]])
def test_every_chunking_gives_the_reference_logits(setup, chunks):
    llm, reference = setup
    logits = llm.forward_tokens(TOKENS, chunk_sizes=chunks)
    assert logits.shape == reference.shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks


def test_it_leaves_generation_and_the_prefix_cache_as_they_were(setup):
    llm, _ = setup
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = llm.generate([{"prompt_token_ids": TOKENS}], greedy, use_tqdm=False)[0].outputs[0].token_ids
    llm.forward_tokens(TOKENS[:5] + [0] * 16)  # same first block of ids, other KV contents
    after = llm.generate([{"prompt_token_ids": TOKENS}], greedy, use_tqdm=False)[0]
    assert after.outputs[0].token_ids == before
    assert after.num_cached_tokens > 0  # the first call's cached prefix survived


@pytest.mark.parametrize("tokens, chunks, message", [
    ([], None, "non-empty sequence of ints"),
    ([[1, 2]], None, "non-empty sequence of ints"),
    ([1.5, 2.0], None, "non-empty sequence of ints"),
    ([3, 97], None, r"token id 97 is outside the vocabulary \[0, 97\)"),
    ([3, -1], None, "token id -1"),
    ([3] * 129, None, "129 tokens exceed max_model_len=128"),
    ([3, 4, 5], [2, 2], r"adding up to the 3 tokens, got \[2, 2\]"),
    ([3, 4, 5], [3, 0], "positive ints"),
    ([3, 4, 5], [True, 2], "positive ints"),
])
def test_bad_arguments_are_refused_by_name(setup, tokens, chunks, message):
    llm, _ = setup
    with pytest.raises(ValueError, match=message):
        llm.forward_tokens(tokens, chunk_sizes=chunks)
    assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks


def test_a_sleeping_runner_refuses_and_wakes_up_whole(setup):
    llm, reference = setup
    llm.sleep(1)
    try:
        with pytest.raises(RuntimeError, match="sleep"):
            llm.forward_tokens(TOKENS)
        assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks
    finally:
        llm.wake_up()
    np.testing.assert_allclose(llm.forward_tokens(TOKENS), reference, atol=1e-4)
