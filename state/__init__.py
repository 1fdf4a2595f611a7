"""Records, the bottom layer: the frozen config with its effects, the parameter tree's
specs, a step's device input, and the host records of a request and of a scheduled step.
No behaviour beyond validation, nothing jitted, no device arrays."""

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
