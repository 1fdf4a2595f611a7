"""`runner.formats.chat`: conversation normalisation and template rendering, on hand-checked values; the
real chat templates of common models against transformers; hostile templates against the limits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from runner.formats import chat

TEMPLATE = ("{% for m in messages %}\n  <{{ m.role }}>{{ m.content }}\n{% endfor %}\n"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_render_trims_blocks_like_transformers():
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # trim_blocks drops the newline after a tag, lstrip_blocks the spaces before one.
    assert chat.render(TEMPLATE, convo) == "  <user>hi\n  <assistant>yo\n"
    assert chat.render(TEMPLATE, convo, add_generation_prompt=True).endswith("yo\n<assistant>")


def test_render_variables_and_globals():
    out = chat.render("{{ bos_token }}{{ x | tojson }}{{ strftime_now('%Y') | length }}",
                      [{"role": "user", "content": ""}], variables={"bos_token": "<s>", "x": {"a": "<&>"}})
    assert out == '<s>{"a": "<&>"}4'
    with pytest.raises(ValueError, match="chat template: stop here"):
        chat.render("{{ raise_exception('stop here') }}", [{"role": "user", "content": ""}])


def test_render_is_sandboxed():
    with pytest.raises(ValueError, match="chat template"):
        chat.render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
                    [{"role": "user", "content": ""}])
    with pytest.raises(ValueError, match="chat template"):  # the immutable sandbox: no list.append
        chat.render("{% set l = [] %}{{ l.append(1) }}", [{"role": "user", "content": ""}])
    assert chat.render("{{ '{0.__class__}'.format(1) }}", [{"role": "user", "content": ""}]) == ""


def test_generation_block_renders_its_body():
    out = chat.render("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}",
                      [{"role": "assistant", "content": "a"}])
    assert out == "[a]"


def test_text_parts_join_and_none_values_drop():
    msg = chat.normalize_message({"role": "user", "content": [{"type": "text", "text": "one"},
                                                              {"type": "text", "text": "two"}],
                                  "tool_calls": None})
    assert msg == {"role": "user", "content": "one\ntwo"}


@pytest.mark.parametrize("message, error", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     r"conversation\[0\]\.content\[0\]: 'image_url' parts are not supported"),
    ({"role": "user", "content": [{"type": "text"}]}, r"content\[0\]: expected \{'type': 'text'"),
    ({"role": "user", "content": 3}, r"content: expected a string or a list of text parts, got int"),
    ({"content": "x"}, r"conversation\[0\]\.role: expected a string"),
    ("just text", r"conversation\[0\]: expected a dict"),
])
def test_bad_messages_are_refused(message, error):
    with pytest.raises(ValueError, match=error):
        chat.normalize_conversation([message])


def test_batches_and_single_conversations():
    one = [{"role": "user", "content": "a"}]
    assert chat.normalize_conversations(one) == ([one], False)
    assert chat.normalize_conversations([one, one]) == ([one, one], True)
    with pytest.raises(ValueError, match="non-empty list of messages"):
        chat.normalize_conversations([])
    with pytest.raises(ValueError, match=r"conversation 1\[0\]\.role"):
        chat.normalize_conversations([one, [{"content": "x"}]])


# -- real chat templates: rendered as transformers renders them, well within the limits ------------
# chat_templates/ holds copies of the templates in the models' tokenizer_config.json: Llama 3 and
# 3.1 8B Instruct, Qwen2 and Qwen2.5 7B Instruct, Qwen3 8B, Mistral 7B Instruct v0.3, Gemma 2 9B IT,
# Gemma 3 4B IT and Phi-3 mini 4k Instruct.
TEMPLATES = {path.stem: path.read_text().removesuffix("\n")
             for path in (Path(__file__).parent / "chat_templates").glob("*.jinja")}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}]
CHAT = [{"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi! What is 2+2?"},
        {"role": "assistant", "content": "  4.  "},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}, {"type": "text", "text": "Be brief."}]},
        {"role": "assistant", "content": "6."},
        {"role": "user", "content": "Thanks <3 \"quoted\" & 'more'"}]
TOOL_CHAT = [{"role": "system", "content": "You help with the weather."},
             {"role": "user", "content": "What's the weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [{"id": "call12345", "type": "function",
                                                                   "function": {"name": "get_weather", "arguments": {
                                                                       "city": "Paris", "unit": "celsius"}}}]},
             {"role": "tool", "tool_call_id": "call12345", "content": "22 degrees, sunny"},
             {"role": "assistant", "content": "It is 22°C and sunny in Paris."},
             {"role": "user", "content": "And in Berlin?"}]
BUILTIN_TOOL_CHAT = [{"role": "user", "content": "Search the news about Paris."},
                     {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                         "name": "brave_search", "arguments": {"query": "Paris news"}}}]},
                     {"role": "ipython", "content": "{\"results\": []}"},
                     {"role": "user", "content": "Nothing? Try again."}]
THINKING_CHAT = [{"role": "user", "content": "What is 2+2?"},
                 {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"},
                 {"role": "user", "content": "And 3+3?"},
                 {"role": "assistant", "reasoning_content": "Another sum.", "content": "6"}]

# (template, conversation, tools, template variables) for each way the templates branch
REAL = {
    "llama-3": ("llama-3", CHAT, None, {}),
    "llama-3.1": ("llama-3.1", CHAT, None, {}),
    "llama-3.1-tools": ("llama-3.1", TOOL_CHAT, TOOLS, {}),
    "llama-3.1-tools-in-system": ("llama-3.1", TOOL_CHAT, TOOLS, {"tools_in_user_message": False}),
    "llama-3.1-builtin-tools": ("llama-3.1", BUILTIN_TOOL_CHAT, None,
                                {"builtin_tools": ["brave_search", "code_interpreter"], "date_string": "1 May 2025"}),
    "qwen-2": ("qwen-2", CHAT[1:], None, {}),
    "qwen-2.5": ("qwen-2.5", CHAT, None, {}),
    "qwen-2.5-tools": ("qwen-2.5", TOOL_CHAT, TOOLS, {}),
    "qwen-3": ("qwen-3", CHAT, None, {}),
    "qwen-3-tools": ("qwen-3", TOOL_CHAT, TOOLS, {}),
    "qwen-3-thinking": ("qwen-3", THINKING_CHAT, None, {}),
    "qwen-3-no-thinking": ("qwen-3", THINKING_CHAT, None, {"enable_thinking": False}),
    "mistral-v0.3": ("mistral-v0.3", CHAT, None, {}),
    "mistral-v0.3-tools": ("mistral-v0.3", TOOL_CHAT, TOOLS, {}),
    "gemma-2": ("gemma-2", CHAT[1:], None, {}),
    "gemma-3": ("gemma-3", CHAT, None, {}),
    "gemma-3-no-system": ("gemma-3", CHAT[1:], None, {}),
    "phi-3": ("phi-3", CHAT, None, {}),
}


@pytest.fixture(scope="module")
def reference() -> PreTrainedTokenizerFast:
    """A transformers tokenizer with Llama's special tokens; only its chat templating is used."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _render(template: str, conversation: list, add_generation_prompt: bool, tools: list | None,
            variables: dict, reference: PreTrainedTokenizerFast) -> str:
    """As `Tokenizer.apply_chat_template` renders: the special tokens, the variables, the tools."""
    return chat.render(template, chat.normalize_conversation(conversation), add_generation_prompt,
                       {**reference.special_tokens_map, **variables, "tools": tools, "documents": None})


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name, conversation, tools, variables", REAL.values(), ids=REAL.keys())
def test_real_templates_render_as_transformers_does(name, conversation, tools, variables,
                                                    add_generation_prompt, reference):
    template = TEMPLATES[name]
    ours = _render(template, conversation, add_generation_prompt, tools, variables, reference)
    expected = reference.apply_chat_template(chat.normalize_conversation(conversation), tools=tools,
                                             chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **variables)
    assert ours == expected
    assert "2+2" in ours or "Paris" in ours  # the conversation is there, not an empty render


@pytest.mark.parametrize("name, conversation, tools, variables", REAL.values(), ids=REAL.keys())
def test_real_templates_render_long_conversations(name, conversation, tools, variables, reference):
    """Past what any model's context holds (2000 turns, 2 M characters), real templates stay well within
    the limits (MAX_RENDER_SECONDS included)."""
    head = [m for m in conversation if m["role"] == "system"]
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "word " * 200}
             for i in range(2000)]
    text = _render(TEMPLATES[name], head + turns, True, tools, variables, reference)
    assert len(text) > 2_000_000 and "1999 word" in text


# -- hostile templates: each fails within seconds, naming the limit it passed -----------------------

def _doubled(step: str) -> str:
    """A template that doubles `ns.x` 60 times over with `step`, in a namespace loop."""
    return ("{% set ns = namespace(x='a') %}{% for i in range(60) %}{% set ns.x = " + step + " %}"
            "{% endfor %}{{ ns.x }}")


HOSTILE = {  # template, the limit it passes
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "MAX_RENDER_STEPS"),
    "filtered loops": ("{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}{% endfor %}"
                       "{% endfor %}", "MAX_RENDER_STEPS"),
    "macros calling themselves twice": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                                        "{% endmacro %}{{ f(40) }}", "MAX_RENDER_STEPS"),
    "macro recursion": ("{% macro f(n) %}{{ f(n+1) }}{% endmacro %}{{ f(0) }}", "MAX_CALL_DEPTH"),
    "recursive loop": ("{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}", "MAX_CALL_DEPTH"),
    "tojson indent": ("{{ messages|tojson(indent=300000000) }}", "MAX_RENDER_CHARS"),
    "string doubled in a namespace": (_doubled("ns.x ~ ns.x"), "MAX_RENDER_CHARS"),
    "string doubled with +": (_doubled("ns.x + ns.x"), "MAX_RENDER_CHARS"),
    "list nested in itself": (_doubled("[ns.x, ns.x]"), "MAX_RENDER_CHARS"),
    "string multiplied": ("{{ ('a'*300000000)|length }}", "MAX_RENDER_CHARS"),
    "list multiplied": ("{{ ([messages] * 100000000)|length }}", "MAX_RENDER_CHARS"),
    "centered": ("{{ 'a'|center(300000000) }}", "MAX_RENDER_CHARS"),
    "padded": ("{{ 'a'.ljust(300000000) }}", "MAX_RENDER_CHARS"),
    "indented lines": ("{{ ('\\n' * 100000)|indent(100000) }}", "MAX_RENDER_CHARS"),
    "replaced": ("{{ ('a' * 100000)|replace('a', 'b' * 100000) }}", "MAX_RENDER_CHARS"),
    "joined": ("{{ range(100000)|join('x' * 100000) }}", "MAX_RENDER_CHARS"),
    "lists summed": ("{{ ([[1]] * 200000)|sum(start=[])|length }}", "MAX_RENDER_CHARS"),
    "%-format width": ("{{ '%0999999999d' % 1 }}", "MAX_RENDER_CHARS"),
    "str.format width": ("{{ '{:>{}}'.format(1, 999999999) }}", "MAX_RENDER_CHARS"),
    "endless output": ("{% set s = 'a' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
                       "MAX_RENDER_CHARS"),
    "power": ("{{ 2 ** 100000 }}", "MAX_INT_BITS"),
    "squared in a loop": ("{% set ns = namespace(x=3) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}"
                          "{% endfor %}", "MAX_INT_BITS"),
}
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, limit", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_templates_fail_fast_naming_the_limit(template, limit):
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"^chat template: .*{getattr(chat, limit)}.*\({limit}\)$"):
        chat.render(template, USER)
    assert time.monotonic() - start < 10


def test_work_no_count_sees_stops_at_the_deadline(monkeypatch):
    monkeypatch.setattr(chat, "MAX_RENDER_SECONDS", 0.5)
    slow = ("{% set l = range(100000)|list %}{% for i in range(100000) %}{% for j in range(100000) %}"
            "{% if -1 in l %}{% endif %}{% endfor %}{% endfor %}")  # a step is a whole scan of `l`
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^chat template: rendering took more than 0.5 s \(MAX_RENDER_SECONDS\)$"):
        chat.render(slow, USER)
    assert time.monotonic() - start < 5


def test_python_limits_while_rendering_are_value_errors():
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match=r"^chat template: nested deeper than Python's recursion limit"):
        chat.render("{{ messages[0].content|tojson }}", [{"role": "user", "content": deep}])

    class Huge:
        def __str__(self) -> str:
            raise MemoryError

    with pytest.raises(ValueError, match=r"^chat template: ran out of memory$"):
        chat.render("{{ huge }}", USER, variables={"huge": Huge()})
    with pytest.raises(ValueError, match=r"^chat template: ZeroDivisionError"):  # the template's own error
        chat.render("{{ 1 / 0 }}", USER)


@pytest.mark.parametrize("template, error", [
    ("x" * (chat.MAX_TEMPLATE_CHARS + 1), r"longer than \d+ characters \(MAX_TEMPLATE_CHARS\)"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", r"nested too deeply to compile \(RecursionError"),
    ("{% for a in [1] %}" * 25 + "{% endfor %}" * 25, r"nested too deeply to compile \(SyntaxError"),
], ids=["too long", "too deep for the parser", "too deep for Python"])
def test_templates_too_large_to_compile(template, error):
    with pytest.raises(ValueError, match="^chat template: " + error):
        chat.compile_template(template)


@pytest.mark.parametrize("template", [
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ messages.pop() }}",
    "{% set d = {} %}{{ d.update(a=1) }}",
    "{{ range(1000000)|length }}",
    "{{ lipsum(100000000) }}",
])
def test_sandbox_escapes_stay_refused(template):
    with pytest.raises(ValueError, match="^chat template: "):
        chat.render(template, USER)
