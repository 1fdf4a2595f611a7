"""Shared fixtures: tiny random HF checkpoints, written once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run on the host CPU; one device unless a test starts its own subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from runner.device.compilation import map_limit, mapped_regions  # noqa: E402
from tests import hf_models  # noqa: E402


# Every program XLA's CPU backend compiles stays loaded, and each maps a dozen or more
# memory regions for its code. One process runs the whole suite, so the regions add up to
# the kernel's per-process limit (`vm.max_map_count`, 65,530 by default); the next compile
# then fails, and the process dies unwinding that failure (a segmentation fault inside
# `backend_compile_and_load`). The compiled programs are dropped when the process gets near
# the limit: at the end of a module from 40% of it, so that programs shared by neighbouring
# modules are reused while there is room; after any test from 70% of it, which only a module
# compiling a great many programs reaches.
_MODULE_RELEASE_SHARE = 0.4
_TEST_RELEASE_SHARE = 0.7
_MAP_LIMIT = map_limit()


def _release_if_above(share: float) -> None:
    if (mapped_regions() or 0) > share * _MAP_LIMIT:
        gc.collect()
        jax.clear_caches()
        gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_between_modules():
    yield
    _release_if_above(_MODULE_RELEASE_SHARE)


@pytest.fixture(autouse=True)
def _release_compiled_programs_near_the_limit():
    yield
    _release_if_above(_TEST_RELEASE_SHARE)


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
