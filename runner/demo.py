"""The built-in model: what `LLM()` and `python -m runner generate` serve with no model.

A small Qwen3-architecture model trained on Python's standard library and its pydoc
topics (`python -m tools.train_builtin`, see `models/builtin/TRAINING.md`), shipped in
Hugging Face layout inside the package.
"""

from __future__ import annotations

from pathlib import Path

import models.builtin

BUILTIN_FOLDER = Path(models.builtin.__file__).parent


def builtin_folder() -> str:
    """The folder holding the built-in model's config.json, weights and tokenizer.json."""
    if not (BUILTIN_FOLDER / "model.safetensors").is_file():
        raise FileNotFoundError(f"the built-in model is missing from {BUILTIN_FOLDER}; "
                                "recreate it with `python -m tools.train_builtin`")
    return str(BUILTIN_FOLDER)
