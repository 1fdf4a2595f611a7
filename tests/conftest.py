"""Shared fixtures: tiny random HF checkpoints, written once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run on the host CPU; one device unless a test starts its own subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound: it builds hundreds of small programs and runs each briefly.
# XLA's cheapest backend optimisation level compiles them markedly faster (README, "Tests"),
# and every assertion holds at either level. Subprocesses inherit the setting.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")

import gc  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

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


_CACHE_ENV = {
    # Every program, however small or quick to compile: most of the suite's are both.
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    # A size bound makes JAX's cache take a file lock around each entry, which test
    # processes writing the same directory at once need.
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(16 << 30),
}


def pytest_configure(config: pytest.Config) -> None:
    """One persistent compilation cache per run, shared by every test process.

    The parallel workers (pytest-xdist), the subprocess tests and the modules that follow a
    cache release load a program another process or module already built instead of
    compiling it again. The directory is new for each run, so no program outlives the code
    that built it; the controller, which spawns the workers, makes it and removes it.
    """
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix="jax-cache-")
    config._jax_cache_dir = directory
    os.environ.update(_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=directory)
    # This process imported JAX before the variables were set (`-n 0` runs tests here).
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", 16 << 30)


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = getattr(config, "_jax_cache_dir", None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
