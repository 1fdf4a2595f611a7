"""MoE throughput against a dense model with the same active parameters, in one run.

Both models share everything but the MLP: the MoE one has `num_experts` experts of width
`expert_width`, `top_k` of them active per token; the dense one has one MLP of width
`top_k * expert_width`, so each token multiplies the same number of weights. The figure
to read is the ratio MoE / dense tokens per second per batch size (weights are seeded
random; prompts and greedy decoding as `benchmarks.bench`'s workload, EOS ignored).

    PYTHONPATH=. python benchmarks/moe_throughput.py [--experts 8 --top-k 2 --expert-width 768]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks import bench
from runner.formats.bridge import save_pretrained
from runner.device.loader import dummy_params
from state.config import ModelConfig, MoeConfig

SHARED = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, tie_word_embeddings=True, max_position_embeddings=512,
              initializer_range=0.02)


def configs(experts: int, top_k: int, width: int) -> dict[str, ModelConfig]:
    moe = MoeConfig(num_experts=experts, num_experts_per_tok=top_k, intermediate_size=width, norm_topk_prob=True)
    return {"moe": ModelConfig(architecture="Qwen3MoeForCausalLM", intermediate_size=width, moe=moe, **SHARED),
            "dense": ModelConfig(architecture="Qwen3ForCausalLM", intermediate_size=top_k * width, **SHARED)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=768)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    w = bench.Workload(vocab_size=SHARED["vocab_size"], prompt_len=64, max_tokens=32,
                       batch_sizes=tuple(args.batch_sizes), repeats=3)
    rates: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in configs(args.experts, args.top_k, args.expert_width).items():
            folder = save_pretrained(Path(tmp) / name, dummy_params(cfg, seed=0), cfg)
            print(f"{name}:")
            report = bench.run(w, model=str(folder), reference=False)
            rates[name] = {r["batch_size"]: r["ours"]["tokens_per_s"] for r in report["results"]}
    for b in args.batch_sizes:
        print(f"batch {b:3d}: moe {rates['moe'][b]:8.1f} tok/s, dense {rates['dense'][b]:8.1f} tok/s, "
              f"ratio {rates['moe'][b] / rates['dense'][b]:.2f}")


if __name__ == "__main__":
    main()
