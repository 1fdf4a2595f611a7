"""The built-in model is a trained model: held-out perplexity far below a random one's."""

from __future__ import annotations

import math

import numpy as np

from tools.train_builtin import corpus
from runner import LLM, SamplingParams

SPAN = 192


def _perplexity(llm: LLM, spans: list[list[int]]) -> float:
    """exp(mean negative log-likelihood) of every token after the first, from prompt logprobs."""
    outs = llm.generate([{"prompt_token_ids": w} for w in spans],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll = [-entry[token].logprob for out, w in zip(outs, spans)
           for entry, token in zip(out.prompt_logprobs[1:], w[1:])]
    return math.exp(float(np.mean(nll)))


def test_builtin_perplexity_is_far_below_a_random_model():
    trained = LLM(max_model_len=SPAN + 8, num_kv_blocks=64)
    _, held_out = corpus()
    tokens = trained.get_tokenizer().encode("\n".join(held_out[:6]))
    spans = [tokens[i:i + SPAN] for i in range(0, 4 * SPAN, SPAN)]
    ours = _perplexity(trained, spans)
    random = _perplexity(LLM(max_model_len=SPAN + 8, num_kv_blocks=64, load_format="dummy"), spans)
    print(f"held-out perplexity: built-in {ours:.1f}, random weights of the same shape {random:.1f}")
    assert ours < 80 and random > 10 * ours


def test_builtin_model_writes_python_looking_text():
    llm = LLM(max_model_len=256, num_kv_blocks=32)
    text = llm.generate("def ", SamplingParams(temperature=0.7, top_p=0.9, seed=0, max_tokens=48),
                        use_tqdm=False)[0].outputs[0].text
    # Trained on the standard library: Python's syntax shows up at once.
    assert any(marker in text for marker in ("(", ":", "self", "return", "="))
