"""How far the logprobs of sampled tokens are from a trainer's own recomputation.

A policy-gradient trainer takes, for each sampled token, the log-probability the rollout
engine reported and the one its own forward computes over the whole sequence
(`log_softmax(logits / T)`); any gap between the two biases its importance ratios. Here the
trainer's forward is the served forward itself run densely over prompt + completion
(`LLM.forward_tokens`), in float64 after the logits, at the rollout's dtype and in float32.

Per model (the built-in one and a random tiny Qwen3) and serving dtype: seeded rollouts of
`n` samples per prompt at temperature 1 (mode raw_logprobs) and at 0.7 (mode
processed_logprobs, no top-k / top-p), then max |reported - recomputed| over every token.

    python -m benchmarks.logprob_gap [--dtypes float32 bfloat16] [--output report.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from runner import LLM, SamplingParams
from state.config import ModelConfig

SETTINGS = dict(max_model_len=256, num_kv_blocks=160, block_size=16, max_num_seqs=32)
# The temperatures of a rollout and the logprobs_mode whose values are log_softmax(logits / T)
# there: the raw distribution at T = 1, the processed one otherwise.
CASES = ((1.0, "raw_logprobs"), (0.7, "processed_logprobs"))


def tiny_qwen3(dtype: str = "float32") -> ModelConfig:
    """A random Qwen3 of two layers; weights drawn wide (std 0.2) so that the distributions
    are far from uniform and a gap in them shows."""
    return ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       tie_word_embeddings=True, dtype=dtype, max_position_embeddings=512,
                       initializer_range=0.2)


def make_llm(model: str, dtype: str, logprobs_mode: str) -> LLM:
    if model == "builtin":
        return LLM(dtype=dtype, logprobs_mode=logprobs_mode, **SETTINGS)
    return LLM(model_config=tiny_qwen3(dtype), load_format="dummy", skip_tokenizer_init=True,
               logprobs_mode=logprobs_mode, **SETTINGS)


def prompts(vocab_size: int, count: int = 4, length: int = 24, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab_size, (count, length)).tolist()


def recomputed(trainer: LLM, sequence: list[int], num_prompt: int, temperature: float) -> np.ndarray:
    """log_softmax(logits / T) of each completion token, from one dense forward, in float64."""
    logits = trainer.forward_tokens(sequence).astype(np.float64)[num_prompt - 1:-1] / temperature
    top = logits.max(axis=-1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    return logprobs[np.arange(len(sequence) - num_prompt), sequence[num_prompt:]]


def rollout_gaps(llm: LLM, trainer: LLM, temperature: float, n: int = 4, max_tokens: int = 48) -> np.ndarray:
    """|reported - recomputed| of every sampled token of seeded rollouts (`n` per prompt)."""
    params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=1234, logprobs=0,
                            ignore_eos=True)
    gaps = []
    for p, out in zip(prompts(llm.config.model_config.vocab_size),
                      llm.generate([{"prompt_token_ids": p} for p in prompts(llm.config.model_config.vocab_size)],
                                   params, use_tqdm=False)):
        for c in out.outputs:
            reported = np.array([d[t].logprob for d, t in zip(c.logprobs, c.token_ids)], np.float64)
            gaps.append(np.abs(reported - recomputed(trainer, p + list(c.token_ids), len(p), temperature)))
    return np.concatenate(gaps)


def measure(models: tuple[str, ...] = ("builtin", "qwen3"),
            dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        trainer32 = make_llm(model, "float32", "raw_logprobs")
        for dtype in dtypes:
            for temperature, mode in CASES:
                llm = make_llm(model, dtype, mode)
                same = rollout_gaps(llm, llm, temperature)
                fp32 = same if dtype == "float32" else rollout_gaps(llm, trainer32, temperature)
                rows.append({"model": model, "dtype": dtype, "temperature": temperature, "logprobs_mode": mode,
                             "tokens": int(same.size), "max_gap_same_dtype": float(same.max()),
                             "max_gap_float32_trainer": float(fp32.max())})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["builtin", "qwen3"], choices=["builtin", "qwen3"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = measure(tuple(args.models), tuple(args.dtypes))
    print("| model | dtype | T | logprobs_mode | tokens | max gap, same dtype | max gap, float32 trainer |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['temperature']} | {r['logprobs_mode']} | {r['tokens']} "
              f"| {r['max_gap_same_dtype']:.2e} | {r['max_gap_float32_trainer']:.2e} |")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
