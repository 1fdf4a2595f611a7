"""Counting backend compilations, JAX's persistent compilation cache, and the memory-map
headroom compiled programs use up.

Counts come from `jax.monitoring`: JAX records one backend-compile duration event per
program it had to build (an in-memory jit cache hit records none), so a count taken around
a call is the number of programs that call built. A program found in the persistent
compilation cache still counts as built, and also as a persistent cache hit.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_count = 0
_cache_hits = 0


def _on_duration(event: str, duration_secs: float, **_: object) -> None:
    global _count
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _count += 1


def _on_event(event: str, **_: object) -> None:
    global _cache_hits
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _cache_hits += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def persistent_cache_hits() -> int:
    """Programs this process loaded from the persistent compilation cache."""
    return _cache_hits


def compile_count() -> int:
    """Backend compilations in this process since it imported this module."""
    return _count


class CompileCounter:
    """`with CompileCounter() as c: ...; c.count` counts the compilations inside the block."""

    def __enter__(self) -> CompileCounter:
        self._start = compile_count()
        self.count = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.count = compile_count() - self._start


def enable_persistent_cache(directory: str | Path) -> None:
    """Keep compiled programs on disk so a second process skips compilation.

    Process-wide JAX setting: call it from the application (CLI, notebook, test), before the
    first compilation; library modules never call it on import.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every program, however small or fast to compile: the step functions are the point.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# Share of the kernel's memory-map limit past which a new runner warns.
MAP_WARNING_SHARE = 0.8


def mapped_regions() -> int | None:
    """Memory regions this process maps now (Linux); None where /proc is not available."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def map_limit() -> int:
    """The most memory regions one process may map (`vm.max_map_count`; Linux's default
    where it cannot be read)."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530


def warn_if_near_map_limit() -> None:
    """Warn when this process already maps most of the regions it may.

    Compiled programs stay loaded for the life of the process (JAX's jit caches), and XLA's
    CPU backend maps a dozen or more regions for each: a process that builds runners for
    many different models reaches the limit, and the compile after that fails and takes
    the process down (a segmentation fault while the failure unwinds). Warned before a
    runner compiles, the caller can still release them.
    """
    regions, limit = mapped_regions(), map_limit()
    if regions is not None and regions > MAP_WARNING_SHARE * limit:
        warnings.warn(f"this process maps {regions} memory regions of the {limit} it may "
                      f"(vm.max_map_count), mostly compiled programs of earlier runners; a compile past the "
                      f"limit fails and ends the process. Call jax.clear_caches() to release them (later calls "
                      f"compile again), or serve fewer distinct models per process.", ResourceWarning, stacklevel=3)
