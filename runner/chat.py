"""Chat conversations and their templates: messages normalised, then rendered with jinja2.

Rendering follows transformers' `apply_chat_template`: a sandboxed jinja2 environment with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, `raise_exception`,
`strftime_now`, and a `tojson` filter that does not escape HTML. Templates come from model
folders, i.e. from whoever published the model, so they run in the immutable sandbox.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, Any]
Conversation = list[Message]

# Content parts a text-only model cannot take (OpenAI-style and transformers-style names).
_MEDIA_PARTS = frozenset({"image", "image_url", "image_pil", "image_embeds", "input_image", "audio",
                          "audio_url", "input_audio", "video", "video_url"})


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
    rendering a prompt the block renders its body unchanged (templates using it must compile)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached: a script renders the same template once per prompt)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template: not a valid jinja2 template (line {e.lineno}: {e.message})") from e


def render(template: str, conversation: Conversation, add_generation_prompt: bool = False,
           variables: Mapping[str, Any] | None = None) -> str:
    """One normalised conversation rendered to prompt text. `variables` (special tokens such as
    `bos_token`, `tools`, extra keyword arguments) are visible to the template."""
    compiled = compile_template(template)
    try:
        return compiled.render(**dict(variables or {}), messages=conversation,
                               add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:  # raise_exception() in the template, or a sandbox refusal
        raise ValueError(f"chat template: {e}") from e


# -- conversations -----------------------------------------------------------------------------

def _text_of_parts(parts: Sequence[Any], where: str) -> str:
    """OpenAI-style content parts to one string: text parts joined by newlines, as vLLM does
    for templates that expect string content."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in _MEDIA_PARTS:
            raise ValueError(f"{where}.content[{j}]: {kind!r} parts are not supported; this model "
                             f"takes text only")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}]: expected {{'type': 'text', 'text': str}}, got {part!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_message(message: Any, where: str = "message") -> Message:
    """A copy of one message with string content; keys whose value is None are dropped (as
    transformers does: templates handle a missing key, not a literal None)."""
    if not isinstance(message, Mapping):
        raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    out = {k: v for k, v in message.items() if v is not None}
    if not isinstance(out.get("role"), str):
        raise ValueError(f"{where}.role: expected a string such as 'user', got {message.get('role')!r}")
    content = out.get("content")
    if isinstance(content, (list, tuple)):
        out["content"] = _text_of_parts(content, where)
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"{where}.content: expected a string or a list of text parts, "
                         f"got {type(content).__name__}")
    return out


def normalize_conversation(conversation: Any, where: str = "conversation") -> Conversation:
    """A non-empty list of messages, each normalised (see `normalize_message`)."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {conversation!r}"[:200])
    return [normalize_message(m, f"{where}[{i}]") for i, m in enumerate(conversation)]


def is_batch(conversations: Any) -> bool:
    """Whether `conversations` is a list of conversations rather than one conversation."""
    return (isinstance(conversations, (list, tuple)) and bool(conversations)
            and isinstance(conversations[0], (list, tuple)))


def normalize_conversations(conversations: Any) -> tuple[list[Conversation], bool]:
    """(the conversations, whether a batch was given): one conversation or a list of them."""
    if is_batch(conversations):
        return [normalize_conversation(c, f"conversation {i}") for i, c in enumerate(conversations)], True
    return [normalize_conversation(conversations)], False
