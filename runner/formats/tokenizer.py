"""Text <-> token ids through the `tokenizers` library (a model folder's `tokenizer.json`),
with the parts of a Hugging Face tokenizer that scripts call (`llm.get_tokenizer()`).

A folder's `tokenizer_config.json` and `special_tokens_map.json` are read as
`transformers.AutoTokenizer` (5.x) reads them for a `tokenizer.json`-backed tokenizer:

* the `tokenizer.json` post-processor decides which special tokens `add_special_tokens=True`
  adds; `add_bos_token` / `add_eos_token` in the config do not change it (transformers drops
  them when a `tokenizer.json` is present);
* tokens of `added_tokens_decoder`, and named special tokens (bos/eos/unk/pad/...) missing from
  the added vocabulary, are added to the backend, so they encode as one token;
* the chat template comes from `chat_template.jinja` when the folder has one, else from the
  config's `chat_template` (one string, or a list of named templates).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from runner.formats import chat

# transformers' named special tokens, in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
_EXTRA_LISTS = ("additional_special_tokens", "extra_special_tokens")


class BatchEncoding(dict):
    """What calling a tokenizer returns: a dict (`enc["input_ids"]`) whose keys also read as
    attributes (`enc.input_ids`), like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def read_json(path: Path) -> Any:
    """The JSON in `path`; a clear ValueError when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _added_token(value: Any, name: str) -> AddedToken:
    """A config entry (a string, or an AddedToken dict as transformers saves it) as an AddedToken."""
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
                 if k in value}
        return AddedToken(value["content"], **flags)
    raise ValueError(f"tokenizer_config: {name}: expected a token string or an AddedToken dict "
                     f"with 'content', got {value!r}")


def _token_key(token: AddedToken) -> tuple:
    return (token.content, token.single_word, token.lstrip, token.rstrip, token.normalized, token.special)


def _chat_templates(value: Any) -> str | dict[str, str] | None:
    """The config's chat_template: one string, or {name: template} from a list of named ones."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(
            isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError("tokenizer_config: chat_template: expected a string or a list of "
                     f"{{'name': str, 'template': str}}, got {value!r}"[:300])


def _merge_special_tokens_map(config: dict[str, Any], folder: Path) -> None:
    """special_tokens_map.json is the older home of the special tokens: transformers reads it
    only when the config has no `added_tokens_decoder`, and its entries win."""
    path = folder / "special_tokens_map.json"
    if "added_tokens_decoder" in config or not path.is_file():
        return
    tokens = read_json(path)
    if not isinstance(tokens, Mapping):
        raise ValueError(f"cannot read {path}: expected a JSON object")
    for key, value in tokens.items():
        if key in _EXTRA_LISTS and isinstance(value, list):
            existing = list(config.get("additional_special_tokens") or config.get("extra_special_tokens") or [])
            config["additional_special_tokens"] = existing + [v for v in value if v not in existing]
        else:
            config[key] = value


def read_tokenizer_config(folder: str | Path) -> dict[str, Any] | None:
    """The folder's tokenizer settings merged from tokenizer_config.json, special_tokens_map.json
    and chat_template.jinja; None when it has none of them."""
    folder = Path(folder)
    path = folder / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object")
    _merge_special_tokens_map(config, folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():  # a separate template file takes priority, as in transformers
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    return config or None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the folder's tokenizer settings (see the module docstring)."""

    def __init__(self, tokenizer: HFTokenizer, config: Mapping[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self._config: dict[str, Any] = dict(config or {})
        self.chat_template: str | dict[str, str] | None = _chat_templates(self._config.get("chat_template"))
        self._special = self._named_special_tokens()
        self._extra_special = self._extra_special_tokens()
        self._add_config_tokens()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer | None:
        """The folder's tokenizer, or None when it has no `tokenizer.json`."""
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ValueError(f"cannot read {path}: {e}") from e
        return cls(backend, read_tokenizer_config(folder))

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """256 byte tokens and no merges: any text round-trips, no training needed."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    def _named_special_tokens(self) -> dict[str, AddedToken]:
        return {name: _added_token(self._config[name], name) for name in SPECIAL_TOKEN_NAMES
                if self._config.get(name) is not None}

    def _extra_special_tokens(self) -> list[AddedToken]:
        """Additional special tokens, and model-specific named ones (`image_token`, ...)."""
        extra: list[Any] = []
        for key in _EXTRA_LISTS:
            value = self._config.get(key)
            if isinstance(value, list):
                extra += value
            elif isinstance(value, Mapping):
                extra += value.values()
        extra += [v for k, v in self._config.items()
                  if k.endswith("_token") and k not in SPECIAL_TOKEN_NAMES and isinstance(v, (str, Mapping))]
        return [_added_token(v, "additional special token") for v in extra]

    def _config_added_tokens(self) -> list[AddedToken]:
        decoder = self._config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, Mapping):
            raise ValueError(f"tokenizer_config: added_tokens_decoder: expected {{id: token}}, got {decoder!r}")
        return [_added_token(decoder[k], f"added_tokens_decoder[{k}]")
                for k in sorted(decoder, key=lambda k: int(k))]

    def _add_config_tokens(self) -> None:
        """Add what transformers adds at load: config tokens whose exact form the backend lacks,
        then special tokens whose text is not an added token yet (all as one call, in order)."""
        present = {_token_key(t) for t in self._tok.get_added_tokens_decoder().values()}
        to_add = [t for t in self._config_added_tokens() if _token_key(t) not in present]
        contents = {t.content for t in self._tok.get_added_tokens_decoder().values()} | {t.content for t in to_add}
        for token in [*self._special.values(), *self._extra_special]:
            if token.content not in contents:
                token = AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                                   rstrip=token.rstrip, normalized=token.normalized, special=True)
                to_add.append(token)
                contents.add(token.content)
        if to_add:
            self._tok.add_tokens(to_add)

    # -- the backend and its vocabulary ----------------------------------------------------

    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    @property
    def config(self) -> dict[str, Any]:
        """The tokenizer_config settings this tokenizer was built with (a copy)."""
        return json.loads(json.dumps(self._config))

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (as transformers counts it)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """The full vocabulary, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    # -- special tokens --------------------------------------------------------------------

    def _special_text(self, name: str) -> str | None:
        token = self._special.get(name)
        return None if token is None else token.content

    @property
    def bos_token(self) -> str | None:
        return self._special_text("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_text("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_text("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special_text("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    def _special_id(self, name: str) -> int | None:
        text = self._special_text(name)
        return None if text is None else self.convert_tokens_to_ids(text)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens as text (what chat templates see as `bos_token`, ...)."""
        return {name: token.content for name, token in self._special.items()}

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = [t.content for t in (*self._special.values(), *self._extra_special)]
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Token text to id; an unknown token maps to the unk id (None without one)."""
        if isinstance(tokens, str):
            found = self._tok.token_to_id(tokens)
            return found if found is not None or self.unk_token is None else self._tok.token_to_id(self.unk_token)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int],
                              skip_special_tokens: bool = False) -> str | None | list[str | None]:
        if isinstance(ids, (list, tuple)) or hasattr(ids, "tolist"):
            special = set(self.all_special_ids) if skip_special_tokens else set()
            return [self._tok.id_to_token(int(i)) for i in _id_list(ids) if i not in special]
        return self._tok.id_to_token(_id_list([ids])[0])

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens` the tokenizer.json post-processor adds
        its special tokens (a Llama BOS, say); a folder without one adds none."""
        if not isinstance(text, str):
            raise ValueError(f"text: expected a str, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError as e:  # the Rust side refuses str it cannot hold as UTF-8
            raise ValueError(f"text cannot be encoded: it is not valid UTF-8 (a lone surrogate?): {e}") from e
        except Exception as e:  # a bare Exception, e.g. a word outside a vocabulary with no unk token
            raise ValueError(f"text cannot be encoded by this tokenizer: {e}") from e

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True,
                 return_tensors: None = None) -> BatchEncoding:
        """{"input_ids", "attention_mask"} for one text, or lists of them for a list of texts."""
        if return_tensors is not None:
            raise ValueError(f"return_tensors: only None (lists of ints) is supported, got {return_tensors!r}")
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return BatchEncoding(input_ids=ids, attention_mask=[1] * len(ids))
        if not isinstance(text, (list, tuple)):
            raise ValueError(f"text: expected a str or a list of str, got {type(text).__name__}")
        ids_list = [self.encode(t, add_special_tokens) for t in text]
        return BatchEncoding(input_ids=ids_list, attention_mask=[[1] * len(ids) for ids in ids_list])

    def decode(self, token_ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `token_ids`. Special tokens are kept by default, as transformers keeps them
        (the engine decodes outputs with the request's `skip_special_tokens`, True by default)."""
        return self._tok.decode(_id_list(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    # -- chat ------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render: the named one or `chat_template` itself when given, else the
        folder's ("tool_use" when tools are passed and the folder names one, else "default")."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(f"chat_template: this tokenizer has several templates and none is named "
                             f"'default'; pass one of {sorted(templates)}")
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError("chat_template: this tokenizer has none (no chat_template in "
                             "tokenizer_config.json, no chat_template.jinja); pass chat_template=")
        return templates

    def apply_chat_template(self, conversation: Sequence[Any], tools: list | None = None,
                            documents: list | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            return_dict: bool = False, **kwargs: Any) -> Any:
        """Render one conversation (or a list of them) with the chat template.

        Returns the text (`tokenize=False`), or its token ids encoded without adding special
        tokens (the template writes them: a rendered BOS is not doubled). `return_dict=True`
        gives a BatchEncoding instead of the ids. Extra keyword arguments are template variables.
        """
        if kwargs.get("continue_final_message"):
            raise ValueError("continue_final_message: not supported; end the conversation with the "
                             "message to answer and use add_generation_prompt=True")
        kwargs.pop("continue_final_message", None)
        template = self.get_chat_template(chat_template, tools)
        conversations, batched = chat.normalize_conversations(conversation)
        variables = {**self.special_tokens_map, **kwargs, "tools": tools, "documents": documents}
        texts = [chat.render(template, c, add_generation_prompt, variables) for c in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        encoding = self(texts if batched else texts[0], add_special_tokens=False)
        return encoding if return_dict else encoding["input_ids"]

    # -- saving ----------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """tokenizer.json, plus tokenizer_config.json when this tokenizer has settings (chat
        template, special tokens), so an exported folder loads back the same."""
        folder = Path(folder)
        self._tok.save(str(folder / "tokenizer.json"))
        if self._config:
            (folder / "tokenizer_config.json").write_text(json.dumps(self._config, indent=2, ensure_ascii=False),
                                                          encoding="utf-8")


def _id_list(token_ids: Any) -> list[int]:
    """Token ids as a list of Python ints (numpy ints and arrays accepted, bools refused)."""
    if hasattr(token_ids, "tolist"):  # a numpy array or scalar
        token_ids = token_ids.tolist()
    items = [token_ids] if not isinstance(token_ids, (list, tuple)) else token_ids
    try:
        if any(isinstance(t, bool) for t in items):
            raise TypeError("bool")
        return [operator.index(t) for t in items]
    except TypeError:
        raise ValueError(f"token ids: expected an int or a list of ints, got {token_ids!r}"[:200]) from None
