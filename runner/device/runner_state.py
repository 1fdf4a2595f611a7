"""The one record a runner holds: configuration, weights, KV cache, sleep state.

Every lifecycle operation (`runner.device.lifecycle`) maps a record to a new record; the shell
object swaps its reference only once the new record is complete, so a failed operation
leaves the old record, and everything derived from it, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from state.config import RunnerConfig
from models.kv_cache import KVCache
from state.params import Params


@dataclass(frozen=True)
class RunnerState:
    config: RunnerConfig
    params: Params | None  # on device; None while the weights sleep or are stale
    kv_cache: tuple[KVCache, ...] | None  # None while the cache sleeps
    num_blocks: int
    param_shardings: Any  # Params tree of jax.sharding.Sharding: where each leaf lives
    kv_shardings: Any  # KV cache tree of shardings, reused when the cache is reallocated
    host_params: Any = None  # level-1 sleep: per leaf, this process's shards in host memory
    weights_stale: bool = False  # woken from level 2: awake (params None) until a reload fills them
    weight_version: int = 0  # set by every reload and every completed streamed update
    # Leaf paths a streamed update (`runner.device.weight_sync`) has not replaced since it
    # began; None when no update is under way. While it is set the tree mixes two versions
    # (or, after a level-2 sleep, holds abstract leaves) and is not served.
    update_pending: frozenset[str] | None = None

    @property
    def sleeping(self) -> tuple[str, ...]:
        """Which of "weights", "kv_cache" are asleep."""
        tags = []
        if self.params is None and not self.weights_stale:
            tags.append("weights")
        if self.kv_cache is None:
            tags.append("kv_cache")
        return tuple(tags)

    def check_servable(self) -> None:
        """Raise unless this record can run a step."""
        if self.sleeping:
            raise RuntimeError(f"the runner is asleep ({' and '.join(self.sleeping)} released): "
                               "call wake_up() before generating")
        if self.weights_stale:
            raise RuntimeError("the weights were woken from a level-2 sleep and hold no values: "
                               "call reload_weights() before generating")
        if self.update_pending is not None:
            missing = sorted(self.update_pending)
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise RuntimeError(f"the weights are stale: a streamed update_weights stopped with {len(missing)} "
                               f"leaf/leaves not replaced ({shown}), so the tree mixes two versions and is "
                               "not served; send the rest with update_weights(...) or reload a whole tree "
                               "with reload_weights(...)")
