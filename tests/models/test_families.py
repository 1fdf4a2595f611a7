"""Qwen2 and Mistral as variants of the shared core: what each serves, what each refuses,
and the lifecycle on a Qwen2 model. Logit and greedy parity with transformers for every
family is in test_hf_parity.py (its variants include qwen2_* and mistral_*)."""

from __future__ import annotations

import json
import shutil

import pytest

from runner import LLM, SamplingParams
from runner.loader import params_from_checkpoint
from runner.param_tree import CheckpointError
from runner.safetensors_io import iter_safetensors
from state.config import ModelConfig

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 17, 42, 8, 91, 33], [9, 9, 4]]
ARGS = dict(num_kv_blocks=32, block_size=4, max_model_len=64)


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)]


def with_config(src, dst, **changes) -> str:
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**hf, **changes}))
    return str(dst)


def test_qwen2_reads_its_biases_and_refuses_a_checkpoint_without_them(hf_checkpoint, tmp_path):
    folder, hf = hf_checkpoint("qwen2_tied_gqa2")
    cfg = ModelConfig.from_pretrained(folder)
    assert cfg.attention_bias and not cfg.qk_norm
    llm = LLM(str(folder), **ARGS)
    assert llm.runner.params.layers[0].bq.shape == (4 * 12,)
    # A Qwen2 checkpoint whose biases are missing is incomplete, never served without them.
    named = [(n, a) for n, a in iter_safetensors(folder) if not n.endswith("q_proj.bias")]
    with pytest.raises(CheckpointError, match=r"lacks 2 tensor\(s\) the model needs: layers\.0\.bq "):
        params_from_checkpoint(named, cfg)
    # And a Llama-shaped model has no bias leaves: a bias in its checkpoint is unexpected.
    llama = ModelConfig.from_pretrained(hf_checkpoint("llama_tied_mha")[0])
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        params_from_checkpoint([("model.layers.0.self_attn.q_proj.bias", named[0][1])], llama)


def test_qwen2_dummy_then_reload_equals_a_fresh_load_and_survives_sleep(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen2_untied_mqa")
    expected = tokens(LLM(str(folder), **ARGS))
    llm = LLM(str(folder), load_format="dummy", **ARGS)
    assert tokens(llm) != expected
    llm.update_config({"load_config": {"load_format": "auto"}})
    llm.reload_weights()
    assert tokens(llm) == expected
    llm.sleep(level=2)
    llm.wake_up(["weights"])
    llm.reload_weights()
    llm.wake_up(["kv_cache"])
    assert tokens(llm) == expected


def test_a_qwen2_sliding_window_and_a_llama_attention_bias_are_refused(hf_checkpoint, tmp_path):
    qwen2, _ = hf_checkpoint("qwen2_tied_gqa2")
    with pytest.raises(ValueError, match=r"features this runner does not implement: use_sliding_window=true"):
        LLM(with_config(qwen2, tmp_path / "sw", use_sliding_window=True, sliding_window=8), **ARGS)
    llama, _ = hf_checkpoint("llama_tied_mha")
    with pytest.raises(ValueError, match=r"attention_bias=true"):
        LLM(with_config(llama, tmp_path / "bias", attention_bias=True), **ARGS)


def test_mistral_is_served_only_where_its_window_covers_every_position(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("mistral_gqa3")
    windowed = with_config(folder, tmp_path / "windowed", sliding_window=32)
    with pytest.raises(ValueError, match=r"ModelConfig\.sliding_window: 32 is shorter than max_model_len \(64\): "
                                         r"sliding-window attention is not implemented"):
        LLM(windowed, **ARGS)
    # A window at least max_model_len is full attention: the same tokens as no window.
    assert tokens(LLM(windowed, **{**ARGS, "max_model_len": 32})) == tokens(
        LLM(str(folder), **{**ARGS, "max_model_len": 32}))
