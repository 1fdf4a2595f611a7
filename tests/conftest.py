"""Shared fixtures: tiny random HF checkpoints, written once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run on the host CPU; one device unless a test starts its own subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """`hf_checkpoint(name)` -> (folder, torch model), cached per variant name."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = hf_models.save_variant(name, folder)
        return cache[name]

    return get
