"""The families beside Llama and Qwen3: batching, sliding windows longer prompts than
the window, refusals, experts under tensor parallelism, the weight lifecycle, and the
Hugging Face export.

Logit and greedy parity with transformers for every family runs in test_hf_parity.py
(its parametrisation covers every variant of tests/hf_models.py).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from runner.formats.hf_config import model_config_from_folder, model_config_from_hf
from runner import LLM, SamplingParams
from runner.formats.bridge import save_pretrained
from runner.device.loader import params_from_checkpoint
from runner.formats.param_tree import CheckpointError
from runner.formats.safetensors_io import iter_safetensors
from state.config import ModelConfig
from tests.hf_models import FAMILY_VARIANTS, LLM_ARGS, hf_greedy
from tests.e2e.test_tensor_parallel import assert_same_outputs, run_worker

PROMPTS = [[5, 17, 42, 8, 91, 33, 60, 7, 12, 77, 3, 50, 29], [9, 9, 4], [31, 2, 64, 11, 5, 80, 1]]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def leaves(llm: LLM) -> dict[str, np.ndarray]:
    from state.params import leaf_paths

    params = llm.runner.params
    return {p: np.asarray(x) for p, x in zip(leaf_paths(params), jax.tree.leaves(params))}


@pytest.mark.parametrize("name", FAMILY_VARIANTS)
def test_a_batch_of_mixed_lengths_equals_each_prompt_alone(name, hf_checkpoint):
    llm = LLM(str(hf_checkpoint(name)[0]), **LLM_ARGS)
    together = tokens(llm, PROMPTS)
    llm.reset_prefix_cache()
    assert together == [tokens(llm, [p])[0] for p in PROMPTS]


def test_qwen2_reads_its_biases_and_refuses_a_checkpoint_without_them(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen2_gqa")
    cfg = model_config_from_folder(folder)
    assert cfg.attention_bias and not cfg.qk_norm
    assert LLM(str(folder), **LLM_ARGS).runner.params.layers[0].bq.shape == (4 * 12,)
    # A Qwen2 checkpoint whose biases are missing is incomplete, never served without them.
    named = [(n, a) for n, a in iter_safetensors(folder) if not n.endswith("q_proj.bias")]
    with pytest.raises(CheckpointError, match=r"lacks 2 tensor\(s\) the model needs: layers\.0\.bq "):
        params_from_checkpoint(named, cfg)
    # A Llama-shaped model has no bias leaves: a bias in its checkpoint is unexpected.
    llama = model_config_from_folder(hf_checkpoint("llama_tied_mha")[0])
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        params_from_checkpoint([("model.layers.0.self_attn.q_proj.bias", named[0][1])], llama)


# -- sliding windows: prompts longer than the window -----------------------------------------

WINDOWED = ["gemma2_gqa", "gemma2_mqa_untied", "gemma3_gqa", "gemma3_mqa_capped", "mistral_window8",
            "qwen2_window8"]
LONG = [int(t) for t in np.random.default_rng(3).integers(3, 97, 40)]  # 40 tokens, window 8


@pytest.mark.parametrize("name", WINDOWED)
def test_a_prompt_longer_than_the_window_matches_transformers(name, hf_checkpoint):
    folder, hf = hf_checkpoint(name)
    llm = LLM(str(folder), **LLM_ARGS)
    ours = llm.forward_tokens(LONG)
    with torch.no_grad():
        ref = hf(torch.tensor([LONG])).logits[0].numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"{name}: max |logit diff| over a 40-token prompt {diff:.2e}")
    assert diff < 1e-4
    out = llm.generate([{"prompt_token_ids": LONG}], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert out == hf_greedy(hf, LONG, 32)


@pytest.mark.parametrize("name", ["gemma2_gqa", "qwen2_window8"])
def test_long_and_short_prompts_batched_equal_each_alone(name, hf_checkpoint):
    llm = LLM(str(hf_checkpoint(name)[0]), **LLM_ARGS)
    prompts = [LONG, PROMPTS[1], LONG[5:30], PROMPTS[0]]
    together = tokens(llm, prompts)
    llm.reset_prefix_cache()
    assert together == [tokens(llm, [p])[0] for p in prompts]


def test_the_pallas_backend_serves_windows_and_caps_as_the_reference(hf_checkpoint):
    # On a CPU the Pallas decode kernel runs interpreted: it serves the global layers,
    # the tiled path the windowed (and capped) ones.
    folder = str(hf_checkpoint("gemma2_gqa")[0])
    prompts = [LONG, PROMPTS[1]]
    reference = tokens(LLM(folder, **LLM_ARGS), prompts)
    assert tokens(LLM(folder, attention_backend="pallas", **LLM_ARGS), prompts) == reference


# -- what the families do not implement ------------------------------------------------------

def write_config(folder, name: str, hf_checkpoint, **changes) -> str:
    """A copy of a variant's folder with config.json fields changed."""
    source = hf_checkpoint(name)[0]
    folder.mkdir()
    config = {**json.loads((source / "config.json").read_text()), **changes}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    return str(folder)


def test_qwen2_without_use_sliding_window_ignores_its_window(tmp_path, hf_checkpoint):
    folder = write_config(tmp_path / "m", "qwen2_gqa", hf_checkpoint, use_sliding_window=False, sliding_window=32)
    assert LLM(folder, **LLM_ARGS).config.model_config.sliding_window is None


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0],
                           "long_factor": [1.0]}), "unsupported rope scaling type 'longrope'"),
    (dict(rope_scaling={"type": "su", "short_factor": [1.0], "long_factor": [1.0]}),
     "unsupported rope scaling type 'su'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor other than 1.0"),
])
def test_phi3_rope_variants_are_refused(tmp_path, hf_checkpoint, changes, message):
    folder = write_config(tmp_path / "m", "phi3_gqa", hf_checkpoint, **changes)
    config = {k: v for k, v in json.loads((tmp_path / "m" / "config.json").read_text()).items()
              if not (k == "rope_parameters" and "rope_scaling" in changes)}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        model_config_from_folder(folder)


def test_a_llama_attention_bias_is_refused(tmp_path, hf_checkpoint):
    # Llama's attention_bias also biases o_proj, which the shared core does not have.
    folder = write_config(tmp_path / "m", "llama_tied_mha", hf_checkpoint, attention_bias=True)
    with pytest.raises(ValueError, match=r"features this runner does not implement: attention_bias=true"):
        model_config_from_folder(folder)


@pytest.mark.parametrize("name, changes, message", [
    ("gemma3_gqa", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping on Gemma 3"),
    ("gemma2_gqa", dict(hidden_activation="gelu"), "hidden_activation='gelu' \\(only 'gelu_pytorch_tanh'\\)"),
    ("gemma3_gqa", dict(use_bidirectional_attention=True), "use_bidirectional_attention=true"),
    ("gemma2_gqa", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}),
     "unsupported rope scaling type 'yarn'"),
    ("gemma3_gqa", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "unsupported rope scaling type 'linear' on sliding_attention layers"),
    ("gemma2_gqa", dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     "layer_types other than"),
    ("gemma2_gqa", dict(attention_bias=True), "attention_bias=true"),
    ("mistral_window8", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}),
     "linear rope scaling lacks 'factor'"),
])
def test_gemma_fields_it_does_not_implement_are_refused(tmp_path, hf_checkpoint, name, changes, message):
    folder = write_config(tmp_path / "m", name, hf_checkpoint, **changes)
    with pytest.raises(ValueError, match=message):
        model_config_from_folder(folder)


def test_gemma_defaults_follow_transformers(tmp_path, hf_checkpoint):
    # Fields a Gemma 2 config.json leaves out take transformers' defaults; null turns a cap off.
    source = json.loads((hf_checkpoint("gemma2_gqa")[0] / "config.json").read_text())
    hf = {k: v for k, v in source.items() if k not in ("attn_logit_softcapping", "query_pre_attn_scalar",
                                                       "layer_types", "sliding_window")}
    cfg = model_config_from_hf({**hf, "final_logit_softcapping": None})
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping, cfg.query_pre_attn_scalar) == (50.0, None, 256.0)
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert cfg.sliding_window == 4096 and [cfg.window(i) for i in range(3)] == [4096, None, 4096]
    gemma3 = {k: v for k, v in json.loads((hf_checkpoint("gemma3_gqa")[0] / "config.json").read_text()).items()
              if k not in ("layer_types", "rope_parameters")}
    cfg3 = model_config_from_hf({**gemma3, "num_hidden_layers": 7, "rope_local_base_freq": 500.0})
    assert cfg3.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (cfg3.rope_theta, cfg3.rope_local_theta, cfg3.rope_linear_factor) == (1e6, 500.0, None)


def test_the_flax_training_model_refuses_gemma(hf_checkpoint):
    from flax import nnx

    from models.flax_llama import CausalLM

    cfg = model_config_from_folder(hf_checkpoint("gemma2_gqa")[0])
    with pytest.raises(ValueError, match="the Flax NNX training model does not implement Gemma2ForCausalLM"):
        CausalLM(cfg, nnx.Rngs(0))


def test_router_jitter_is_refused(tmp_path, hf_checkpoint):
    folder = write_config(tmp_path / "m", "mixtral_gqa", hf_checkpoint, router_jitter_noise=0.1)
    with pytest.raises(ValueError, match=r"router_jitter_noise=0.1 \(only 0\)"):
        model_config_from_folder(folder)


# -- checkpoints of the wrong shape --------------------------------------------------------------

def rewrite_tensors(tmp_path, name: str, hf_checkpoint, edit) -> str:
    source = hf_checkpoint(name)[0]
    folder = tmp_path / "m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((source / "config.json").read_text())
    save_file(edit(load_file(source / "model.safetensors")), folder / "model.safetensors")
    return str(folder)


def test_a_missing_or_misshapen_expert_is_named(tmp_path, hf_checkpoint):
    expert = "model.layers.0.mlp.experts.3.up_proj.weight"
    folder = rewrite_tensors(tmp_path, "qwen3_moe_gqa", hf_checkpoint,
                             lambda t: {k: v for k, v in t.items() if k != expert})
    with pytest.raises(CheckpointError, match=r"checkpoint lacks experts \[3\] of 'layers.0.moe_up' \(it has 4 of 5"):
        LLM(folder, **LLM_ARGS)
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.experts.3.up_proj.weight' has shape "
                                              r"\(28, 39\); expected \(28, 40\)"):
        LLM(rewrite_tensors(tmp_path / "b", "qwen3_moe_gqa", hf_checkpoint,
                            lambda t: {**t, expert: t[expert][:, :39].copy()}), **LLM_ARGS)


def test_a_dense_mlp_name_in_a_sparse_layer_is_refused(tmp_path, hf_checkpoint):
    # Layer 1 of this variant is dense (mlp_only_layers), layer 0 sparse.
    extra = "model.layers.0.mlp.gate_proj.weight"
    folder = rewrite_tensors(tmp_path, "qwen3_moe_gqa", hf_checkpoint,
                             lambda t: {**t, extra: t["model.layers.1.mlp.gate_proj.weight"]})
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{extra}'"):
        LLM(folder, **LLM_ARGS)


def test_a_fused_phi3_tensor_of_the_wrong_height_is_named(tmp_path, hf_checkpoint):
    name = "model.layers.1.self_attn.qkv_proj.weight"
    folder = rewrite_tensors(tmp_path, "phi3_gqa", hf_checkpoint, lambda t: {**t, name: t[name][:-1].copy()})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \(95, 40\); expected \(96, 40\) "
                                              r"\(the rows of layers.1.wq, layers.1.wk, layers.1.wv stacked\)"):
        LLM(folder, **LLM_ARGS)
    # Phi-3 has only the fused spelling: a separate q_proj is not one of its tensors.
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{q}'"):
        LLM(rewrite_tensors(tmp_path / "b", "phi3_gqa", hf_checkpoint, lambda t: {**t, q: np.zeros((48, 40), np.float32)}),
            **LLM_ARGS)


# -- experts under tensor parallelism -------------------------------------------------------------

def test_moe_tensor_parallel_outputs_match_one_device(hf_checkpoint, tmp_path):
    folder = str(hf_checkpoint("qwen3_moe_heads8")[0])
    runs = [{"name": "moe", "folder": folder, "tp": tp} for tp in (1, 2, 4)]
    out = {r["tp"]: r for r in run_worker("parity", {"runs": runs}, tmp_path, devices=4, timeout=300)["runs"]}
    for tp in (2, 4):
        assert_same_outputs(out[tp]["outputs"], out[1]["outputs"], f"qwen3_moe tp={tp}")
        specs = out[tp]["param_specs"]
        # Eight experts split 2 and 4 ways; the router is replicated.
        assert {specs[f"layers.{i}.{leaf}"][0] for i in (0, 1) for leaf in ("moe_gate", "moe_up", "moe_down")} == {"model"}
        assert specs["layers.0.router"] == []
        assert out[tp]["compiles_after_warmup"] == 0 and out[tp]["placed_as_recorded"]


# -- the weight lifecycle -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixtral_gqa", "qwen2_mqa_tied", "gemma3_gqa"])
def test_dummy_then_reload_equals_a_fresh_load_and_survives_sleep(name, hf_checkpoint):
    folder = str(hf_checkpoint(name)[0])
    fresh = LLM(folder, **LLM_ARGS)
    expected = tokens(fresh, PROMPTS)
    llm = LLM(folder, load_format="dummy", **LLM_ARGS)
    assert not np.array_equal(leaves(llm)["layers.0.wq"], leaves(fresh)["layers.0.wq"])
    llm.update_config({"load_config": {"load_format": "auto"}})
    llm.reload_weights()
    real = leaves(fresh)
    for path, array in leaves(llm).items():
        np.testing.assert_array_equal(array, real[path], err_msg=path)
    assert tokens(llm, PROMPTS) == expected
    llm.sleep(level=2)
    llm.wake_up(["weights"])
    llm.reload_weights()
    llm.wake_up(["kv_cache"])
    assert tokens(llm, PROMPTS) == expected


# -- export to Hugging Face ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2_gqa", "qwen3_moe_gqa", "mixtral_gqa", "phi3_gqa", "gemma2_gqa",
                                  "gemma3_mqa_capped", "qwen2_window8"])
def test_export_round_trip_loads_in_transformers_with_the_same_logits(name, hf_checkpoint, tmp_path):
    source, hf = hf_checkpoint(name)
    llm = LLM(str(source), **LLM_ARGS)
    out = save_pretrained(tmp_path / "export", llm.runner.params, llm.config.model_config)
    assert sorted(load_file(out / "model.safetensors")) == sorted(load_file(source / "model.safetensors"))
    # Eager attention: the implementation that soft-caps Gemma 2's scores.
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.tensor([LONG])
    with torch.no_grad():
        np.testing.assert_allclose(exported(ids).logits.numpy(), hf(ids).logits.numpy(), atol=1e-5)
    assert tokens(LLM(str(out), **LLM_ARGS), PROMPTS) == tokens(llm, PROMPTS)


@pytest.mark.parametrize("name", ["qwen2_gqa", "qwen3_moe_gqa", "mixtral_gqa", "qwen2_window8"])
def test_flax_training_model_exports_to_transformers_with_its_logits(name, hf_checkpoint, tmp_path):
    from flax import nnx

    from models.flax_llama import CausalLM
    from runner.formats.bridge import params_from_flax

    cfg = model_config_from_folder(hf_checkpoint(name)[0])
    model = CausalLM(cfg, nnx.Rngs(0))
    # Random values everywhere (biases start at zero): every leaf's route to the export counts.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    out = save_pretrained(tmp_path / "export", params_from_flax(model, cfg), cfg)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.array([LONG])  # longer than qwen2_window8's window
    with torch.no_grad():
        ref = exported(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4)


def test_expert_fields_are_validated():
    from state.config import MoeConfig

    with pytest.raises(ValueError, match=r"MoeConfig.num_experts_per_tok: 3 exceeds num_experts \(2\)"):
        MoeConfig(num_experts=2, num_experts_per_tok=3, intermediate_size=8, norm_topk_prob=False)
    fields = dict(vocab_size=32, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=4)
    with pytest.raises(ValueError, match=r"ModelConfig.moe: MixtralForCausalLM needs moe set, got None"):
        ModelConfig(architecture="MixtralForCausalLM", **fields)
    moe = MoeConfig(num_experts=4, num_experts_per_tok=2, intermediate_size=8, norm_topk_prob=False,
                    decoder_sparse_step=2, mlp_only_layers=(3,))
    assert [moe.is_sparse(i) for i in range(6)] == [False, True, False, False, False, True]
