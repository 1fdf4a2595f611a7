"""A model folder's `generation_config.json`: the sampling settings its authors chose, the
way vLLM's `LLM.get_default_sampling_params()` reads them (`ModelConfig.get_diff_sampling_param`).
`runner.sampling_params.default_sampling_params` turns them into `SamplingParams`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.formats.tokenizer import read_json

# The generation settings vLLM takes from the file; the others (do_sample, num_beams, ...) it
# ignores, and so does this module.
SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """The folder's generation_config.json as a dict ({} when there is none)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object, got {type(config).__name__}")
    return config


def diff_sampling_params(folder: str | Path) -> dict[str, Any]:
    """The sampling settings the model's authors chose: the keys of SAMPLING_KEYS the file sets
    (null counts as unset), with Hugging Face's max_new_tokens renamed to vLLM's max_tokens."""
    config = read_generation_config(folder)
    diff = {key: config[key] for key in SAMPLING_KEYS if config.get(key) is not None}
    if "max_new_tokens" in diff:
        diff["max_tokens"] = diff.pop("max_new_tokens")
    return diff

