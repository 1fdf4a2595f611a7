"""`EngineArgs`: the keyword arguments `LLM(...)` takes, turned into one `RunnerConfig`.

Each keyword is vLLM's name for the setting. Each vLLM keyword a script may pass is
honoured, accepted as a documented no-op (`NO_OPS`, with why), or refused with a clear
error; none is a TypeError. Defaults that depend on the machine are resolved here
(attention backend, serving dtype, token budget); the records in `state.config` validate
every value.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from runner.formats.hf_config import model_config_from_folder
from runner.sampling_params import MAX_LOGPROBS
from state.config import (CacheConfig, LoadConfig, ModelConfig, ParallelConfig, RunnerConfig, SamplerConfig,
                          SchedulerConfig)


# vLLM keywords accepted with no effect here, and why.
NO_OPS = {
    "enforce_eager": "there is no CUDA graph capture to disable: XLA compiles every program once "
                     "(warmup() compiles them all up front)",
    "disable_log_stats": "the runner logs no periodic statistics; the progress bar is use_tqdm's",
    "swap_space": "preempted requests are recomputed, never swapped to host memory",
    "compilation_config": "jit placement and XLA's optimisation are fixed; see runner.device.compilation "
                          "for the persistent compilation cache",
    "trust_remote_code": "no code from a model folder ever runs; a model that needs custom code is "
                         "refused by its architecture name",
}


# Tokens per step unless set: vLLM's default for offline `LLM` use on CPU. A prompt batch
# that fits one step runs once (one large step costs no more than the smaller ones it
# replaces), and rows that already decode are not stepped beside every chunk (one decode
# step per chunk).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 4096


# vLLM's other names for dtypes (its `--dtype half`, `--dtype float`).
DTYPE_ALIASES = {"half": "float16", "float": "float32"}


@dataclass(frozen=True)
class EngineArgs:
    """Settings of one runner (see `runner.LLM` for what each means)."""

    load_format: str = "auto"
    dtype: str = "auto"
    seed: int | None = 0  # None: drawn at random, as vLLM leaves an unseeded engine
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    decode_steps: int = 0
    kv_cache_dtype: str = "auto"
    attention_backend: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_sleep_mode: bool = True
    gpu_memory_utilization: float | None = None
    max_logprobs: int = MAX_LOGPROBS
    logprobs_mode: str = "raw_logprobs"
    skip_tokenizer_init: bool = False
    generation_config: str = "auto"  # auto (the folder's generation_config.json) | vllm | a folder
    hf_overrides: dict[str, Any] | None = None
    quantization: str | None = None
    revision: str | None = None
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    distributed_executor_backend: str | None = None
    pipeline_parallel_size: int = 1
    enable_lora: bool = False
    # Accepted and ignored, each for the reason NO_OPS gives.
    enforce_eager: bool = False
    disable_log_stats: bool = True
    swap_space: float | None = None
    compilation_config: Any = None

    def __post_init__(self) -> None:
        if self.seed is None:
            object.__setattr__(self, "seed", secrets.randbits(32))
        refusals = {
            "quantization": (self.quantization is None, "no quantized weight format is served yet; "
                             "load the float checkpoint (or use kv_cache_dtype='fp8' for the cache)"),
            "revision": (self.revision in (None, "main"), "only local folders are served: check out "
                         "the revision into a folder and pass its path"),
            "tokenizer_mode": (self.tokenizer_mode in ("auto", "hf", "fast", "slow"), "the folder's "
                               "tokenizer.json is always used; expected auto, hf, fast or slow"),
            "distributed_executor_backend": (self.distributed_executor_backend in (None, "uni", "mp"),
                                             "processes are joined with runner.device.distributed; expected None, uni or mp"),
            "pipeline_parallel_size": (self.pipeline_parallel_size == 1, "only tensor and data parallelism; expected 1"),
            "enable_lora": (self.enable_lora is False, "LoRA adapters are not served; merge them into the weights"),
            "max_logprobs": (isinstance(self.max_logprobs, int) and 0 <= self.max_logprobs <= MAX_LOGPROBS,
                             f"the device returns at most {MAX_LOGPROBS} entries per position; expected 0..{MAX_LOGPROBS}"),
            "hf_overrides": (self.hf_overrides is None or isinstance(self.hf_overrides, dict),
                             "expected a dict merged over config.json (callables are not supported)"),
        }
        for name, (ok, why) in refusals.items():
            if not ok:
                raise ValueError(f"LLM: {name}={getattr(self, name)!r} is not supported: {why}")

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
            dtype = DTYPE_ALIASES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
            model_config = model_config_from_folder(model, dtype=_serving_dtype(model, dtype),
                                                       overrides=_rope_overrides(model, self.hf_overrides))
        # `is None`, not `or`: an explicit 0 must reach the validation, not mean "default".
        max_model_len = (model_config.max_position_embeddings if self.max_model_len is None
                         else self.max_model_len)
        max_tokens = (max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_num_seqs)
                      if self.max_num_batched_tokens is None else self.max_num_batched_tokens)
        return RunnerConfig(
            model_config=model_config,
            load_config=LoadConfig(load_format=self.load_format, seed=self.seed),
            cache_config=CacheConfig(
                block_size=self.block_size, num_blocks=self.num_kv_blocks,
                memory_budget_bytes=self.kv_cache_memory_bytes,
                gpu_memory_utilization=self.gpu_memory_utilization, kv_cache_dtype=self.kv_cache_dtype,
                enable_prefix_caching=self.enable_prefix_caching,
                attention_backend=self.attention_backend or _default_backend(self.kv_cache_dtype),
                enable_sleep_mode=self.enable_sleep_mode),
            scheduler_config=SchedulerConfig(
                max_model_len=max_model_len, max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_tokens, enable_chunked_prefill=self.enable_chunked_prefill,
                decode_steps=self.decode_steps),
            parallel_config=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                           data_parallel_size=self.data_parallel_size),
            sampler_config=SamplerConfig(logprobs_mode=self.logprobs_mode),
        )


def _rope_overrides(model: str, overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """`hf_overrides` with a top-level `rope_theta` also written into the file's
    `rope_parameters`, which is where it is read from when present: vLLM moves a top-level
    rope_theta into rope_parameters too, so {"rope_theta": x} changes the served theta."""
    if not overrides or "rope_theta" not in overrides or "rope_parameters" in overrides:
        return overrides
    try:
        hf = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):  # model_config_from_folder reports the file's problem
        return overrides
    rope = hf.get("rope_parameters") if isinstance(hf, dict) else None
    if not isinstance(rope, dict):
        return overrides
    return {**overrides, "rope_parameters": {**rope, "rope_theta": overrides["rope_theta"]}}


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
    hf = model_config_from_folder(model)
    return "bfloat16" if hf.dtype == "float32" else dtype
