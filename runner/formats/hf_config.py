"""Hugging Face `config.json` to `ModelConfig` and back, with each family's quirks.

A field this runner does not implement is refused by name here, never served
approximately; what transformers defaults when config.json omits a field is defaulted
the same way.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.formats.files import MAX_JSON_BYTES, parse_json, read_regular_file
from state.config import (GEMMA_ARCHITECTURES, MOE_ARCHITECTURES, SUPPORTED_ARCHITECTURES, ModelConfig, MoeConfig,
                          RopeScaling, is_int)

# Architecture -> HF `model_type`. Every family is the one llama-like core with flags:
# q/k norm (Qwen3, Qwen3-MoE), q/k/v biases (Qwen2), experts (Qwen3-MoE, Mixtral), fused
# checkpoint tensors (Phi-3, split at load time by models/checkpoint.py).
MODEL_TYPES = {
    "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral", "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral", "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
}
assert tuple(MODEL_TYPES) == SUPPORTED_ARCHITECTURES, "every served architecture has its HF model_type"


def model_config_from_folder(path: str | Path, dtype: str = "auto",
                             overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """Read a Hugging Face `config.json` (with `overrides` merged over its top-level
    keys, like vLLM's `hf_overrides`); refuse any feature this runner does not implement."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist or is not a folder: "
                                "expected a Hugging Face model folder holding config.json")
    config_file = Path(path) / "config.json"
    if not os.path.lexists(config_file):
        raise FileNotFoundError(f"no config.json in {str(path)!r}: expected a Hugging Face model folder")
    data = read_regular_file(config_file, MAX_JSON_BYTES)
    try:
        hf = parse_json(data)
    except ValueError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(hf).__name__}")
    return model_config_from_hf({**hf, **(overrides or {})}, model=str(path), dtype=dtype)

def model_config_from_hf(hf: Mapping[str, Any], *, model: str | None = None,
                         dtype: str = "auto") -> ModelConfig:
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        remote = (" (its config.json names custom code in auto_map, which this runner never runs, "
                  "trust_remote_code or not)" if "auto_map" in hf else "")
        raise ValueError(f"unsupported architectures {archs!r}{remote}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    _reject_unimplemented(hf, archs[0])
    try:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        rope, local_theta = _rope_sections(hf, archs[0])
        if dtype == "auto":
            dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        # Derived only from valid sizes; otherwise the record's validation names the bad one.
        derived_head_dim = hidden // heads if is_int(hidden) and is_int(heads) and heads > 0 else None
        return ModelConfig(
            architecture=archs[0],
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or derived_head_dim,
            # Not bool(): the string "false" is truthy and would tie the embeddings.
            tie_word_embeddings=hf.get("tie_word_embeddings", archs[0] in GEMMA_ARCHITECTURES),
            dtype=dtype,
            rms_norm_eps=_hf_float(hf, "rms_norm_eps", 1e-6),
            rope_theta=_hf_float(rope, "rope_theta", _hf_float(
                hf, "rope_theta", 1e6 if archs[0] == "Gemma3ForCausalLM" else 10000.0)),
            rope_scaling=_rope_scaling(rope),
            rope_linear_factor=_rope_linear(rope),
            rope_local_theta=local_theta,
            layer_types=_layer_types(hf, archs[0]),
            **_gemma_fields(hf, archs[0]),
            # Qwen2's config has no such field: its q/k/v projections always carry biases.
            attention_bias=archs[0] == "Qwen2ForCausalLM",
            sliding_window=_sliding_window(hf, archs[0]),
            moe=_moe(hf, archs[0]),
            model=model,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            initializer_range=_hf_float(hf, "initializer_range", 0.02),
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks the required field {e.args[0]!r}") from e

def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` of this architecture (for export)."""
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    if cfg.rope_linear_factor is not None:
        rope = {**rope, "rope_type": "linear", "factor": cfg.rope_linear_factor}
    if cfg.rope_local_theta is not None:  # Gemma 3: per layer type
        rope = {"full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}}
    eos: int | list[int] | None = (None if not cfg.eos_token_ids else
                                   cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1
                                   else list(cfg.eos_token_ids))
    return {
        **_moe_hf_dict(cfg),
        "architectures": [cfg.architecture],
        "model_type": MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "hidden_activation": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": None,  # Phi-3's config class would default it to 32000, past small vocabularies
        "initializer_range": cfg.initializer_range,
        "attention_bias": cfg.attention_bias,
        "sliding_window": cfg.sliding_window,
        "use_sliding_window": cfg.sliding_window is not None,
        **({} if cfg.layer_types is None else {"layer_types": list(cfg.layer_types)}),
        **({} if not cfg.gemma else {
            # transformers types it int
            "query_pre_attn_scalar": (int(cfg.query_pre_attn_scalar) if cfg.query_pre_attn_scalar is not None
                                      and float(cfg.query_pre_attn_scalar).is_integer()
                                      else cfg.query_pre_attn_scalar),
            "attn_logit_softcapping": cfg.attn_logit_softcapping,
            "final_logit_softcapping": cfg.final_logit_softcapping}),
        "dtype": cfg.dtype,
        "torch_dtype": cfg.dtype,  # the key transformers 4.x reads
    }


def _reject_unimplemented(hf: Mapping[str, Any], architecture: str) -> None:
    """Fail on config features that would silently change the model if ignored."""
    problems = []
    if architecture in GEMMA_ARCHITECTURES:
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            problems.append(f"hidden_activation={act!r} (only 'gelu_pytorch_tanh')")
        if hf.get("use_bidirectional_attention"):
            problems.append("use_bidirectional_attention=true")
        if architecture == "Gemma3ForCausalLM" and hf.get("attn_logit_softcapping") is not None:
            # transformers' Gemma 3 reads the field but never caps its scores: ambiguous.
            problems.append("attn_logit_softcapping on Gemma 3 (transformers does not apply it)")
    elif hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu')")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true")
    # Llama's (and Qwen3's, Mistral's) attention_bias also puts a bias on o_proj; Qwen2's
    # q/k/v biases are built in.
    if hf.get("attention_bias") and architecture != "Qwen2ForCausalLM":
        problems.append("attention_bias=true")
    layer_types = hf.get("layer_types") or []
    # The layer types served: sliding layers attend within `sliding_window`
    # (`ModelConfig.window`), full ones over every earlier position; others are refused.
    if not isinstance(layer_types, list):
        problems.append(f"layer_types={layer_types!r} (expected a list of 'full_attention')")
    elif any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        problems.append(f"layer_types other than 'full_attention': {sorted(set(map(str, layer_types)))}")
    rope = hf.get("rope_parameters")
    rope_fraction = rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None
    if _default(hf.get("partial_rotary_factor"), _default(rope_fraction, 1.0)) != 1.0:
        problems.append("partial_rotary_factor other than 1.0")
    if hf.get("router_jitter_noise"):
        problems.append(f"router_jitter_noise={hf['router_jitter_noise']!r} (only 0)")
    if problems:
        raise ValueError("config.json uses features this runner does not implement: " + "; ".join(problems))


def _default(value: Any, default: Any) -> Any:
    """`value`, or `default` where config.json leaves it out or writes null."""
    return default if value is None else value


def _sliding_window(hf: Mapping[str, Any], architecture: str) -> int | None:
    """The attention window the checkpoint uses, None for full attention.

    Qwen2 and Qwen3 carry a `sliding_window` they use only with `use_sliding_window`;
    Mistral, Mixtral and Phi-3 use theirs whenever it is set; Gemma always (4096 unless set).
    """
    if architecture in GEMMA_ARCHITECTURES:
        return hf.get("sliding_window", 4096)
    flag = hf.get("use_sliding_window")
    if flag is False or (flag is None and "use_sliding_window" in hf):
        return None
    return hf.get("sliding_window")


def _layer_types(hf: Mapping[str, Any], architecture: str) -> tuple[str, ...] | None:
    """Which layers use the window, as transformers derives them: `layer_types` when
    config.json has it; else Qwen2/Qwen3 slide from layer `max_window_layers` on, Gemma 2
    alternates (even layers slide), Gemma 3 makes every `sliding_window_pattern`-th layer
    (default 6) global. The other families window every layer (None) when they have a window."""
    if (architecture not in GEMMA_ARCHITECTURES + ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
            or _sliding_window(hf, architecture) is None):
        return None
    n = hf.get("num_hidden_layers")
    if isinstance(hf.get("layer_types"), list):
        return tuple(hf["layer_types"])
    if not is_int(n):
        return None  # the record's validation names the bad layer count
    if architecture in GEMMA_ARCHITECTURES:
        pattern = 2 if architecture == "Gemma2ForCausalLM" else hf.get("sliding_window_pattern", 6)
        if not is_int(pattern) or pattern <= 0:
            raise ValueError(f"config.json field 'sliding_window_pattern': expected a positive int, got {pattern!r}")
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n))
    first = hf.get("max_window_layers", 28)
    if not is_int(first):
        raise ValueError(f"config.json field 'max_window_layers': expected an int, got {first!r}")
    return tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))


def _rope_sections(hf: Mapping[str, Any], architecture: str) -> tuple[Mapping[str, Any], float | None]:
    """(RoPE parameters of the global layers, RoPE base of the local ones or None).

    Gemma 3 gives its sliding layers their own unscaled RoPE: transformers 5 writes
    `rope_parameters` per layer type, older configs `rope_local_base_freq` (default 10000).
    """
    params = hf.get("rope_parameters")
    rope = params or hf.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"config.json field 'rope_parameters'/'rope_scaling': expected an object, got {rope!r}")
    if architecture != "Gemma3ForCausalLM":
        return rope, None
    if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
        rope, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        if not isinstance(rope, Mapping) or not isinstance(local, Mapping):
            raise ValueError(f"config.json field 'rope_parameters': expected objects per layer type, got {params!r}")
        if _rope_kind(local) != "default":
            raise ValueError(f"unsupported rope scaling type {_rope_kind(local)!r} on sliding_attention layers; "
                             "supported there: 'default'")
        return rope, _hf_float(local, "rope_theta", 10000.0, "rope_parameters.sliding_attention")
    return rope, _hf_float(hf, "rope_local_base_freq", 10000.0)


def _gemma_fields(hf: Mapping[str, Any], architecture: str) -> dict[str, Any]:
    """Gemma's activation, attention scale and soft-caps (transformers' defaults where
    config.json leaves a field out; null turns a cap off)."""
    if architecture not in GEMMA_ARCHITECTURES:
        return {}
    gemma2 = architecture == "Gemma2ForCausalLM"

    def number(key: str, default: float | None) -> float | None:
        value = hf.get(key, default)
        return None if value is None else _hf_float(hf, key, default)

    return dict(hidden_act=hf.get("hidden_activation") or "gelu_pytorch_tanh",
                query_pre_attn_scalar=number("query_pre_attn_scalar", 256.0),
                attn_logit_softcapping=number("attn_logit_softcapping", 50.0 if gemma2 else None),
                final_logit_softcapping=number("final_logit_softcapping", 30.0 if gemma2 else None))


def _moe(hf: Mapping[str, Any], architecture: str) -> MoeConfig | None:
    """Qwen3-MoE's and Mixtral's expert fields (transformers 5 writes `num_local_experts`
    for both; Qwen3-MoE checkpoints of 4.x say `num_experts`)."""
    if architecture not in MOE_ARCHITECTURES:
        return None
    is_mixtral = architecture == "MixtralForCausalLM"
    return MoeConfig(
        num_experts=hf.get("num_local_experts") or hf.get("num_experts"),
        num_experts_per_tok=hf.get("num_experts_per_tok"),
        intermediate_size=hf["intermediate_size"] if is_mixtral else hf.get("moe_intermediate_size"),
        # Mixtral always renormalises the top-k weights.
        norm_topk_prob=True if is_mixtral else hf.get("norm_topk_prob", False),
        decoder_sparse_step=hf.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
    )


def _moe_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The expert fields of `config.json` (none for dense families)."""
    if cfg.moe is None:
        return {}
    m = cfg.moe
    fields = {"num_local_experts": m.num_experts, "num_experts": m.num_experts,
              "num_experts_per_tok": m.num_experts_per_tok}
    if cfg.architecture == "MixtralForCausalLM":
        return fields
    return {**fields, "moe_intermediate_size": m.intermediate_size, "norm_topk_prob": m.norm_topk_prob,
            "decoder_sparse_step": m.decoder_sparse_step, "mlp_only_layers": list(m.mlp_only_layers)}


def _rope_kind(rope: Mapping[str, Any]) -> str:
    kind = rope.get("rope_type", rope.get("type", "default"))
    return "default" if kind is None else kind


def _rope_linear(rope: Mapping[str, Any]) -> float | None:
    if _rope_kind(rope) != "linear":
        return None
    factor = _hf_float(rope, "factor", None, "rope_parameters")
    if factor is None:
        raise ValueError("linear rope scaling lacks 'factor'")
    return factor


def _rope_scaling(rope: Mapping[str, Any]) -> RopeScaling | None:
    kind = _rope_kind(rope)
    if kind in ("default", "linear"):
        return None
    if kind != "llama3":
        # Phi-3's longrope (alias su) rescales per frequency with two tables: not implemented.
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: 'default', 'linear', 'llama3'")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if rope.get(k) is None]
    if missing:
        raise ValueError(f"llama3 rope scaling lacks {missing[0]!r}")
    length = rope["original_max_position_embeddings"]
    if isinstance(length, float) and length.is_integer():
        length = int(length)  # e.g. 8192.0 written by a float-only exporter
    return RopeScaling(
        factor=_hf_float(rope, "factor", None, "rope_parameters"),
        low_freq_factor=_hf_float(rope, "low_freq_factor", None, "rope_parameters"),
        high_freq_factor=_hf_float(rope, "high_freq_factor", None, "rope_parameters"),
        original_max_position_embeddings=length,
    )


def _hf_float(hf: Mapping[str, Any], key: str, default: Any, section: str = "") -> Any:
    """`hf[key]` as a float (`default` when absent or null), or a ValueError naming the field."""
    value = hf.get(key)
    if value is None:
        return default
    name = f"{section}.{key}" if section else key
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json field {name!r}: expected a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"config.json field {name!r}: expected a finite number, got {value!r}") from None
