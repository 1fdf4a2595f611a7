"""Counting backend compilations, and JAX's persistent compilation cache.

Counts come from `jax.monitoring`: JAX records one backend-compile duration event per
program it had to build (an in-memory jit cache hit records none), so a count taken around
a call is the number of programs that call built. A program found in the persistent
compilation cache still counts as built, and also as a persistent cache hit.
"""

from __future__ import annotations

import threading
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
