"""Immutable records and host-side bookkeeping: config, parameter specs, KV cache layout,
block pool and request state. Nothing here is jitted."""

from state.config import (
    CacheConfig,
    Effect,
    LoadConfig,
    ModelConfig,
    ParallelConfig,
    RopeScaling,
    RunnerConfig,
    SchedulerConfig,
    describe_effects,
    update_config,
)

__all__ = [
    "CacheConfig", "Effect", "LoadConfig", "ModelConfig", "ParallelConfig", "RopeScaling",
    "RunnerConfig", "SchedulerConfig", "describe_effects", "update_config",
]
