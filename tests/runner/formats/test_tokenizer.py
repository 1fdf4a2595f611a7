"""`runner.formats.tokenizer.Tokenizer` against `transformers.AutoTokenizer` on the same folders:
encodings with and without special tokens, special-token attributes, decoding, chat templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizerFast, Qwen2TokenizerFast

from runner import demo
from runner.formats.tokenizer import Tokenizer

TRAINING_TEXTS = ["Hello world, this is a test of the tokenizer.", "def foo(x):\n    return x * 2\n",
                  "naïve café 日本語 123 456", "The quick brown fox jumps over the lazy dog."] * 5

PROMPTS = [
    "Hello world",
    "def f(x):\n    return x+1\n",
    "   leading and trailing spaces   ",
    "numbers 12345 and 3.14159",
    "It's John's café, naïve résumé",
    "日本語のテキスト 😀 emoji",
    "tabs\tand\r\nCRLF\n\n\nblank lines",
    "",
    "for i in range(10):\n\tprint(i ** 2)  # squares",
]

LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                  "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


def _train(pre_tokenizer, decoder, special: list[str], byte_fallback: bool = False) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    alphabet = [] if byte_fallback else pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(TRAINING_TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                                 initial_alphabet=alphabet))
    trained = json.loads(tok.to_str())["model"]
    vocab, merges = trained["vocab"], [tuple(m) for m in trained["merges"]]
    if byte_fallback:  # Llama's layout: the 256 byte tokens, unknown runs fused into one <unk>
        vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
        model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    else:
        model = models.BPE(vocab, merges)
    out = HFTokenizer(model)
    out.add_special_tokens(special)
    out.pre_tokenizer, out.decoder = pre_tokenizer, decoder
    return out


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """Llama style: Metaspace pre-tokenizer with byte fallback, a post-processor adding <s>."""
    tok = _train(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                 decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)]),
                 ["<unk>", "<s>", "</s>"], byte_fallback=True)
    hf = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            add_bos_token=True)
    hf.chat_template = LLAMA_TEMPLATE
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    """Qwen2 style: byte-level BPE, no BOS, ChatML special tokens."""
    tok = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), ["<|endoftext|>"])
    trained = json.loads(tok.to_str())["model"]
    vocab, merges = trained["vocab"], [tuple(m) for m in trained["merges"]]
    hf = Qwen2TokenizerFast(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = CHATML_TEMPLATE
    folder = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(folder)
    return folder


def _both(folder: Path) -> tuple[Tokenizer, object]:
    ours = Tokenizer.from_folder(folder)
    assert ours is not None
    return ours, AutoTokenizer.from_pretrained(str(folder))


def _assert_same_encodings(ours: Tokenizer, ref, prompts: list[str]) -> None:
    for text in prompts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), \
                (text, special)
    assert ours(prompts)["input_ids"] == ref(prompts)["input_ids"]


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_encodings_match_transformers(name, llama_folder, qwen_folder):
    folder = {"llama": llama_folder, "qwen": qwen_folder}[name]
    ours, ref = _both(folder)
    specials = ["<|im_start|>user\nhi<|im_end|>", "<s> inside </s> text", "<|endoftext|>"]
    _assert_same_encodings(ours, ref, PROMPTS + specials)


def test_llama_bos_is_added_once(llama_folder):
    ours, ref = _both(llama_folder)
    assert ours.bos_token == "<s>" and ours.bos_token_id == ref.bos_token_id == ours.convert_tokens_to_ids("<s>")
    ids = ours.encode("Hello world")
    assert ids[0] == ours.bos_token_id and ids[1:] == ours.encode("Hello world", add_special_tokens=False)
    assert ids.count(ours.bos_token_id) == 1


def test_qwen_has_no_bos(qwen_folder):
    ours, ref = _both(qwen_folder)
    assert ours.bos_token is None and ours.bos_token_id is None and ref.bos_token_id is None
    assert ours.encode("Hello world") == ours.encode("Hello world", add_special_tokens=False)


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_special_token_attributes_match_transformers(name, llama_folder, qwen_folder):
    ours, ref = _both({"llama": llama_folder, "qwen": qwen_folder}[name])
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "unk_token_id", "vocab_size"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref)
    assert sorted(ours.all_special_tokens) == sorted(ref.all_special_tokens)
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.chat_template == ref.chat_template


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_decode_and_token_conversion_match_transformers(name, llama_folder, qwen_folder):
    ours, ref = _both({"llama": llama_folder, "qwen": qwen_folder}[name])
    text = "<|im_start|>Hello naïve world 😀<|im_end|>" if name == "qwen" else "Hello naïve world 😀"
    ids = ref.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert ours.batch_decode([ids, ids[:3]], skip_special_tokens=skip) == \
            ref.batch_decode([ids, ids[:3]], skip_special_tokens=skip)
    assert ours.decode(np.array(ids)) == ours.decode(ids)
    tokens = ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids) == tokens
    assert ours.convert_ids_to_tokens(ids[0]) == tokens[0]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("never-a-token") == ref.convert_tokens_to_ids("never-a-token")


def test_call_returns_batch_encoding(qwen_folder):
    ours, ref = _both(qwen_folder)
    one = ours("Hello world")
    assert one.input_ids == one["input_ids"] == ref("Hello world")["input_ids"]
    assert one.attention_mask == [1] * len(one.input_ids)
    many = ours(["a b", "Hello world"], add_special_tokens=False)
    assert many.input_ids == ref(["a b", "Hello world"], add_special_tokens=False)["input_ids"]
    with pytest.raises(AttributeError):
        _ = one.token_type_ids
    with pytest.raises(ValueError, match="return_tensors"):
        ours("x", return_tensors="pt")


@pytest.mark.parametrize("name", ["llama", "qwen"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(name, add_generation_prompt, llama_folder, qwen_folder):
    ours, ref = _both({"llama": llama_folder, "qwen": qwen_folder}[name])
    conversation = CONVERSATION[1:] if name == "llama" else CONVERSATION
    text = ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    ref_ids = ref.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ids == ref_ids
    batch = ours.apply_chat_template([conversation, conversation[:1]], tokenize=False)
    assert batch == ref.apply_chat_template([conversation, conversation[:1]], tokenize=False)


def test_chat_template_writes_bos_once(llama_folder):
    ours = Tokenizer.from_folder(llama_folder)
    ids = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[0] == ours.bos_token_id and ids.count(ours.bos_token_id) == 1


def test_chat_template_variables_and_environment(qwen_folder):
    ours, ref = _both(qwen_folder)
    template = ("{{ eos_token }}|{{ greeting }}|{{ messages | tojson }}|{% for m in messages %}"
                "{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}")
    convo = [{"role": "user", "content": "<b>&'"}, {"role": "assistant", "content": "x"}]
    text = ours.apply_chat_template(convo, chat_template=template, tokenize=False, greeting="hey")
    assert text == ref.apply_chat_template(convo, chat_template=template, tokenize=False, greeting="hey")
    assert text == '<|im_end|>|hey|[{"role": "user", "content": "<b>&\'"}, {"role": "assistant", "content": "x"}]|user'
    with pytest.raises(ValueError, match="chat template: no system role"):
        ours.apply_chat_template(convo, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="not a valid jinja2 template"):
        ours.apply_chat_template(convo, chat_template="{% for %}")


def test_named_templates_and_template_file(qwen_folder, tmp_path):
    folder = tmp_path / "named"
    shutil.copytree(qwen_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                               {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    ours, ref = _both(folder)
    convo = [{"role": "user", "content": "q"}]
    assert ours.apply_chat_template(convo, tokenize=False) == ref.apply_chat_template(convo, tokenize=False) == "Dq"
    assert ours.apply_chat_template(convo, tools=[{"name": "f"}], tokenize=False) == "T1"
    assert ours.apply_chat_template(convo, chat_template="tool_use", tools=[], tokenize=False) == "T0"
    (folder / "chat_template.jinja").write_text("J{{ messages | length }}")
    ours, ref = _both(folder)
    assert ours.apply_chat_template(convo, tokenize=False) == ref.apply_chat_template(convo, tokenize=False) == "J1"


def test_special_tokens_map_and_added_tokens(qwen_folder, tmp_path):
    """Older folders: special tokens in special_tokens_map.json (AddedToken dicts), extra
    tokens in added_tokens_decoder, a token the vocabulary lacks."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    shutil.copy(qwen_folder / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "add_bos_token": True,  # ignored when tokenizer.json exists, as transformers does
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": {"content": "<|fresh_eos|>", "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False},
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<tool>"],
    }))
    ours, ref = _both(folder)
    assert (ours.eos_token, ours.eos_token_id) == (ref.eos_token, ref.eos_token_id) == ("<|fresh_eos|>", len(ref) - 2)
    assert ours.bos_token_id == ref.bos_token_id
    _assert_same_encodings(ours, ref, ["a<|fresh_eos|>b <tool> c", "x<|endoftext|>"] + PROMPTS)
    assert sorted(ours.all_special_tokens) == sorted(ref.all_special_tokens)
    ids = ref.encode("a<tool>b")
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)

    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "added_tokens_decoder": {"900": {"content": "<extra>", "lstrip": False, "rstrip": False,
                                         "normalized": False, "single_word": False, "special": False}},
    }))
    ours, ref = _both(folder)
    _assert_same_encodings(ours, ref, ["q<extra>r <|fresh_eos|>"])
    assert ours.eos_token == ref.eos_token == "<|endoftext|>"  # special_tokens_map.json is not read


def test_save_round_trip_keeps_the_settings(llama_folder, tmp_path):
    ours = Tokenizer.from_folder(llama_folder)
    ours.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.chat_template == ours.chat_template == LLAMA_TEMPLATE
    assert again.encode("Hello world") == ours.encode("Hello world") == ref.encode("Hello world")
    assert again.eos_token_id == ours.eos_token_id


def test_folder_without_config_keeps_post_processor_behaviour(tmp_path):
    """No tokenizer_config.json: no special tokens named, and encode adds only what the
    tokenizer.json post-processor adds (nothing for the byte-level tokenizer)."""
    tok = Tokenizer.byte_level()
    tok.save(tmp_path)
    assert not (tmp_path / "tokenizer_config.json").exists()
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.encode("ab") == loaded.encode("ab", add_special_tokens=False) == [64, 65]  # "!" is 0, so "a" (97) is 64
    assert loaded.eos_token is None and loaded.eos_token_id is None and loaded.all_special_ids == []
    assert loaded.vocab_size == len(loaded) == 256
    assert Tokenizer.from_folder(tmp_path / "missing") is None


def test_builtin_folder_matches_transformers():
    folder = demo.builtin_folder()
    ours, ref = _both(Path(folder))
    prompts = PROMPTS + ["import os\nprint(os.getcwd())", "x = [1, 2, 3]  # list", "<|endoftext|>after",
                         "class A:\n    def __init__(self):\n        pass\n", "e\u0301 decomposed"]
    _assert_same_encodings(ours, ref, prompts)
    assert ours.eos_token == "<|endoftext|>" and ours.eos_token_id == 0 == ref.eos_token_id
    assert ours.bos_token_id is None and ours.pad_token_id == ref.pad_token_id
    convo = [{"role": "user", "content": "Write a function."}]
    for gen in (False, True):
        text = ours.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(convo, add_generation_prompt=gen) == \
            ref.apply_chat_template(convo, add_generation_prompt=gen)["input_ids"]


def test_encode_errors_are_value_errors(tmp_path):
    word_level = HFTokenizer(models.WordLevel({"a": 0, "b": 1}))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(word_level)
    assert tok.encode("a b a") == [0, 1, 0]
    with pytest.raises(ValueError, match="cannot be encoded by this tokenizer"):
        tok.encode("a c")
    with pytest.raises(ValueError, match="lone surrogate"):
        Tokenizer.byte_level().encode("bad \ud800 text")
    with pytest.raises(ValueError, match="expected a str"):
        Tokenizer.byte_level().encode(b"bytes")
    with pytest.raises(ValueError, match="token ids"):
        Tokenizer.byte_level().decode([True, 1])


def test_bad_config_files_are_value_errors(qwen_folder, tmp_path):
    shutil.copy(qwen_folder / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*tokenizer_config.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(ValueError, match="eos_token: expected a token string"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ValueError, match="chat_template: expected a string"):
        Tokenizer.from_folder(tmp_path)
    no_template = Tokenizer.from_folder(qwen_folder)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="has none"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
