"""Shared fixtures: tiny random HF checkpoints, written once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run on the host CPU; one device unless a test starts its own subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


# Test modules between two releases of the compiled programs: often enough to keep the
# process far below where the crash below appeared, rarely enough that programs shared by
# neighbouring modules are not recompiled each time (releasing after every module made the
# suite about four times slower).
MODULES_PER_RELEASE = 8
_modules_done = [0]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop the compiled programs every few test modules. One process runs the whole
    suite, and XLA's CPU backend keeps every program it compiled loaded; with the suite's
    programs all resident, the compiler crashed (a segmentation fault inside
    `backend_compile_and_load`) at varying points late in the run."""
    yield
    _modules_done[0] += 1
    if _modules_done[0] % MODULES_PER_RELEASE == 0:
        gc.collect()
        jax.clear_caches()


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
