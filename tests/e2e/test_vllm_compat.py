"""The vLLM-compatible surface of `LLM`, item by item, each against a hand-checked value or
transformers' own answer: constructor keywords, chat, `get_tokenizer()`, `Logprob` records,
`SamplingParams` semantics, prompt forms, `min_tokens` against stop strings, incremental
detokenization, and the smaller calls (metrics, reset_prefix_cache, wake_up, collective_rpc)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizerFast

from runner import LLM, CompletionOutput, RequestOutput, SamplingParams, demo
from runner.device.compilation import CompileCounter
from runner.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from runner.inputs import TextPrompt, TokensPrompt
from runner.engine.logprobs import Logprob
from runner.formats.tokenizer import Tokenizer
from runner.device.warmup import WarmupReport
from models.kv_cache import HOST_KV_BUDGET_BYTES, bytes_per_block
from tests import hf_models

BUILTIN = demo.builtin_folder()
CONVERSATION = [{"role": "system", "content": "You are a helpful assistant"},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hello! How can I assist you today?"},
                {"role": "user", "content": "Write a function that adds two numbers."}]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


@pytest.fixture(scope="module")
def hf_tok():
    return AutoTokenizer.from_pretrained(BUILTIN)


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True): transformers 5 returns a BatchEncoding, 4 a list."""
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# -- constructor keywords ------------------------------------------------------------------------

@pytest.mark.parametrize("keyword", [
    {"enforce_eager": True}, {"trust_remote_code": True}, {"tokenizer_mode": "slow"},
    {"tokenizer_mode": "hf"}, {"revision": None}, {"revision": "main"}, {"disable_log_stats": False},
    {"swap_space": 4}, {"compilation_config": {"level": 3}}, {"compilation_config": 3},
    {"distributed_executor_backend": "mp"}, {"quantization": None},
])
def test_accepted_keywords_leave_the_config_unchanged(keyword, llm):
    other = LLM(BUILTIN, **keyword)
    assert other.config == llm.config
    assert _tokens(other.generate("def f(x):", GREEDY, use_tqdm=False)) == \
        _tokens(llm.generate("def f(x):", GREEDY, use_tqdm=False))


@pytest.mark.parametrize("keyword, message", [
    ({"revision": "v1.0"}, r"revision='v1.0' is not supported: only local folders are served"),
    ({"quantization": "awq"}, r"quantization='awq' is not supported: no quantized weight format"),
    ({"distributed_executor_backend": "ray"}, r"distributed_executor_backend='ray' is not supported"),
    ({"tokenizer_mode": "mistral"}, r"tokenizer_mode='mistral' is not supported"),
    ({"max_logprobs": 21}, r"max_logprobs=21 is not supported: the device returns at most 20"),
    ({"max_logprobs": -1}, r"max_logprobs=-1 is not supported"),
])
def test_refused_keywords_name_themselves(keyword, message):
    with pytest.raises(ValueError, match=message):
        LLM(BUILTIN, **keyword)


def test_dtype_takes_vllm_aliases():
    assert LLM(BUILTIN, dtype="float").config.model_config.dtype == "float32"
    assert LLM(BUILTIN, dtype="half", load_format="dummy").config.model_config.dtype == "float16"
    with pytest.raises(ValueError, match="ModelConfig.dtype: unsupported 'double'"):
        LLM(BUILTIN, dtype="double")


def test_unknown_keyword_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) not_a_vllm_option; valid: "):
        LLM(BUILTIN, not_a_vllm_option=1)


def test_gpu_memory_utilization_is_a_fraction_of_the_host_budget(llm):
    for fraction in (0.05, 0.1):
        sized = LLM(BUILTIN, gpu_memory_utilization=fraction)
        per_block = bytes_per_block(sized.config)
        assert per_block == 4 * 2 * 2 * 16 * 64 * 4  # layers, K and V, kv heads, block, head_dim, f32
        assert sized.runner.num_blocks == int(fraction * HOST_KV_BUDGET_BYTES) // per_block
    assert LLM(BUILTIN, gpu_memory_utilization=0.1).runner.num_blocks == 3276
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(BUILTIN, gpu_memory_utilization=1.5)


def test_skip_tokenizer_init(llm):
    bare = LLM(BUILTIN, skip_tokenizer_init=True)
    assert bare.get_tokenizer() is None
    with pytest.raises(ValueError, match=r"prompt 0 is text but there is no tokenizer \(skip_tokenizer_init=True\); "
                                         r"pass token ids \(\{'prompt_token_ids': \[...\]\} or a list of ints\)"):
        bare.generate("def f(x):", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="chat needs a tokenizer"):
        bare.chat(CONVERSATION, GREEDY, use_tqdm=False)
    ids = llm.get_tokenizer().encode("def f(x):")
    out = bare.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    assert out.prompt is None and out.prompt_token_ids == ids
    assert out.outputs[0].text == ""
    assert out.outputs[0].token_ids == llm.generate("def f(x):", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_max_logprobs_bounds_each_request():
    capped = LLM(BUILTIN, max_logprobs=3)
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=rf"prompt 0: SamplingParams.{name}=4 exceeds max_logprobs=3"):
            capped.generate("x = 1", SamplingParams(max_tokens=2, **{name: 4}), use_tqdm=False)
    out = capped.generate("x = 1", SamplingParams(max_tokens=2, logprobs=3, prompt_logprobs=3), use_tqdm=False)[0]
    assert all(3 <= len(entry) <= 4 for entry in out.outputs[0].logprobs)


@pytest.fixture
def folder_with_generation_config(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.3, "top_k": 7, "top_p": 0.8, "max_new_tokens": 5, "do_sample": True,
         "eos_token_id": 0}))
    return folder


def test_generation_config_auto_reads_the_file_and_vllm_ignores_it(folder_with_generation_config):
    auto = LLM(str(folder_with_generation_config))
    params = auto.get_default_sampling_params()
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.3, 7, 0.8, 5)
    assert params.n == 1 and params.min_p == 0.0
    params.max_tokens = 1  # a fresh copy each call
    assert auto.get_default_sampling_params().max_tokens == 5
    out = auto.generate("def f(x):", use_tqdm=False)[0]  # no sampling_params: the folder's defaults
    assert 1 <= len(out.outputs[0].token_ids) <= 5
    assert LLM(str(folder_with_generation_config), generation_config="vllm").get_default_sampling_params() \
        == SamplingParams()


def test_hf_overrides_change_the_model_config(llm):
    assert llm.config.model_config.rope_theta == 10000.0
    theta = LLM(BUILTIN, hf_overrides={"rope_theta": 5e5})
    assert theta.config.model_config.rope_theta == 5e5
    short = LLM(BUILTIN, hf_overrides={"max_position_embeddings": 256})
    assert short.config.model_config.max_position_embeddings == 256
    assert short.config.scheduler_config.max_model_len == 256
    assert json.loads((Path(BUILTIN) / "config.json").read_text())["rope_parameters"]["rope_theta"] == 10000.0
    # A RoPE base 50 times larger moves every position's rotation: the greedy tokens change.
    prompt = "class Stack:\n    def push(self, item):\n        self.items.append(item)\n    def pop(self):"
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert _tokens(theta.generate(prompt, params, use_tqdm=False)) != _tokens(llm.generate(prompt, params,
                                                                                          use_tqdm=False))
    with pytest.raises(ValueError, match=r"hf_overrides=.* is not supported: expected a dict"):
        LLM(BUILTIN, hf_overrides=lambda c: c)


def test_sleep_mode_off_refuses_sleep_and_keeps_serving(llm):
    awake = LLM(BUILTIN, enable_sleep_mode=False)
    before = _tokens(awake.generate("import os\n", GREEDY, use_tqdm=False))
    for level in (1, 2):
        with pytest.raises(RuntimeError, match="sleep mode is not enabled: build the LLM with enable_sleep_mode=True"):
            awake.sleep(level=level)
    assert _tokens(awake.generate("import os\n", GREEDY, use_tqdm=False)) == before


def test_custom_code_model_is_refused(tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(BUILTIN, folder, ignore=shutil.ignore_patterns("__pycache__"))
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["FancyForCausalLM"], model_type="fancy",
                  auto_map={"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    for trust in (False, True):
        with pytest.raises(ValueError, match=r"unsupported architectures \['FancyForCausalLM'\] \(its config.json "
                                             r"names custom code in auto_map, which this runner never runs"):
            LLM(str(folder), trust_remote_code=trust)


# -- chat ----------------------------------------------------------------------------------------

def test_chat_prompt_is_transformers_rendering(llm, hf_tok):
    for add in (True, False):
        conversation = CONVERSATION if add else CONVERSATION[:3]
        out = llm.chat(conversation, GREEDY, use_tqdm=False, add_generation_prompt=add)
        assert len(out) == 1 and isinstance(out[0], RequestOutput)
        expected = _ids(hf_tok.apply_chat_template(conversation, add_generation_prompt=add, tokenize=True))
        assert out[0].prompt_token_ids == expected
        assert out[0].prompt == hf_tok.apply_chat_template(conversation, add_generation_prompt=add, tokenize=False)
        assert out[0].prompt.endswith("# assistant:\n") == add
        assert len(out[0].outputs[0].token_ids) == 6


def test_chat_batch(llm, hf_tok):
    batch = [CONVERSATION, CONVERSATION[1:2], [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}]]
    outs = llm.chat(batch, GREEDY, use_tqdm=False)
    assert len(outs) == 3
    normalised = [CONVERSATION, CONVERSATION[1:2], [{"role": "user", "content": "a\nb"}]]
    for out, conversation in zip(outs, normalised):
        assert out.prompt_token_ids == _ids(hf_tok.apply_chat_template(conversation, add_generation_prompt=True,
                                                                      tokenize=True))
    single = llm.chat(CONVERSATION[1:2], GREEDY, use_tqdm=False)[0]
    assert outs[1].outputs[0].token_ids == single.outputs[0].token_ids


LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                  "[/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
LLAMA_TEXTS = ["Hello world, this is a test of the tokenizer.", "def foo(x):\n    return x * 2\n",
               "[INST] Hi there [/INST] Hello again.", "The quick brown fox jumps over the lazy dog."] * 5


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A Llama-style folder: a tokenizer whose post-processor adds <s>, a template that
    writes {{ bos_token }} itself, and a tiny random Llama sized to its vocabulary."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.train_from_iterator(LLAMA_TEXTS, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            add_bos_token=True)
    hf.chat_template = LLAMA_TEMPLATE
    folder = tmp_path_factory.mktemp("llama_bos")
    hf.save_pretrained(folder)
    model = hf_models.build("llama", vocab_size=len(hf), tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_chat_writes_the_bos_once(llama_folder):
    ref = AutoTokenizer.from_pretrained(str(llama_folder))
    bos = ref.bos_token_id
    assert ref.encode("Hello")[0] == bos  # the post-processor adds a BOS to plain text
    llm = LLM(str(llama_folder), max_model_len=64)
    conversation = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    expected = _ids(ref.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True))
    assert out.prompt_token_ids == expected
    assert out.prompt_token_ids[0] == bos and out.prompt_token_ids.count(bos) == 1
    # The same text as a plain prompt gets the post-processor's BOS on top of the template's.
    plain = llm.generate(out.prompt, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert plain.prompt_token_ids[:2] == [bos, bos]


# -- get_tokenizer() -----------------------------------------------------------------------------

def test_get_tokenizer_calls_match_transformers(llm, hf_tok):
    tok = llm.get_tokenizer()
    assert tok is llm.tokenizer
    text = "def add(a, b):\n    return a + b<|endoftext|>"
    assert tok(text)["input_ids"] == hf_tok(text)["input_ids"]
    assert tok(text).attention_mask == hf_tok(text)["attention_mask"]
    for special in (True, False):
        assert tok.encode(text, add_special_tokens=special) == hf_tok.encode(text, add_special_tokens=special)
    ids = hf_tok.encode(text)
    assert ids[-1] == 0  # <|endoftext|>
    assert tok.decode(ids) == hf_tok.decode(ids) == text  # special tokens kept by default, as transformers
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.batch_decode([ids, ids[:4]]) == hf_tok.batch_decode([ids, ids[:4]])
    assert tok.batch_decode([ids], skip_special_tokens=True) == hf_tok.batch_decode([ids], skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True) == \
        _ids(hf_tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True))
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id", "vocab_size", "all_special_ids"):
        assert getattr(tok, attr) == getattr(hf_tok, attr), attr
    assert (tok.eos_token_id, tok.bos_token_id, tok.vocab_size) == (0, None, 4096)


# -- logprobs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    folder, model = hf_checkpoint("qwen3_tied")
    llm = LLM(str(folder), tokenizer=Tokenizer.byte_level(), max_model_len=64, block_size=16, num_kv_blocks=8,
              max_num_seqs=2, max_num_batched_tokens=32)
    return llm, model


def _torch_logprobs(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def _check_entry(entry: dict, chosen: int, ref_row: np.ndarray, k: int, tok: Tokenizer) -> None:
    keys = list(entry)
    assert keys[0] == chosen
    top = [int(t) for t in np.argsort(-ref_row, kind="stable")[:k]]
    assert [t for t in keys if t != chosen] == [t for t in top if t != chosen]
    assert len(entry) == k + (chosen not in top)
    for token, lp in entry.items():
        assert isinstance(lp, Logprob)
        assert lp.logprob == pytest.approx(ref_row[token], abs=1e-4)
        assert lp.rank == 1 + int(np.sum(ref_row > ref_row[token]))
        assert lp.decoded_token == tok.decode([token])
    for i, t in enumerate(top):
        if t != chosen:
            assert entry[t].rank == i + 1


def test_sampled_and_prompt_logprobs_against_transformers(tiny):
    llm, model = tiny
    tok = llm.get_tokenizer()
    prompt = [5, 17, 33, 8, 61, 40, 12, 77, 3, 29]
    params = SamplingParams(temperature=1.5, seed=11, max_tokens=10, logprobs=3, prompt_logprobs=4, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    completion = out.outputs[0]
    ref = _torch_logprobs(model, prompt + completion.token_ids)

    assert len(completion.logprobs) == len(completion.token_ids) == 10
    ranks = []
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        _check_entry(entry, token, ref[len(prompt) + i - 1], 3, tok)
        ranks.append(entry[token].rank)
    assert max(ranks) > 1  # sampling at temperature 1.5 picked tokens other than the most likely
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in
                                                              zip(completion.token_ids, completion.logprobs)), abs=1e-4)

    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    prompt_ranks = []
    for pos in range(1, len(prompt)):
        _check_entry(out.prompt_logprobs[pos], prompt[pos], ref[pos - 1], 4, tok)
        prompt_ranks.append(out.prompt_logprobs[pos][prompt[pos]].rank)
    assert max(prompt_ranks) > 4  # hand-picked prompt tokens: most fall outside the top 4


def test_logprobs_zero_gives_the_chosen_token_only(tiny):
    llm, model = tiny
    prompt = [9, 4, 50, 21]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=3, logprobs=0,
                                                                    ignore_eos=True), use_tqdm=False)[0]
    ref = _torch_logprobs(model, prompt + out.outputs[0].token_ids)
    for i, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert list(entry) == [token] and entry[token].rank == 1  # greedy: the most likely
        assert token == int(np.argmax(ref[len(prompt) + i - 1]))
    assert out.prompt_logprobs is None


# -- SamplingParams ------------------------------------------------------------------------------

def test_attribute_assignment_after_construction_is_honoured(llm):
    params = SamplingParams(temperature=0, ignore_eos=True)
    params.max_tokens = 3
    out = llm.generate("import sys\n", params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_each_request_keeps_its_own_copy(llm, monkeypatch):
    tok = llm.get_tokenizer()
    plain = llm.generate("def f(x):", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    favourite = plain.token_ids[2]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["never there"],
                            logit_bias={favourite: 3.0})
    reference = params.clone()
    submitted = []
    make = llm.engine.make_requests
    monkeypatch.setattr(llm.engine, "make_requests", lambda ids, p: submitted.append(p) or make(ids, p))
    first = llm.generate("def f(x):", params, use_tqdm=False)[0].outputs[0]
    engine_copy = submitted[0]
    assert engine_copy is not params and engine_copy == params
    assert engine_copy.stop is not params.stop and engine_copy.logit_bias is not params.logit_bias

    params.stop.append(tok.decode(first.token_ids[:3]))  # would stop at once
    params.logit_bias[favourite] = 100.0  # would repeat one token
    assert engine_copy.stop == ["never there"] and engine_copy.logit_bias == {favourite: 3.0}
    second = llm.generate("def f(x):", reference, use_tqdm=False)[0].outputs[0]
    assert second.token_ids == first.token_ids and second.text == first.text
    assert reference.stop == ["never there"] and reference.logit_bias == {favourite: 3.0}
    # The mutated object itself now means something else, and the engine sees it at the next call.
    changed = llm.generate("def f(x):", params, use_tqdm=False)[0].outputs[0]
    assert changed.token_ids != first.token_ids


def test_value_broken_after_construction_is_refused_before_anything_runs(llm):
    params = SamplingParams(temperature=0, max_tokens=4, logit_bias={5: 1.0})
    params.logit_bias[5] = float("nan")
    next_id = llm.engine._next_id
    with pytest.raises(ValueError, match=r"SamplingParams.logit_bias: expected None or a dict of int token id "
                                         r"-> finite number, got \{5: nan\}"):
        llm.generate(["x = 1", "y = 2"], params, use_tqdm=False)
    assert llm.engine._next_id == next_id and not llm.engine.has_unfinished()
    params.n, params.temperature = 2, 0.0
    params.logit_bias = None
    with pytest.raises(ValueError, match=r"SamplingParams.n: expected 1 with temperature=0"):
        llm.generate("x = 1", params, use_tqdm=False)


def test_clone_is_deep():
    params = SamplingParams(temperature=0.5, stop=["a"], logit_bias={1: 2.0}, stop_token_ids=[3], seed=4)
    copy = params.clone()
    assert copy == params and copy is not params
    copy.stop.append("b")
    copy.logit_bias[1] = -1.0
    copy.stop_token_ids.append(9)
    copy.max_tokens = 2
    assert (params.stop, params.logit_bias, params.stop_token_ids, params.max_tokens) == (["a"], {1: 2.0}, [3], 16)


def test_max_tokens_none_generates_to_max_model_len():
    short = LLM(BUILTIN, max_model_len=40)
    out = short.generate("import os\n", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                         use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 40


def test_default_sampling_params_from_the_folder(folder_with_generation_config, llm):
    assert llm.get_default_sampling_params() == SamplingParams()
    params = LLM(str(folder_with_generation_config)).get_default_sampling_params()
    assert params == SamplingParams(temperature=0.3, top_k=7, top_p=0.8, max_tokens=5)


def test_greedy_n_above_one_is_refused():
    with pytest.raises(ValueError, match=r"SamplingParams.n: expected 1 with temperature=0 \(greedy sampling gives "
                                         r"2 identical outputs\), got 2"):
        SamplingParams(n=2, temperature=0)


# -- prompt forms --------------------------------------------------------------------------------

def test_prompt_forms_agree(llm):
    text = "def greet(name):"
    ids = llm.get_tokenizer().encode(text)
    forms = [text, {"prompt": text}, TextPrompt(prompt=text), {"prompt_token_ids": ids},
             TokensPrompt(prompt_token_ids=ids), TokensPrompt(prompt_token_ids=ids, prompt=text)]
    outs = llm.generate(forms, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == [text, text, text, None, None, text]
    for out in outs:
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == outs[0].outputs[0].token_ids
        assert out.outputs[0].text == outs[0].outputs[0].text != ""


def test_a_list_of_ints_is_one_prompt_and_a_list_of_lists_several(llm):
    # vLLM 0.32: `generate([485, 287, 1501])` is one prompt of token ids, and
    # `generate([[...], [...]])` one per inner list, in order.
    ids = [[485, 287, 1501], [7, 8, 9, 10]]
    as_dicts = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY,
                                                            use_tqdm=False)]
    one = llm.generate(ids[0], GREEDY, use_tqdm=False)
    assert len(one) == 1 and one[0].prompt_token_ids == ids[0] and one[0].outputs[0].token_ids == as_dicts[0]
    several = llm.generate(ids, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in several] == ids
    assert [o.outputs[0].token_ids for o in several] == as_dicts
    assert llm.generate(tuple(ids[1]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids == as_dicts[1]
    assert llm.generate(np.array(ids[1]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids == as_dicts[1]
    with pytest.raises(ValueError, match=r"prompt 0: prompt_token_ids\[1\]: expected an int"):
        llm.generate([1, [2]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 1: token id 99999 is outside the vocabulary"):
        llm.generate([[1, 2], [99999]], GREEDY, use_tqdm=False)


def test_vllm_generate_keywords_at_their_defaults(llm):
    expected = llm.generate([5, 6, 7], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    out = llm.generate([5, 6, 7], GREEDY, use_tqdm=False, lora_request=None, priority=[0])
    assert out[0].outputs[0].token_ids == expected
    with pytest.raises(ValueError, match="lora_request: LoRA adapters are not served"):
        llm.generate([5, 6, 7], GREEDY, use_tqdm=False, lora_request=object())
    with pytest.raises(ValueError, match="priority: requests are served first come"):
        llm.generate([5, 6, 7], GREEDY, use_tqdm=False, priority=[1])
    assert llm.chat(CONVERSATION, GREEDY, use_tqdm=False, lora_request=None)[0].outputs[0].token_ids


def test_seed_none_draws_one():
    a, b = LLM(seed=None, max_model_len=64), LLM(seed=None, max_model_len=64)
    seeds = [x.config.load_config.seed for x in (a, b)]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]


def test_text_prompt_without_a_tokenizer_says_how_to_give_one(tiny):
    llm, _ = tiny
    in_memory = dataclasses.replace(llm.config.model_config, model=None)  # as training code builds it
    bare = LLM.from_params(in_memory, llm.runner.params, max_model_len=64, num_kv_blocks=8)
    with pytest.raises(ValueError, match=r"no tokenizer \(an LLM built from a parameter tree has one only when given tokenizer="):
        bare.generate("hello", GREEDY, use_tqdm=False)
    assert bare.generate([5, 6], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_logprobs_minus_one_is_the_whole_vocabulary():
    from runner.device.loader import dummy_params
    from state.config import ModelConfig
    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=16, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=True, max_position_embeddings=64, initializer_range=0.3)
    llm = LLM.from_params(cfg, dummy_params(cfg, seed=0), max_model_len=64, num_kv_blocks=8, block_size=16)
    prompt = [3, 9, 1, 14, 7]
    params = dict(temperature=1.0, seed=5, max_tokens=4, ignore_eos=True)
    full = llm.generate([prompt], SamplingParams(logprobs=-1, prompt_logprobs=-1, **params), use_tqdm=False)[0]
    top3 = llm.generate([prompt], SamplingParams(logprobs=3, prompt_logprobs=3, **params), use_tqdm=False)[0]
    assert full.outputs[0].token_ids == top3.outputs[0].token_ids
    rows = full.outputs[0].logprobs + full.prompt_logprobs[1:]
    capped = top3.outputs[0].logprobs + top3.prompt_logprobs[1:]
    for row, few in zip(rows, capped):
        assert sorted(row) == list(range(16))
        assert sorted(lp.rank for lp in row.values()) == list(range(1, 17))
        assert math.fsum(math.exp(lp.logprob) for lp in row.values()) == pytest.approx(1.0, abs=1e-5)
        for token, lp in few.items():
            assert row[token].logprob == pytest.approx(lp.logprob, abs=1e-6) and row[token].rank == lp.rank
    with pytest.raises(ValueError, match=r"logprobs=-1 asks for the whole vocabulary \(4096 entries"):
        LLM(max_model_len=64).generate([1, 2], SamplingParams(logprobs=-1), use_tqdm=False)


def test_multi_modal_data_is_refused(llm):
    with pytest.raises(ValueError, match=r"prompt 1: 'multi_modal_data' is not supported: this model takes text only"):
        llm.generate(["x", {"prompt": "describe", "multi_modal_data": {"image": object()}}], GREEDY, use_tqdm=False)


# -- min_tokens and stop strings -----------------------------------------------------------------

def test_min_tokens_holds_off_stop_strings(llm):
    tok = llm.get_tokenizer()
    prompt = "def fibonacci(n):"
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    text, tokens = plain.text, plain.token_ids
    ends = [len(tok.decode(tokens[:k], skip_special_tokens=True)) for k in range(len(tokens) + 1)]

    def end_token(at: int, stop: str) -> int:  # how many tokens it takes to complete the occurrence at `at`
        return next(k for k, n in enumerate(ends) if n >= at + len(stop))

    # A word the greedy text repeats, first completed within the first few tokens.
    stop = next(w for w in ("number", "the", "of") if text.count(w) >= 2 and end_token(text.find(w), w) <= 8)
    first = text.find(stop)
    second = text.find(stop, first + 1)
    k1, k2 = end_token(first, stop), end_token(second, stop)
    assert k1 < k2

    early = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]), use_tqdm=False)[0]
    assert early.outputs[0].text == text[:first] and len(early.outputs[0].token_ids) == k1
    assert (early.outputs[0].finish_reason, early.outputs[0].stop_reason) == ("stop", stop)

    # With min_tokens=k1 the first occurrence completes while only k1 tokens exist: not searched.
    held = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop], min_tokens=k1),
                        use_tqdm=False)[0].outputs[0]
    assert held.text == text[:second] and len(held.token_ids) == k2
    assert (held.finish_reason, held.stop_reason) == ("stop", stop)
    assert held.token_ids == tokens[:k2]
    # One token fewer: the first occurrence is completed by token k1 > min_tokens, and found.
    found = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop], min_tokens=k1 - 1),
                         use_tqdm=False)[0].outputs[0]
    assert found.text == text[:first] and len(found.token_ids) == k1


# -- incremental detokenization -------------------------------------------------------------------

class _CountingTokenizer(Tokenizer):
    """A tokenizer that records how many token ids each decode call was given."""

    def __init__(self, inner: Tokenizer) -> None:
        self.__dict__.update(inner.__dict__)
        self.calls: list[int] = []

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        self.calls.append(len(token_ids))
        return super().decode(token_ids, skip_special_tokens)


def test_half_a_character_is_held_back():
    tok = Tokenizer.byte_level()
    e_acute = tok.encode("é")
    assert len(e_acute) == 2
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert detok.push(e_acute[:1]) == 0 and detok.text == "" and REPLACEMENT not in detok.text
    assert detok.push(e_acute[1:]) == 1 and detok.text == "é"
    ending = IncrementalDetokenizer(tok, skip_special_tokens=True)
    ending.push(tok.encode("aé")[:2])  # the request ends after the first byte of é
    assert ending.text == "a"
    emoji = IncrementalDetokenizer(tok, skip_special_tokens=True)
    for i, t in enumerate(tok.encode("x😀")):
        emoji.push([t])
        assert emoji.text == ("x" if i < 4 else "x😀")


@pytest.mark.parametrize("which", ["byte_level", "builtin", "llama"])
def test_incremental_text_equals_the_full_decode(which, llama_folder):
    tok = {"byte_level": Tokenizer.byte_level, "builtin": lambda: Tokenizer.from_folder(BUILTIN),
           "llama": lambda: Tokenizer.from_folder(llama_folder)}[which]()
    texts = ["def foo(x):\n    return x * 2\n", "naïve café, 日本語 😀 ok", "Hello world  two  spaces",
             " leading space"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
        for t in ids:
            detok.push([t])
        assert detok.text == tok.decode(ids, skip_special_tokens=True), (which, text)


def test_generated_text_equals_the_full_decode(llm):
    outs = llm.generate(["import re\n", "class A:"], SamplingParams(temperature=0.9, seed=1, max_tokens=24),
                        use_tqdm=False)
    for out in outs:
        assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_decode_work_per_token_does_not_grow():
    tok = _CountingTokenizer(Tokenizer.from_folder(BUILTIN))
    source = Path(json.__file__).read_text()
    ids = tok.encode(source, add_special_tokens=False)[:200]
    assert len(ids) == 200
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    per_push = []
    for t in ids:
        tok.calls.clear()
        detok.push([t])
        per_push.append(sum(tok.calls))
    assert detok.text == tok.decode(ids, skip_special_tokens=True)
    assert max(per_push) <= 6, per_push
    assert sum(per_push[-50:]) <= sum(per_push[:50]) + 20


# -- smaller surfaces ----------------------------------------------------------------------------

def test_finished_is_a_method_and_metrics_are_ordered(llm):
    out = llm.generate("x = [", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert isinstance(out.outputs[0], CompletionOutput)
    assert callable(out.outputs[0].finished) and out.outputs[0].finished() is True
    assert out.finished is True
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time


def test_reset_prefix_cache(llm):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0
    assert llm.reset_prefix_cache() is True
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_wake_up_returns_none(llm):
    before = _tokens(llm.generate("import json\n", GREEDY, use_tqdm=False))
    assert llm.sleep(level=1) is None
    assert llm.wake_up() is None
    assert _tokens(llm.generate("import json\n", GREEDY, use_tqdm=False)) == before


def test_collective_rpc_with_a_callable_and_a_name(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen3_tied")
    small = LLM(str(folder), tokenizer=Tokenizer.byte_level(), max_model_len=16, block_size=16, num_kv_blocks=3,
                max_num_seqs=2, max_num_batched_tokens=8)
    assert small.collective_rpc(lambda worker, x: (worker.runner.num_blocks, x), args=(7,)) == [(3, 7)]
    assert small.collective_rpc(lambda worker, x=0: x * 2, kwargs={"x": 21}) == [42]
    [report] = small.collective_rpc("warmup")
    assert isinstance(report, WarmupReport) and report.num_forward_shapes > 0
    with CompileCounter() as counter:
        outs = small.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8] * 9}],
                              SamplingParams(temperature=0.7, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    assert counter.count == 0  # warmed up: nothing left to compile
    with pytest.raises(ValueError, match=r"collective_rpc: unknown method 'no_such_method'"):
        small.collective_rpc("no_such_method")
    assert math.isfinite(report.seconds)
