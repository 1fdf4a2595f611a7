"""The per-field `Effect` table alone decides what `update_config` refuses on a running
runner, and `describe_effects()` prints exactly that table."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from runner.device import lifecycle
from state.config import (SECTIONS, CacheConfig, Effect, ModelConfig, MoeConfig, RunnerConfig,
                          SchedulerConfig, describe_effects)
from runner.device.runner_state import RunnerState

BASE = RunnerConfig(
    model_config=ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=128, bos_token_id=2, eos_token_ids=(1,)),
    cache_config=CacheConfig(num_blocks=16),
    scheduler_config=SchedulerConfig(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=128),
)

# Fields only one kind of model has are changed on such a model.
MOE_BASE = dataclasses.replace(BASE, model_config=dataclasses.replace(
    BASE.model_config, architecture="Qwen3MoeForCausalLM",
    moe=MoeConfig(num_experts=4, num_experts_per_tok=2, intermediate_size=16, norm_topk_prob=False)))
BASES = {"model_config.moe": MOE_BASE}

# A valid other value for every field of every section.
OTHER_VALUES: dict[str, object] = {
    "model_config.architecture": "LlamaForCausalLM",
    "model_config.vocab_size": 96,
    "model_config.hidden_size": 40,
    "model_config.intermediate_size": 56,
    "model_config.num_hidden_layers": 3,
    "model_config.num_attention_heads": 8,
    "model_config.num_key_value_heads": 4,
    "model_config.head_dim": 16,
    "model_config.tie_word_embeddings": True,
    "model_config.dtype": "bfloat16",
    "model_config.rms_norm_eps": 1e-5,
    "model_config.rope_theta": 500000.0,
    "model_config.rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64},
    "model_config.attention_bias": True,
    "model_config.sliding_window": 256,
    "model_config.rope_linear_factor": 2.0,
    "model_config.rope_local_theta": 1000.0,
    "model_config.hidden_act": "gelu_pytorch_tanh",
    "model_config.layer_types": ["sliding_attention", "full_attention"],
    "model_config.query_pre_attn_scalar": 16.0,
    "model_config.attn_logit_softcapping": 50.0,
    "model_config.final_logit_softcapping": 30.0,
    "model_config.moe": {"num_experts": 8},
    "model_config.model": "/some/other/folder",
    "model_config.max_position_embeddings": 256,
    "model_config.bos_token_id": 3,
    "model_config.eos_token_ids": [4],
    "model_config.initializer_range": 0.05,
    "load_config.load_format": "dummy",
    "load_config.seed": 1,
    "load_config.check_finite": False,
    "cache_config.block_size": 8,
    "cache_config.num_blocks": 7,
    "cache_config.memory_budget_bytes": 1 << 20,
    "cache_config.gpu_memory_utilization": 0.5,
    "cache_config.kv_cache_dtype": "bfloat16",
    "cache_config.enable_prefix_caching": False,
    "cache_config.attention_backend": "pallas",
    "cache_config.enable_sleep_mode": False,
    "scheduler_config.max_model_len": 64,
    "scheduler_config.max_num_seqs": 4,
    "scheduler_config.max_num_batched_tokens": 256,
    "scheduler_config.enable_chunked_prefill": False,
    "scheduler_config.decode_steps": 4,
    "parallel_config.tensor_parallel_size": 2,
    "parallel_config.data_parallel_size": 2,
    "sampler_config.logprobs_mode": "processed_logprobs",
}


def all_fields() -> list[tuple[str, Effect]]:
    hints = typing.get_type_hints(RunnerConfig)
    return [(f"{section}.{f.name}", f.metadata["effect"])
            for section in SECTIONS for f in dataclasses.fields(hints[section])]


def state(config: RunnerConfig = BASE) -> RunnerState:
    return RunnerState(config=config, params=None, kv_cache=None, num_blocks=16,
                       param_shardings=None, kv_shardings=None)


def test_every_field_has_a_value_to_change_to():
    assert sorted(OTHER_VALUES) == sorted(name for name, _ in all_fields())


@pytest.mark.parametrize("name,effect", all_fields())
def test_refusal_follows_the_effect_of_the_field(name, effect):
    section, field_name = name.split(".")
    overrides = {section: {field_name: OTHER_VALUES[name]}}
    base = BASES.get(name, BASE)
    if effect in (Effect.RESTART, Effect.REALLOCATE):
        with pytest.raises(ValueError, match=rf"^{name} cannot change on a running runner"):
            lifecycle.update_config(state(base), overrides)
    else:
        new = lifecycle.update_config(state(base), overrides)
        assert getattr(getattr(new.config, section), field_name) != getattr(getattr(base, section), field_name)


def test_describe_effects_prints_the_table_the_refusals_follow():
    rows = [line.split(" | ") for line in describe_effects().splitlines()[2:]]
    printed = {row[0].lstrip("| "): row[1] for row in rows}
    assert printed == {name: effect.value for name, effect in all_fields()}
