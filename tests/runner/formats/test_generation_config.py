"""`runner.formats.generation_config`: a folder's generation_config.json as default SamplingParams."""

from __future__ import annotations

import json

import pytest

from runner.formats.generation_config import diff_sampling_params
from runner.sampling_params import default_sampling_params
from runner.sampling_params import SamplingParams


def _write(folder, config) -> None:
    (folder / "generation_config.json").write_text(config if isinstance(config, str) else json.dumps(config))


def test_sampling_keys_are_taken_and_max_new_tokens_renamed(tmp_path):
    _write(tmp_path, {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                      "max_new_tokens": 256, "do_sample": True, "num_beams": 1, "eos_token_id": [1, 2],
                      "transformers_version": "4.51.0"})
    assert diff_sampling_params(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05,
                                              "repetition_penalty": 1.1, "max_tokens": 256}
    params = default_sampling_params(tmp_path)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
            params.max_tokens) == (0.6, 0.95, 20, 0.05, 1.1, 256)
    assert params.n == 1 and params.presence_penalty == 0.0  # everything else: vLLM's defaults


def test_null_and_missing_keys_keep_the_defaults(tmp_path):
    _write(tmp_path, {"temperature": None, "top_k": 5, "bos_token_id": 1})
    assert diff_sampling_params(tmp_path) == {"top_k": 5}
    assert default_sampling_params(tmp_path) == SamplingParams(top_k=5)
    assert default_sampling_params(tmp_path / "no-such-folder") == SamplingParams()


def test_unreadable_or_invalid_files_are_value_errors(tmp_path):
    _write(tmp_path, "{ not json")
    with pytest.raises(ValueError, match="cannot read .*generation_config.json"):
        default_sampling_params(tmp_path)
    _write(tmp_path, "[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        default_sampling_params(tmp_path)
    _write(tmp_path, {"top_p": 0})
    with pytest.raises(ValueError, match=r"generation_config.json: SamplingParams\.top_p: expected"):
        default_sampling_params(tmp_path)
