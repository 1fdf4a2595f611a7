"""Parity with Hugging Face transformers on tiny random checkpoints loaded by our loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from models.llama import compute_logits
from runner import LLM, SamplingParams
from runner.device.model_runner import forward_step
from runner.device.prepare import prepare_batch
from state.request import Request
from tests.hf_models import VARIANTS

LOGIT_TOL = 1e-4
PROMPT = [5, 17, 42, 8, 91, 33, 60, 7, 12, 77, 3, 50, 29]


def _our_logits(llm: LLM, tokens: list[int], start: int) -> np.ndarray:
    """Logits of positions start..len(tokens)-1, computed as one scheduled step that
    continues a request whose first `start` tokens are already in the cache."""
    request = llm._parity_request
    request.prompt_token_ids = tokens
    sched = llm.scheduler
    if start == 0:
        sched.add_request(request)
    out = sched.schedule()
    assert [(s.start, s.num_tokens) for s in out.scheduled] == [(start, len(tokens) - start)]
    batch, _ = prepare_batch(out, llm.config.cache_config.block_size,
                             llm.config.scheduler_config.max_num_seqs)
    state = llm.runner.state
    hidden, kv = forward_step(state.params, state.kv_cache, batch, state.config.model_config.for_compile(),
                             state.config.cache_config.attention_backend)
    llm.runner._state = type(state)(**{**state.__dict__, "kv_cache": kv})
    for s in out.scheduled:
        s.request.num_computed_tokens = s.end
    logits = compute_logits(state.params, hidden, state.config.model_config.final_logit_softcapping)
    return np.asarray(logits)[:len(tokens) - start]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prefill_and_decode_logits_match_transformers(name, hf_checkpoint):
    folder, hf = hf_checkpoint(name)
    llm = LLM(str(folder), num_kv_blocks=32, block_size=4, max_model_len=64)
    llm._parity_request = Request("parity", [], SamplingParams(), seed=0)
    tokens = list(PROMPT)
    ours = _our_logits(llm, tokens, 0)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].numpy()
    diffs = [np.abs(ours - ref).max()]
    for _ in range(8):  # decode steps: one new token each, keys read from the paged cache
        tokens = tokens + [int(ours[-1].argmax())]
        ours = _our_logits(llm, tokens, len(tokens) - 1)
        with torch.no_grad():
            ref = hf(torch.tensor([tokens])).logits[0, -1:].numpy()
        diffs.append(np.abs(ours - ref).max())
    print(f"{name}: max |logit diff| prefill {diffs[0]:.2e}, decode {max(diffs[1:]):.2e}")
    assert max(diffs) < LOGIT_TOL, diffs


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_continuation_matches_generate(name, hf_checkpoint):
    folder, hf = hf_checkpoint(name)
    llm = LLM(str(folder), num_kv_blocks=64, block_size=8, max_model_len=128)
    prompts = [PROMPT, PROMPT[:5], [9, 9, 9, 4]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, pad_token_id=0)
    hf.generation_config.eos_token_id = None  # ignore_eos on the reference side too
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
