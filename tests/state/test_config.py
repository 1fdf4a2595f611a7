"""Frozen config records and the pure update_config."""

from __future__ import annotations

import dataclasses
import json

import pytest

from runner.formats.hf_config import hf_config_dict, model_config_from_folder, model_config_from_hf
from state import (CacheConfig, LoadConfig, ModelConfig, RopeScaling, RunnerConfig,
                   SchedulerConfig, describe_effects, update_config)


def _model(**overrides) -> ModelConfig:
    fields = dict(architecture="Qwen3ForCausalLM", vocab_size=97, hidden_size=40,
                  intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12)
    return ModelConfig(**{**fields, **overrides})


def _config() -> RunnerConfig:
    return RunnerConfig(model_config=_model(), scheduler_config=SchedulerConfig(max_model_len=256))


def test_records_are_frozen_and_hashable():
    config = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.load_config.load_format = "dummy"
    assert hash(config.model_config) == hash(_model())


def test_update_returns_new_record_and_leaves_input_unchanged():
    config = _config()
    new = update_config(config, {"load_config": {"load_format": "dummy", "seed": 7},
                                 "cache_config": {"block_size": 32}})
    assert new is not config
    assert (new.load_config.load_format, new.load_config.seed, new.cache_config.block_size) == ("dummy", 7, 32)
    assert config.load_config == LoadConfig() and config.cache_config == CacheConfig()
    assert new.model_config is config.model_config  # untouched sections are shared, not copied


def test_nested_merge_builds_rope_scaling_from_a_dict():
    config = _config()
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    new = update_config(config, {"model_config": {"rope_scaling": scaling}})
    assert new.model_config.rope_scaling == RopeScaling(**scaling)
    newer = update_config(new, {"model_config": {"rope_scaling": {"factor": 2.0}}})
    assert newer.model_config.rope_scaling.factor == 2.0
    assert newer.model_config.rope_scaling.low_freq_factor == 1.0


def test_unknown_section_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config section 'foo'; valid sections: cache_config, "
                                         r"load_config, model_config, parallel_config, sampler_config, "
                                         r"scheduler_config"):
        update_config(_config(), {"foo": {}})


def test_unknown_field_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config field load_config\.'load_fromat'; valid fields "
                                         r"of load_config: check_finite, load_format, seed"):
        update_config(_config(), {"load_config": {"load_fromat": "auto"}})


def test_validation_reruns_on_update():
    with pytest.raises(ValueError, match=r"LoadConfig\.load_format: unknown 'pickle'"):
        update_config(_config(), {"load_config": {"load_format": "pickle"}})
    with pytest.raises(ValueError, match=r"CacheConfig\.block_size: expected a positive int, got 0"):
        update_config(_config(), {"cache_config": {"block_size": 0}})
    with pytest.raises(ValueError, match=r"max_model_len: 9999 exceeds the model's max_position_embeddings"):
        update_config(_config(), {"scheduler_config": {"max_model_len": 9999}})
    with pytest.raises(ValueError, match=r"num_key_value_heads: 3 must divide num_attention_heads \(4\)"):
        update_config(_config(), {"model_config": {"num_key_value_heads": 3}})


def test_section_must_be_a_dict():
    with pytest.raises(ValueError, match=r"RunnerConfig.load_config: expected LoadConfig, got str"):
        update_config(_config(), {"load_config": "dummy"})


def test_lists_become_tuples_so_records_stay_hashable():
    new = update_config(_config(), {"model_config": {"eos_token_ids": [2, 3]}})
    assert new.model_config.eos_token_ids == (2, 3)
    hash(new.model_config)


def test_for_compile_ignores_fields_that_cannot_change_compiled_code():
    a = _model(model="/a", eos_token_ids=(2,))
    b = _model(model="/b", eos_token_ids=(5,))
    assert a != b and a.for_compile() == b.for_compile()
    assert _model(rope_theta=5e5).for_compile() != a.for_compile()


def test_scheduler_limits_are_validated():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens: 4 must be at least max_num_seqs \(8\)"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)


def test_effects_table_documents_every_field():
    table = describe_effects()
    for cls, section in ((ModelConfig, "model_config"), (LoadConfig, "load_config"),
                         (CacheConfig, "cache_config"), (SchedulerConfig, "scheduler_config")):
        for f in dataclasses.fields(cls):
            assert f"| {section}.{f.name} |" in table


def _write(tmp_path, **fields):
    base = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 97, "hidden_size": 40,
            "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 12}
    (tmp_path / "config.json").write_text(json.dumps({**base, **fields}))
    return tmp_path


def test_from_pretrained_reads_hf_config(tmp_path):
    cfg = model_config_from_folder(_write(tmp_path, eos_token_id=[5, 6], dtype="bfloat16",
                                             tie_word_embeddings=True))
    assert cfg.eos_token_ids == (5, 6) and cfg.dtype == "bfloat16" and cfg.tie_word_embeddings
    assert cfg.model == str(tmp_path) and cfg.qk_norm


def test_from_pretrained_reads_llama3_rope_in_both_spellings(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    old = model_config_from_folder(_write(tmp_path, architectures=["LlamaForCausalLM"],
                                             rope_scaling=rope, rope_theta=5e5))
    new = model_config_from_folder(_write(tmp_path, architectures=["LlamaForCausalLM"],
                                             rope_parameters={**rope, "rope_theta": 5e5}))
    assert old == new and old.rope_scaling.factor == 8.0 and old.rope_theta == 5e5


@pytest.mark.parametrize("fields, message", [
    ({"architectures": ["DeepseekV3ForCausalLM"]}, "unsupported architectures"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "unsupported rope scaling type 'longrope'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor other than 1.0"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types other than"),
])
def test_unimplemented_features_are_refused(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_folder(_write(tmp_path, **fields))


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_config_from_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        model_config_from_folder(tmp_path)


def test_config_round_trips_through_hf_dict():
    cfg = _model(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), eos_token_ids=(2,))
    assert model_config_from_hf(hf_config_dict(cfg)) == cfg


@pytest.mark.parametrize("fields, message", [
    ({"eos_token_ids": (2, 97)}, r"ModelConfig\.eos_token_ids: token id 97 is outside the vocabulary "
                                 r"\[0, 97\)"),
    ({"eos_token_ids": (2**40,)}, r"ModelConfig\.eos_token_ids: token id 1099511627776 is outside"),
    ({"bos_token_id": 97}, r"ModelConfig\.bos_token_id: token id 97 is outside the vocabulary \[0, 97\)"),
])
def test_token_ids_outside_the_vocabulary_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        _model(**fields)
    _model(eos_token_ids=(0, 96), bos_token_id=96)  # the vocabulary's first and last ids are fine


def test_token_ids_are_checked_against_the_vocabulary_on_every_path(tmp_path):
    with pytest.raises(ValueError, match=r"ModelConfig\.eos_token_ids: token id 1099511627776 is outside "
                                         r"the vocabulary \[0, 97\)"):
        model_config_from_folder(_write(tmp_path, eos_token_id=2**40))
    config = _config()
    with pytest.raises(ValueError, match=r"ModelConfig\.eos_token_ids: token id 200 is outside"):
        update_config(config, {"model_config": {"eos_token_ids": [2, 200]}})
    shrunk = update_config(config, {"model_config": {"eos_token_ids": [50]}})
    with pytest.raises(ValueError, match=r"ModelConfig\.eos_token_ids: token id 50 is outside the "
                                         r"vocabulary \[0, 40\)"):
        update_config(shrunk, {"model_config": {"vocab_size": 40}})
    assert config.model_config.eos_token_ids == ()
