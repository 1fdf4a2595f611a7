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

# name -> (architecture, config overrides)
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
    # Qwen2: q/k/v biases; its window is off (use_sliding_window false).
    "qwen2_tied_gqa2": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=False)),
    "qwen2_untied_mqa": ("qwen2", dict(tie_word_embeddings=False, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=10, use_sliding_window=False)),
    # Mistral: Llama's maths; served when its window covers every position.
    "mistral_gqa3": ("mistral", dict(tie_word_embeddings=False, num_attention_heads=6, num_key_value_heads=2,
                                     head_dim=10, sliding_window=None)),
}

CLASSES = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}


def build(kind: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A random HF model of the given family; weights drawn with a larger std than HF's
    default so logits are spread out and greedy choices are not near-ties."""
    config_cls, model_cls = CLASSES[kind.split("_")[0]]
    config = config_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def save_variant(name: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                 **extra: Any) -> tuple[Path, transformers.PreTrainedModel]:
    family, overrides = VARIANTS[name]
    model = build(family, seed=seed, **{**overrides, **extra}).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model
