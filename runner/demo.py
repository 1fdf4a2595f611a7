"""The built-in demo model: what `LLM()` and `python -m runner generate` serve with no model.

A tiny Qwen3-architecture model with seeded random weights and a byte-level tokenizer, so
any text round-trips and a new user sees the whole path run at once (the text it writes
is noise: the weights are untrained).
"""

from __future__ import annotations

from runner.tokenizer import Tokenizer
from state.config import ModelConfig


def model_config() -> ModelConfig:
    return ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=256, hidden_size=128, intermediate_size=384,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        tie_word_embeddings=True, dtype="float32", max_position_embeddings=512,
        initializer_range=0.5)


def tokenizer() -> Tokenizer:
    return Tokenizer.byte_level()
