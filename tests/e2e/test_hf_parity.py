"""Parity with Hugging Face transformers on tiny random checkpoints loaded by our loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runner import LLM, SamplingParams
from tests.hf_models import LLM_ARGS, VARIANTS, hf_greedy

LOGIT_TOL = 1e-4
PROMPT = [5, 17, 42, 8, 91, 33, 60, 7, 12, 77, 3, 50, 29]
DECODE_STEPS = 8


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prefill_and_decode_logits_match_transformers(name, hf_checkpoint):
    folder, hf = hf_checkpoint(name)
    llm = LLM(str(folder), **LLM_ARGS)
    # The reference's greedy continuation, then every position's logits on both sides: ours
    # as one prefill and one decode step per new token, keys read from the paged cache.
    tokens = PROMPT + hf_greedy(hf, PROMPT, DECODE_STEPS)
    ours = llm.forward_tokens(tokens, chunk_sizes=[len(PROMPT)] + [1] * DECODE_STEPS)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].numpy()
    prefill = np.abs(ours - ref)[:len(PROMPT)].max()
    decode = np.abs(ours - ref)[len(PROMPT):].max()
    print(f"{name}: max |logit diff| prefill {prefill:.2e}, decode {decode:.2e}")
    assert max(prefill, decode) < LOGIT_TOL, (prefill, decode)
    assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_continuation_matches_generate(name, hf_checkpoint):
    folder, hf = hf_checkpoint(name)
    llm = LLM(str(folder), **LLM_ARGS)
    prompts = [PROMPT, PROMPT[:5], [9, 9, 9, 4]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 32)
        assert out.outputs[0].finish_reason == "length"
