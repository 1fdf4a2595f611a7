"""`EngineArgs`: the keyword arguments `LLM(...)` takes, turned into one `RunnerConfig`.

Each keyword is vLLM's name for the setting. Defaults that depend on the machine are
resolved here (attention backend, serving dtype, token budget); the records in
`state.config` validate every value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax

from state.config import (CacheConfig, LoadConfig, ModelConfig, ParallelConfig, RunnerConfig,
                          SchedulerConfig)


@dataclass(frozen=True)
class EngineArgs:
    """Settings of one runner (see `runner.LLM` for what each means)."""

    load_format: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    decode_window: int = 0
    kv_cache_dtype: str = "auto"
    attention_backend: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_sleep_mode: bool = True

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> EngineArgs:
        """Refuse an unknown keyword by name (instead of a bare TypeError)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"LLM: unknown keyword argument(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def to_config(self, model: str | None, model_config: ModelConfig | None) -> RunnerConfig:
        """The runner's config for a model folder, or for an in-memory `model_config`."""
        if model_config is None:
            model_config = ModelConfig.from_pretrained(model, dtype=_serving_dtype(model, self.dtype))
        # `is None`, not `or`: an explicit 0 must reach the validation, not mean "default".
        max_model_len = (model_config.max_position_embeddings if self.max_model_len is None
                         else self.max_model_len)
        max_tokens = (max(1024, self.max_num_seqs) if self.max_num_batched_tokens is None
                      else self.max_num_batched_tokens)
        return RunnerConfig(
            model_config=model_config,
            load_config=LoadConfig(load_format=self.load_format, seed=self.seed),
            cache_config=CacheConfig(
                block_size=self.block_size, num_blocks=self.num_kv_blocks,
                memory_budget_bytes=self.kv_cache_memory_bytes, kv_cache_dtype=self.kv_cache_dtype,
                enable_prefix_caching=self.enable_prefix_caching,
                attention_backend=self.attention_backend or _default_backend(self.kv_cache_dtype),
                enable_sleep_mode=self.enable_sleep_mode),
            scheduler_config=SchedulerConfig(
                max_model_len=max_model_len, max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_tokens, enable_chunked_prefill=self.enable_chunked_prefill,
                decode_window=self.decode_window),
            parallel_config=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                           data_parallel_size=self.data_parallel_size),
        )


def _on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def _default_backend(kv_cache_dtype: str) -> str:
    """Pallas's decode kernel on GPUs (it takes no float8 pages), the jnp reference elsewhere."""
    return "pallas" if _on_gpu() and not kv_cache_dtype.startswith("fp8") else "reference"


def _serving_dtype(model: str, dtype: str) -> str:
    """`auto` serves the checkpoint's dtype, except float32 on a GPU, served as bfloat16
    (half the bytes per decode step; what vLLM does with float32 checkpoints too)."""
    if dtype != "auto" or not _on_gpu():
        return dtype
    hf = ModelConfig.from_pretrained(model)
    return "bfloat16" if hf.dtype == "float32" else dtype
