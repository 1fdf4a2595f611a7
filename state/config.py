"""Frozen configuration records and the pure `update_config`.

Every record is a frozen dataclass whose `__post_init__` validates and never rewrites a
user's value. `update_config(config, overrides)` is the only way to change one: a nested
dict merge, `dataclasses.replace`, and validation re-run on every record it touches.

Each field declares in its metadata what a change to it costs a running runner
(`Effect`); `describe_effects()` renders that table and the runner refuses what it
cannot apply while running.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class Effect(str, enum.Enum):
    """What a running runner must do when a config field changes."""

    NONE = "none"  # read afresh where it is used; nothing else to do
    RELOAD = "reload"  # takes effect at the next reload_weights()
    RECOMPILE = "recompile"  # static argument of the jitted step: next step recompiles
    REALLOCATE = "reallocate"  # changes KV cache layout: needs a new runner
    RESTART = "restart"  # changes parameter shapes or tree structure: needs a new runner


def _f(effect: Effect, default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field carrying its change effect and a one-line doc."""
    meta = {"effect": effect, "doc": doc}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _require(ok: bool, record: str, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{record}.{name}: {message}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool) that a float holds as a finite value: NaN, infinity and
    ints too large for a float would reach the model as NaN or inf (or an OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _check_positive_int(record: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _require(is_int(value) and value > 0, record, name, f"expected a positive int, got {value!r}")


def _check_in_vocab(name: str, token_ids: tuple[int, ...], vocab_size: int) -> None:
    for token in token_ids:
        _require(token < vocab_size, "ModelConfig", name,
                 f"token id {token} is outside the vocabulary [0, {vocab_size}) (vocab_size)")


SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                           "Qwen3MoeForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM",
                           "Gemma3ForCausalLM")
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
# Gemma: (1 + w) RMSNorm, embeddings times sqrt(hidden_size), GeGLU, norms after attention
# and MLP too, soft-capping; Gemma 3 adds q/k norm and a RoPE base of its own on local layers.
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "dummy", "orbax")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3")
# The attention backends; each owns its cache layout (`models.kv_cache.KV_LAYOUTS`).
ATTENTION_BACKENDS = ("reference", "pallas")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (`rope_type: "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            _require(is_finite_number(value) and value > 0, "RopeScaling", name,
                     f"expected a positive finite number, got {value!r}")
        _require(self.high_freq_factor > self.low_freq_factor, "RopeScaling", "high_freq_factor",
                 f"must exceed low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor}")
        _check_positive_int("RopeScaling", "original_max_position_embeddings",
                            self.original_max_position_embeddings)


@dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts MLP of the sparse layers (Qwen3-MoE, Mixtral)."""

    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int  # per expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1 (Mixtral: always)
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (as transformers)

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "intermediate_size", "decoder_sparse_step"):
            _check_positive_int("MoeConfig", name, getattr(self, name))
        _require(self.num_experts_per_tok <= self.num_experts, "MoeConfig", "num_experts_per_tok",
                 f"{self.num_experts_per_tok} exceeds num_experts ({self.num_experts})")
        _require(isinstance(self.norm_topk_prob, bool), "MoeConfig", "norm_topk_prob",
                 f"expected a bool, got {self.norm_topk_prob!r}")
        _require(isinstance(self.mlp_only_layers, tuple) and all(is_int(i) and i >= 0 for i in self.mlp_only_layers),
                 "MoeConfig", "mlp_only_layers", f"expected a tuple of layer indices, got {self.mlp_only_layers!r}")

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a llama-like decoder. Hashable: the jitted step takes it as static."""

    architecture: str = _f(Effect.RESTART, doc="one of SUPPORTED_ARCHITECTURES")
    vocab_size: int = _f(Effect.RESTART)
    hidden_size: int = _f(Effect.RESTART)
    intermediate_size: int = _f(Effect.RESTART)
    num_hidden_layers: int = _f(Effect.RESTART)
    num_attention_heads: int = _f(Effect.RESTART)
    num_key_value_heads: int = _f(Effect.RESTART)
    head_dim: int = _f(Effect.RESTART)
    tie_word_embeddings: bool = _f(Effect.RESTART, False, "one embedding leaf serves as lm_head")
    dtype: str = _f(Effect.RESTART, "float32", "parameter and activation dtype")
    rms_norm_eps: float = _f(Effect.RECOMPILE, 1e-6)
    rope_theta: float = _f(Effect.RECOMPILE, 10000.0)
    rope_scaling: RopeScaling | None = _f(Effect.RECOMPILE, None, "llama3 scaling or None")
    rope_linear_factor: float | None = _f(Effect.RECOMPILE, None, "linear RoPE scaling: frequencies / factor")
    rope_local_theta: float | None = _f(Effect.RECOMPILE, None,
                                        "RoPE base of sliding-window layers, unscaled (Gemma 3); None: rope_theta")
    hidden_act: str = _f(Effect.RECOMPILE, "silu", "MLP gate activation: silu or gelu_pytorch_tanh (Gemma)")
    layer_types: tuple[str, ...] | None = _f(Effect.RECOMPILE, None,
                                             "full_attention | sliding_attention per layer; None: all sliding")
    query_pre_attn_scalar: float | None = _f(Effect.RECOMPILE, None, "attention scale 1/sqrt(this); None: head_dim")
    attn_logit_softcapping: float | None = _f(Effect.RECOMPILE, None, "cap * tanh(score / cap) (Gemma 2)")
    final_logit_softcapping: float | None = _f(Effect.RECOMPILE, None, "cap * tanh(logit / cap) (Gemma 2)")
    attention_bias: bool = _f(Effect.RESTART, False, "q/k/v projections carry biases (Qwen2)")
    sliding_window: int | None = _f(Effect.RECOMPILE, None,
                                    "keys within this many positions of the query (layers layer_types marks)")
    moe: MoeConfig | None = _f(Effect.RESTART, None, "experts of the sparse layers; None: dense")
    model: str | None = _f(Effect.RELOAD, None, "checkpoint folder (HF layout or orbax)")
    max_position_embeddings: int = _f(Effect.NONE, 4096)
    bos_token_id: int | None = _f(Effect.NONE, None)
    eos_token_ids: tuple[int, ...] = _f(Effect.NONE, (), "generation stops on any of these")
    initializer_range: float = _f(Effect.NONE, 0.02, "std of dummy weights")

    def __post_init__(self) -> None:
        name = "ModelConfig"
        _require(self.architecture in SUPPORTED_ARCHITECTURES, name, "architecture",
                 f"unsupported {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _check_positive_int(name, f, getattr(self, f))
        _require(self.num_attention_heads % self.num_key_value_heads == 0, name,
                 "num_key_value_heads", f"{self.num_key_value_heads} must divide "
                 f"num_attention_heads ({self.num_attention_heads})")
        _require(self.head_dim % 2 == 0, name, "head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        _require(self.dtype in SUPPORTED_DTYPES, name, "dtype",
                 f"unsupported {self.dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
        _require(isinstance(self.tie_word_embeddings, bool), name, "tie_word_embeddings",
                 f"expected a bool, got {self.tie_word_embeddings!r}")
        _require(isinstance(self.rms_norm_eps, float) and is_finite_number(self.rms_norm_eps)
                 and self.rms_norm_eps > 0, name, "rms_norm_eps",
                 f"expected a positive finite float, got {self.rms_norm_eps!r}")
        _require(is_finite_number(self.rope_theta) and self.rope_theta > 0, name, "rope_theta",
                 f"expected a positive finite number, got {self.rope_theta!r}")
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling), name,
                 "rope_scaling", f"expected RopeScaling or None, got {self.rope_scaling!r}")
        _require(isinstance(self.attention_bias, bool), name, "attention_bias",
                 f"expected a bool, got {self.attention_bias!r}")
        _check_positive_int(name, "sliding_window", self.sliding_window, allow_none=True)
        _require(self.hidden_act in ACTIVATIONS, name, "hidden_act",
                 f"unsupported {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        _require(self.layer_types is None or (
            isinstance(self.layer_types, tuple) and len(self.layer_types) == self.num_hidden_layers
            and all(t in LAYER_TYPES for t in self.layer_types)), name, "layer_types",
            f"expected None or a tuple of {self.num_hidden_layers} of {', '.join(LAYER_TYPES)}, "
            f"got {self.layer_types!r}")
        for f in ("rope_linear_factor", "rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcapping",
                  "final_logit_softcapping"):
            value = getattr(self, f)
            _require(value is None or (is_finite_number(value) and value > 0), name, f,
                     f"expected None or a positive finite number, got {value!r}")
        _require(self.moe is None or isinstance(self.moe, MoeConfig), name, "moe",
                 f"expected MoeConfig or None, got {self.moe!r}")
        is_moe_arch = self.architecture in MOE_ARCHITECTURES
        _require(is_moe_arch == (self.moe is not None), name, "moe",
                 f"{self.architecture} needs moe {'set' if is_moe_arch else 'None'}, got {self.moe!r}")
        # An empty path would name the working directory: weights would be read from there.
        _require(self.model is None or (isinstance(self.model, str) and self.model != ""), name, "model",
                 f"expected a non-empty path string or None, got {self.model!r}")
        _require(self.bos_token_id is None or (is_int(self.bos_token_id) and self.bos_token_id >= 0),
                 name, "bos_token_id", f"expected None or a token id (an int >= 0), got {self.bos_token_id!r}")
        _require(isinstance(self.eos_token_ids, tuple) and all(is_int(t) and t >= 0 for t in self.eos_token_ids),
                 name, "eos_token_ids", f"expected a tuple of token ids (ints >= 0), got {self.eos_token_ids!r}")
        # An id the logits do not cover can never be sampled, and indexing with it overflows.
        _check_in_vocab("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,),
                        self.vocab_size)
        _check_in_vocab("eos_token_ids", self.eos_token_ids, self.vocab_size)
        # Read only by the dummy initialiser, so nothing else would catch a bad value early.
        _require(is_finite_number(self.initializer_range) and self.initializer_range >= 0, name,
                 "initializer_range", f"expected a finite number >= 0, got {self.initializer_range!r}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3 and Gemma 3 normalise each query and key head before RoPE; Llama does not."""
        return self.architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM")

    @property
    def gemma(self) -> bool:
        return self.architecture in GEMMA_ARCHITECTURES

    def window(self, layer: int) -> int | None:
        """The attention window of `layer`: None for full attention."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def is_sparse(self, layer: int) -> bool:
        """Whether `layer`'s MLP is the mixture of experts."""
        return self.moe is not None and self.moe.is_sparse(layer)

    def for_compile(self) -> ModelConfig:
        """This record with every field that cannot change compiled code reset.

        The jitted step takes the result as its static argument, so pointing `model` at
        another checkpoint or changing the EOS ids never triggers a recompilation.
        """
        resets = {f.name: f.default for f in dataclasses.fields(self)
                  if f.metadata["effect"] in (Effect.NONE, Effect.RELOAD)}
        return dataclasses.replace(self, **resets)


@dataclass(frozen=True)
class LoadConfig:
    """Where weights come from. The checkpoint path itself lives in `ModelConfig.model` only."""

    load_format: str = _f(Effect.RELOAD, "auto", "auto | safetensors | dummy | orbax")
    seed: int = _f(Effect.RELOAD, 0, "seed of dummy weights")
    check_finite: bool = _f(Effect.RELOAD, True, "refuse weights holding NaN or inf")

    def __post_init__(self) -> None:
        _require(self.load_format in LOAD_FORMATS, "LoadConfig", "load_format",
                 f"unknown {self.load_format!r}; valid: {', '.join(LOAD_FORMATS)}")
        # jax.random.key takes a signed 64-bit seed and numpy's generators a non-negative one.
        _require(is_int(self.seed) and 0 <= self.seed < 2**63, "LoadConfig", "seed",
                 f"expected an int in [0, 2**63), got {self.seed!r}")
        _require(isinstance(self.check_finite, bool), "LoadConfig", "check_finite",
                 f"expected a bool, got {self.check_finite!r}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache layout and budget."""

    block_size: int = _f(Effect.REALLOCATE, 16, "tokens per KV block")
    num_blocks: int | None = _f(Effect.REALLOCATE, None, "KV blocks; None: from memory_budget_bytes")
    memory_budget_bytes: int | None = _f(Effect.REALLOCATE, None, "KV budget when num_blocks is None")
    gpu_memory_utilization: float | None = _f(Effect.REALLOCATE, None,
                                              "KV budget as a fraction of free device memory (see kv_cache)")
    kv_cache_dtype: str = _f(Effect.REALLOCATE, "auto", "auto (= model dtype) | float32 | bfloat16 | fp8")
    enable_prefix_caching: bool = _f(Effect.REALLOCATE, True, "share full blocks between requests")
    attention_backend: str = _f(Effect.REALLOCATE, "reference",
                                "reference (jnp, any device) | pallas (GPU decode kernel); sets the KV layout")
    enable_sleep_mode: bool = _f(Effect.NONE, True, "allow sleep() and wake_up()")

    def __post_init__(self) -> None:
        _check_positive_int("CacheConfig", "block_size", self.block_size)
        _check_positive_int("CacheConfig", "num_blocks", self.num_blocks, allow_none=True)
        _check_positive_int("CacheConfig", "memory_budget_bytes", self.memory_budget_bytes, allow_none=True)
        u = self.gpu_memory_utilization
        _require(u is None or (is_finite_number(u) and 0 < u <= 1), "CacheConfig", "gpu_memory_utilization",
                 f"expected a fraction in (0, 1], got {u!r}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "CacheConfig", "kv_cache_dtype",
                 f"unknown {self.kv_cache_dtype!r}; valid: {', '.join(KV_CACHE_DTYPES)}")
        _require(isinstance(self.enable_prefix_caching, bool), "CacheConfig", "enable_prefix_caching",
                 f"expected a bool, got {self.enable_prefix_caching!r}")
        _require(isinstance(self.attention_backend, str) and self.attention_backend in ATTENTION_BACKENDS,
                 "CacheConfig", "attention_backend",
                 f"unknown {self.attention_backend!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
        _require(isinstance(self.enable_sleep_mode, bool), "CacheConfig", "enable_sleep_mode",
                 f"expected a bool, got {self.enable_sleep_mode!r}")
        _require(not (self.attention_backend == "pallas" and self.is_fp8), "CacheConfig",
                 "attention_backend", "the pallas backend takes no fp8 KV cache; use 'reference'")

    @property
    def is_fp8(self) -> bool:
        return self.kv_cache_dtype.startswith("fp8")


# Most decode steps of an automatic multi-step decode. Each device call pays once for its
# host round trip and, on the reference backend, for gathering every row's context
# (`models.multi_step_attention`), so more steps per call spread that cost thinner; but a
# prompt that arrives while a call runs waits for it, and past 32 steps the saving was
# within the host's noise.
AUTO_DECODE_STEPS = 32


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits of the scheduler."""

    max_model_len: int = _f(Effect.REALLOCATE, 4096, "prompt plus output tokens per request")
    max_num_seqs: int = _f(Effect.RECOMPILE, 32, "requests per step")
    max_num_batched_tokens: int = _f(Effect.RECOMPILE, 512, "tokens per step")
    enable_chunked_prefill: bool = _f(Effect.NONE, True, "split long prompts across steps")
    # The most steps is the static length of the loop's token buffers; how many of them a
    # call runs is a dynamic argument, so every step count shares one program.
    decode_steps: int = _f(Effect.RECOMPILE, 0, "decode steps per device call; 0: automatic, "
                           f"up to {AUTO_DECODE_STEPS}; 1: one step per call")

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            _check_positive_int("SchedulerConfig", name, getattr(self, name))
        _require(self.max_num_batched_tokens >= self.max_num_seqs, "SchedulerConfig",
                 "max_num_batched_tokens", f"{self.max_num_batched_tokens} must be at least "
                 f"max_num_seqs ({self.max_num_seqs}) so every running request can decode")
        _require(is_int(self.decode_steps) and self.decode_steps >= 0, "SchedulerConfig", "decode_steps",
                 f"expected an int >= 0 (0: automatic), got {self.decode_steps!r}")
        _require(isinstance(self.enable_chunked_prefill, bool), "SchedulerConfig",
                 "enable_chunked_prefill", f"expected a bool, got {self.enable_chunked_prefill!r}")

    @property
    def max_decode_steps(self) -> int:
        """Decode steps one device call can run (the loop's static buffer length)."""
        return self.decode_steps or AUTO_DECODE_STEPS


# What logprobs report (vLLM's `logprobs_mode`): the model's distribution or the one the
# sampler draws from (after bias, penalties, temperature and the min_p / top-k / top-p
# mask), each as log-probabilities or as logits. `models.sampler` takes a row's mode as
# its index here.
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


@dataclass(frozen=True)
class SamplerConfig:
    """What the sampler reports besides its tokens."""

    logprobs_mode: str = _f(Effect.NONE, "raw_logprobs", "what logprobs report: " + " | ".join(LOGPROBS_MODES))

    def __post_init__(self) -> None:
        _require(isinstance(self.logprobs_mode, str) and self.logprobs_mode in LOGPROBS_MODES, "SamplerConfig",
                 "logprobs_mode", f"unknown {self.logprobs_mode!r}; valid: {', '.join(LOGPROBS_MODES)}")


@dataclass(frozen=True)
class ParallelConfig:
    """Device mesh shape: data parallel x tensor parallel."""

    tensor_parallel_size: int = _f(Effect.RESTART, 1)
    data_parallel_size: int = _f(Effect.RESTART, 1)

    def __post_init__(self) -> None:
        _check_positive_int("ParallelConfig", "tensor_parallel_size", self.tensor_parallel_size)
        _check_positive_int("ParallelConfig", "data_parallel_size", self.data_parallel_size)


@dataclass(frozen=True)
class RunnerConfig:
    """The one configuration record of a runner."""

    model_config: ModelConfig
    load_config: LoadConfig = field(default_factory=LoadConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    sampler_config: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(value).__name__ != _declared_type_name(f):
                raise ValueError(f"RunnerConfig.{f.name}: expected {_declared_type_name(f)}, "
                                 f"got {type(value).__name__}")
        max_len, max_pos = self.scheduler_config.max_model_len, self.model_config.max_position_embeddings
        _require(max_len <= max_pos, "SchedulerConfig", "max_model_len",
                 f"{max_len} exceeds the model's max_position_embeddings ({max_pos})")
        heads, kv_heads = self.model_config.num_attention_heads, self.model_config.num_key_value_heads
        tp = self.parallel_config.tensor_parallel_size
        _require(heads % tp == 0, "ParallelConfig", "tensor_parallel_size",
                 f"{tp} must divide num_attention_heads ({heads})")
        _require(kv_heads % tp == 0 or tp % kv_heads == 0, "ParallelConfig", "tensor_parallel_size",
                 f"{tp} must divide num_key_value_heads ({kv_heads}) or be a multiple of it")

    @property
    def kv_cache_dtype(self) -> str:
        """The resolved KV storage dtype name (`auto` follows the model dtype)."""
        kind = self.cache_config.kv_cache_dtype
        if kind == "auto":
            return self.model_config.dtype
        return "float8_e4m3fn" if kind.startswith("fp8") else kind


def _declared_type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def update_config(config: Any, overrides: Mapping[str, Any]) -> Any:
    """A new record with `overrides` merged in; `config` itself is unchanged.

    Nested dicts merge into nested records; every touched record is rebuilt with
    `dataclasses.replace`, so its validation runs again.

    Raises:
        ValueError: an unknown section or field (the message lists the valid ones), or a
            value the record's validation rejects.
    """
    return _merge(config, overrides, path="")


def _merge(record: Any, overrides: Mapping[str, Any], path: str) -> Any:
    kind = "section" if not path else "field"
    where = f" of {path.rstrip('.')}" if path else ""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"overrides{where} must be a dict, got {type(overrides).__name__}")
    fields = {f.name: f for f in dataclasses.fields(record)}
    hints = typing.get_type_hints(type(record))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown config {kind} {path}{key!r}; valid {kind}s{where}: "
                             f"{', '.join(sorted(fields))}")
        current = getattr(record, key)
        nested_type = _record_type(hints[key])
        if isinstance(value, Mapping) and nested_type is not None:
            if current is None:  # e.g. switching rope scaling on: build the record from the dict
                try:
                    value = nested_type(**value)
                except TypeError as e:
                    raise ValueError(f"{path}{key}: {e}") from e
            else:
                value = _merge(current, value, f"{path}{key}.")
        elif _is_tuple_field(hints[key]) and isinstance(value, Sequence) and not isinstance(value, str):
            value = tuple(value)  # JSON-style lists stay hashable
        changes[key] = value
    return dataclasses.replace(record, **changes)


def _is_tuple_field(hint: Any) -> bool:
    """Whether a field's hint is a tuple (`tuple[int, ...]`, `tuple[str, ...] | None`)."""
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return any(typing.get_origin(c) is tuple for c in candidates)


def _record_type(hint: Any) -> type | None:
    """The dataclass type inside a hint such as `RopeScaling | None`, if any."""
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for c in candidates:
        if dataclasses.is_dataclass(c):
            return c
    return None


SECTIONS = ("model_config", "load_config", "cache_config", "scheduler_config", "parallel_config",
            "sampler_config")


def changed_fields(old: RunnerConfig, new: RunnerConfig) -> list[tuple[str, Effect]]:
    """`(section.field, effect)` of every field whose value differs between two records."""
    changed = []
    for section in SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(before):
            if getattr(before, f.name) != getattr(after, f.name):
                changed.append((f"{section}.{f.name}", f.metadata["effect"]))
    return changed


def describe_effects() -> str:
    """A Markdown table: every field and what changing it costs a running runner."""
    rows = ["| field | on change | meaning |", "| --- | --- | --- |"]
    for section in SECTIONS:
        for f in dataclasses.fields(typing.get_type_hints(RunnerConfig)[section]):
            rows.append(f"| {section}.{f.name} | {f.metadata['effect'].value} | {f.metadata['doc']} |")
    return "\n".join(rows)
