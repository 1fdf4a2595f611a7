"""Tiny random Hugging Face models, built and saved by the tests themselves.

Dimensions are small and prime-ish so that a transposed or mis-reshaped tensor fails
loudly instead of lining up by accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

BASE: dict[str, Any] = dict(
    vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
    rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
)

# The engine setting the parity and family tests share, so that a variant's programs compile
# once for all of them.
LLM_ARGS: dict[str, Any] = dict(num_kv_blocks=64, block_size=8, max_model_len=128)


def hf_greedy(hf: Any, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, ignoring end-of-sequence tokens."""
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, pad_token_id=0)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()


# family -> (transformers config class, model class)
FAMILIES: dict[str, tuple[Any, Any]] = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
}
# Five experts, two per token; three layers so that dense and sparse layers mix.
QWEN3_MOE = dict(num_hidden_layers=3, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=28)
MIXTRAL = dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=28)
# Gemma: windows of 8 tokens (the tests' prompts are longer), an attention scalar other than
# head_dim, transformers' eager attention (the one that soft-caps scores).
GEMMA2 = dict(num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=16, attn_implementation="eager")
GEMMA3 = dict(num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=16, attn_implementation="eager",
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})

# name -> (family, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_tied": ("qwen3", dict(tie_word_embeddings=True)),
    "qwen3_untied_gqa3": ("qwen3", dict(tie_word_embeddings=False, num_attention_heads=6,
                                        num_key_value_heads=2, head_dim=10)),
    "qwen3_mqa": ("qwen3", dict(tie_word_embeddings=True, num_attention_heads=4,
                                num_key_value_heads=1)),
    "llama3_rope": ("llama", dict(tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "llama_tied_mha": ("llama", dict(tie_word_embeddings=True, num_attention_heads=4,
                                     num_key_value_heads=4, head_dim=10)),
    # Eight query heads and a vocabulary divisible by 8: tensor-parallel sizes up to 8 split
    # heads, MLP and vocabulary.
    "llama_heads8": ("llama", dict(tie_word_embeddings=False, vocab_size=128, num_attention_heads=8,
                                   num_key_value_heads=8, head_dim=6)),
    "qwen3_heads8_gqa2": ("qwen3", dict(tie_word_embeddings=True, vocab_size=128, num_attention_heads=8,
                                        num_key_value_heads=4, head_dim=8)),
    "qwen2_gqa": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2_mqa_tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral_gqa": ("mistral", dict(tie_word_embeddings=False, sliding_window=None)),
    # A window of 4096 covers every sequence the tests serve: full attention.
    "mistral_mqa_window": ("mistral", dict(tie_word_embeddings=False, num_key_value_heads=1,
                                           sliding_window=4096)),
    "qwen3_moe_gqa": ("qwen3_moe", dict(QWEN3_MOE, tie_word_embeddings=False, mlp_only_layers=[1])),
    "qwen3_moe_mqa_step2": ("qwen3_moe", dict(QWEN3_MOE, tie_word_embeddings=True, num_key_value_heads=1,
                                              decoder_sparse_step=2, norm_topk_prob=True)),
    "mixtral_gqa": ("mixtral", dict(MIXTRAL, tie_word_embeddings=False)),
    "mixtral_mqa": ("mixtral", dict(MIXTRAL, tie_word_embeddings=False, num_key_value_heads=1)),
    "phi3_gqa": ("phi3", dict(tie_word_embeddings=False, pad_token_id=0)),
    "phi3_mqa": ("phi3", dict(tie_word_embeddings=False, num_key_value_heads=1, pad_token_id=0)),
    # Eight experts, heads and a vocabulary of 128: tensor-parallel sizes 2 and 4 split experts.
    # Real windows, shorter than the tests' prompts: every layer of Mistral, Qwen2's layers
    # from max_window_layers on.
    "mistral_window8": ("mistral", dict(tie_word_embeddings=False, sliding_window=8)),
    "qwen2_window8": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=8,
                                    max_window_layers=1)),
    "gemma2_gqa": ("gemma2", dict(GEMMA2, tie_word_embeddings=True)),
    "gemma2_mqa_untied": ("gemma2", dict(GEMMA2, tie_word_embeddings=False, num_key_value_heads=1)),
    "gemma3_gqa": ("gemma3", dict(GEMMA3, tie_word_embeddings=True)),
    # Final soft-capping on Gemma 3 too (its checkpoints leave it off), and the 1-in-2
    # pattern of sliding_window_pattern instead of layer_types.
    "gemma3_mqa_capped": ("gemma3", dict(GEMMA3, tie_word_embeddings=False, num_key_value_heads=1,
                                         layer_types=None, sliding_window_pattern=2,
                                         final_logit_softcapping=15.0)),
    "qwen3_moe_heads8": ("qwen3_moe", dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                           moe_intermediate_size=20, tie_word_embeddings=True, vocab_size=128,
                                           num_attention_heads=8, num_key_value_heads=4, head_dim=8)),
}
# The families added beside the core's first two (the parity tests of tests/e2e/test_families.py).
FAMILY_VARIANTS = tuple(name for name, (family, _) in VARIANTS.items() if family not in ("qwen3", "llama"))


def build(kind: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A random HF model of the given family; weights drawn with a larger std than HF's
    default so logits are spread out and greedy choices are not near-ties."""
    config_cls, model_cls = FAMILIES[kind]
    config = config_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's norms scale by 1 + w
                p.copy_((0.0 if kind.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def save_variant(name: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                 **extra: Any) -> tuple[Path, transformers.PreTrainedModel]:
    family, overrides = VARIANTS[name]
    model = build(family, seed=seed, **{**overrides, **extra}).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model
