"""Training-to-serving bridge: a Flax-trained tree served from memory, orbax, an HF export
and transformers, all with the same greedy tokens."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from models.flax_llama import CausalLM, next_token_loss
from runner import LLM, SamplingParams
from runner.formats.bridge import (FLAX_NAME_MAP, cast_params, flax_from_params, params_from_flax, params_from_named,
                                   save_pretrained)
from runner.formats.orbax_io import save_params
from runner.formats.param_tree import CheckpointError
from state import ModelConfig
from state.params import leaf_paths

CFG = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=67, hidden_size=40, intermediate_size=72,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  tie_word_embeddings=True, max_position_embeddings=128, initializer_range=0.2)
PROMPTS = [[3, 14, 15, 9, 2, 6], [5, 3, 5]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _trained(cfg: ModelConfig) -> CausalLM:
    """A few optimiser steps on a repeating sequence, so the weights are no longer the init."""
    model = CausalLM(cfg, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        grads = nnx.grad(next_token_loss)(model, batch)
        optimizer.update(model, grads)

    data = np.tile(np.arange(1, 17, dtype=np.int32), (4, 3))
    for _ in range(5):
        step(model, optimizer, data)
    return model


def _tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("architecture, tied", [("Qwen3ForCausalLM", True), ("Qwen3ForCausalLM", False),
                                                ("Qwen2ForCausalLM", True), ("MistralForCausalLM", False)])
def test_memory_orbax_hf_export_and_transformers_agree(tmp_path, architecture, tied):
    import dataclasses
    cfg = dataclasses.replace(CFG, architecture=architecture, tie_word_embeddings=tied,
                              attention_bias=architecture == "Qwen2ForCausalLM")
    model = _trained(cfg)
    params = params_from_flax(model, cfg)
    from_memory = _tokens(LLM.from_params(cfg, params, max_model_len=64, num_kv_blocks=32))

    save_params(tmp_path / "orbax", params, cfg)
    from_orbax = _tokens(LLM(str(tmp_path / "orbax"), load_format="orbax", max_model_len=64, num_kv_blocks=32))

    folder = save_pretrained(tmp_path / "hf", params, cfg)
    from_export = _tokens(LLM(str(folder), max_model_len=64, num_kv_blocks=32))

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == architecture
    hf.generation_config.eos_token_id = None
    reference = []
    for p in PROMPTS:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12, pad_token_id=0)
        reference.append(out[0, len(p):].tolist())
        # The exported weights give transformers the Flax model's own logits.
        with torch.no_grad():
            ref_logits = hf(torch.tensor([p])).logits[0].numpy()
        np.testing.assert_allclose(ref_logits, np.asarray(model(np.array([p])))[0], atol=1e-4)
    assert from_memory == from_orbax == from_export == reference


def test_reload_params_from_training_serves_the_update(tmp_path):
    model = CausalLM(CFG, nnx.Rngs(0))
    llm = LLM.from_params(CFG, params_from_flax(model, CFG), max_model_len=64, num_kv_blocks=32)
    before = _tokens(llm)
    trained = _trained(CFG)
    llm.reload_weights(params=params_from_flax(trained, CFG))
    after = _tokens(llm)
    fresh = _tokens(LLM.from_params(CFG, params_from_flax(trained, CFG), max_model_len=64, num_kv_blocks=32))
    assert after == fresh and after != before


def test_name_map_errors_are_explicit():
    model = CausalLM(CFG, nnx.Rngs(0))
    named = dict(params_from_named.__globals__["flax_named_params"](model))
    named.pop("layers.1.mlp.up_proj.kernel")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) the model needs: layers\.1\.w_up "):
        params_from_named(named.items(), CFG, FLAX_NAME_MAP)
    with pytest.raises(CheckpointError, match=r"parameter 'decoder\.kernel' matches no entry"):
        params_from_named([("decoder.kernel", np.zeros(3))], CFG, FLAX_NAME_MAP)


def test_dtype_conversion_is_explicit():
    params = params_from_flax(CausalLM(CFG, nnx.Rngs(0)), CFG)
    half = cast_params(params, "bfloat16")
    assert half.embed.dtype == jax.numpy.bfloat16 and half.layers[0].k_scale.dtype == jax.numpy.float32
    with pytest.raises(CheckpointError, match=r"leaf 'embed' has dtype bfloat16; expected float32"):
        LLM.from_params(CFG, half, max_model_len=64, num_kv_blocks=32)
    import dataclasses
    served = LLM.from_params(dataclasses.replace(CFG, dtype="bfloat16"), half, max_model_len=64,
                             num_kv_blocks=32)
    assert served.runner.params.embed.dtype == jax.numpy.bfloat16


@pytest.mark.parametrize("architecture, tied", [("Qwen3ForCausalLM", True), ("Qwen3ForCausalLM", False),
                                                ("Qwen2ForCausalLM", True)])
def test_flax_from_params_inverts_params_from_flax(architecture, tied):
    import dataclasses
    cfg = dataclasses.replace(CFG, architecture=architecture, tie_word_embeddings=tied,
                              attention_bias=architecture == "Qwen2ForCausalLM")
    model = _trained(cfg)
    params = params_from_flax(model, cfg)
    back = flax_from_params(params, cfg)
    assert isinstance(back, CausalLM)
    # The same arrays, not copies: the round trip is free (KV scales aside: the training
    # model has none, params_from_flax makes them).
    again = params_from_flax(back, cfg)
    pairs = [(a, b) for path, a, b in zip(leaf_paths(params), jax.tree.leaves(params), jax.tree.leaves(again))
             if not path.endswith(("k_scale", "v_scale"))]
    assert pairs and all(a is b for a, b in pairs)
    tokens = np.array(PROMPTS[0])[None]
    np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(model(tokens)))


def test_flax_from_params_gives_the_served_models_logits():
    llm = LLM(max_model_len=64, num_kv_blocks=16)  # the built-in model
    cfg = llm.config.model_config
    model = flax_from_params(llm.runner.params, cfg)
    ids = llm.get_tokenizer().encode("def fibonacci(n):\n    return")
    np.testing.assert_allclose(np.asarray(model(np.array([ids])))[0], llm.forward_tokens(ids), atol=1e-4)


def test_flax_from_params_errors_are_explicit():
    import dataclasses
    params = params_from_flax(CausalLM(CFG, nnx.Rngs(0)), CFG)
    wider = dataclasses.replace(CFG, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"leaf 'layers\.0\.w_gate' has shape \(40, 72\); expected \(40, 80\)"):
        flax_from_params(params, wider)
    no_norm = {k: v for k, v in FLAX_NAME_MAP.items() if "q_norm" not in k}
    with pytest.raises(CheckpointError, match=r"parameter 'layers\.0\.self_attn\.q_norm\.scale' matches no entry"):
        flax_from_params(params, CFG, no_norm)
    to_bias = {**FLAX_NAME_MAP, r"layers\.(\d+)\.self_attn\.q_norm\.scale": "layers.{}.bq"}
    with pytest.raises(CheckpointError, match=r"maps to leaf 'layers\.0\.bq', which the tree does not hold"):
        flax_from_params(params, CFG, to_bias)
    to_k_norm = {**FLAX_NAME_MAP, r"layers\.(\d+)\.self_attn\.q_norm\.scale": "layers.{}.k_norm"}
    with pytest.raises(CheckpointError, match=r"no parameter for leaf/leaves layers\.0\.q_norm, layers\.1\.q_norm"):
        flax_from_params(params, CFG, to_k_norm)
