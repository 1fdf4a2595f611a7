"""Chat conversations and their templates: messages normalised, then rendered with jinja2.

Rendering follows transformers' `apply_chat_template`: a sandboxed jinja2 environment with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, `raise_exception`,
`strftime_now`, and a `tojson` filter that does not escape HTML. Templates come from model
folders, i.e. from whoever published the model, so they run in the immutable sandbox and within
the limits below: a hostile template fails in seconds instead of running for hours or taking the
machine's memory. Every template failure is a `ValueError("chat template: ...")`.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, CompilerExit, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

Message = dict[str, Any]
Conversation = list[Message]
T = TypeVar("T")

# Content parts a text-only model cannot take (OpenAI-style and transformers-style names).
_MEDIA_PARTS = frozenset({"image", "image_url", "image_pil", "image_embeds", "input_image", "audio",
                          "audio_url", "input_audio", "video", "video_url"})

# -- limits on one render ------------------------------------------------------------------------
# jinja2's sandbox caps each `range` at 100000 items, and nothing else. Passing one of these limits
# is a ValueError naming it; so is a RecursionError or MemoryError, should one happen all the same.

# Steps: statements run, plus one each time a loop body is entered or a loop's `if` tests an item,
# so that empty and filtered loops cost their iterations. The real templates in the tests take at
# most 30 steps a message: 10^6 steps is 30000 messages, and about a second of rendering.
MAX_RENDER_STEPS = 1_000_000
# Steps a macro call, `caller()` or recursive `loop()` costs on top of its statements: jinja2 takes
# longer to make such a call than to run a dozen statements.
_CALL_STEPS = 16
# Characters built: every string, list and dict that an operator, literal, slice, filter or method
# makes, counted as it would print (`_size`), and every buffer joined, the prompt included. Real
# templates build 3 to 9 times their prompt (each `+` copies it), so prompts of ~4 Mi characters
# (~1M tokens, past any model's context length) render; copying 32 Mi characters takes well under a second.
MAX_RENDER_CHARS = 1 << 25
# What an item of a list or dict costs against MAX_RENDER_CHARS: filters walk lists item by item in
# Python, a hundred times slower than copying a character, so at 64 an item no one filter over the
# longest list allowed (512k items) takes more than about a second.
_ITEM_CHARS = 64
# Macro calls, `caller()` and recursive `loop()` nested in one another. Real templates nest two or
# three; a level takes ~6 Python frames, so 64 stays clear of Python's recursion limit of 1000.
MAX_CALL_DEPTH = 64
# Bits of an integer made by `*` or `**`: Python prints at most 4300 digits (~14300 bits), and
# multiplying numbers of 2^16 bits takes microseconds.
MAX_INT_BITS = 1 << 16
# Template source: the longest real chat templates are tens of kilobytes; parsing is not free.
MAX_TEMPLATE_CHARS = 1 << 20
# Wall time: a backstop for work that the counts cannot see inside one step, such as testing
# `x in long_list` in a loop. Real templates render in milliseconds.
MAX_RENDER_SECONDS = 5.0


class _Budget:
    """What the render in progress may still spend; the sandbox's hooks charge it."""

    __slots__ = ("steps", "chars", "depth", "deadline")

    def __init__(self) -> None:
        self.steps, self.chars, self.depth = MAX_RENDER_STEPS, MAX_RENDER_CHARS, 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS


# A context variable, not jinja2's context, which filters do not see. It is unset while a template
# compiles, so the compiler's constant folding (which calls filters) gives up and leaves that work
# to the render, within its budget.
_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


def _step(steps: int = 1) -> None:
    budget = _budget.get()
    budget.steps -= steps
    if budget.steps < 0:
        raise SecurityError(f"more than {MAX_RENDER_STEPS} steps, statements and loop iterations "
                            f"(MAX_RENDER_STEPS)")
    if time.monotonic() > budget.deadline:
        raise SecurityError(f"rendering took more than {MAX_RENDER_SECONDS} s (MAX_RENDER_SECONDS)")


def _check_room(length: Any) -> None:
    """Refuse to build `length` characters (when it is a number) if the render has fewer left."""
    if isinstance(length, int) and length > _budget.get().chars:
        raise SecurityError(f"builds more than {MAX_RENDER_CHARS} characters (MAX_RENDER_CHARS)")


def _size(value: Any, limit: int) -> int:
    """What `value` costs, counted until past `limit`: the characters of its strings and
    `_ITEM_CHARS` an item of its lists, tuples, dicts and namespaces, however deep. What it holds
    many times over counts each time, as when printed: `ns.x = [ns.x, ns.x]` doubles the cost."""
    size, todo = 0, [value]
    while todo and size <= limit:
        item = todo.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, (list, tuple, set, frozenset, dict)):
            size += _ITEM_CHARS * len(item)
            todo.extend(item)
            if isinstance(item, dict):
                todo.extend(item.values())
        elif isinstance(item, Namespace):
            todo.append(item._Namespace__attrs)  # what the namespace holds (jinja2 exposes it so)
    return size


def _built(value: T) -> T:
    """`value`, charged to the render's budget."""
    budget = _budget.get()
    size = len(value) if isinstance(value, str) else _size(value, budget.chars)
    _check_room(size)
    budget.chars -= size
    return value


_NUMBER = re.compile(r"\d+")
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")


def _format_length(fmt: Any, args: Sequence[Any]) -> int:
    """At most what `fmt % args` or `fmt.format(*args)` adds to its arguments: the format, its
    widths, and the arguments when a width comes from them (`'%*d' % (n, 1)`, `'{:{}}'`)."""
    if not isinstance(fmt, str):
        return 0
    length = len(fmt) + sum(int(n) for n in _NUMBER.findall(fmt))
    if "*" in fmt or _NESTED_FIELD.search(fmt):
        length += sum(a for a in args if isinstance(a, int))
    return length


def _count(s: Any, sub: Any) -> int:
    return s.count(sub) if isinstance(s, str) else 0


def _sum_length(items: Any, attribute: Any = None, start: Any = 0) -> int:
    # Summing lists copies the partial sum at each item: the cost is quadratic.
    return 0 if isinstance(start, (int, float)) else len(items) * _size(items, _budget.get().chars)


# Filters and str methods whose result can be far longer than what they are given, with the length
# each would build from its arguments, checked before it runs.
_RESULT_LENGTH: dict[str, Callable[..., Any]] = {
    "center": lambda s, width=80, *_: width,
    "ljust": lambda s, width, *_: width,
    "rjust": lambda s, width, *_: width,
    "zfill": lambda s, width: width,
    "expandtabs": lambda s, tabsize=8: _count(s, "\t") * tabsize,
    "indent": lambda s, width=4, *_, **__: (_count(s, "\n") + 1) * (
        len(width) if isinstance(width, str) else width),
    "replace": lambda s, old, new, *_, **__: _count(s, old) * len(new),
    # The separator once an item: the filter takes the items first, str.join the separator.
    "join": lambda items_or_sep, sep_or_items="", *_, **__: len(items_or_sep) * len(sep_or_items),
    "sum": _sum_length,
    "batch": lambda items, linecount, *_, **__: _ITEM_CHARS * linecount,
    "slice": lambda items, slices, *_, **__: _ITEM_CHARS * slices,
    "format": lambda fmt, *args, **kwargs: _format_length(fmt, [*args, *kwargs.values()]),
}


def _check_result_length(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    if name in _RESULT_LENGTH:
        try:
            length = _RESULT_LENGTH[name](*args, **kwargs)
        except (TypeError, ValueError, AttributeError):  # bad arguments: the call itself says so
            return
        _check_room(length)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "%":
        _check_room(_format_length(left, right if isinstance(right, tuple) else (right,)))
    elif operator == "*" and isinstance(left, int) and isinstance(right, int):
        _check_bits(left.bit_length() + right.bit_length())
    elif operator == "*":
        sequence, times = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(times, int):
            _check_room(times * _size(sequence, _budget.get().chars))
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        _check_bits(right * (abs(left).bit_length() - 1))


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise SecurityError(f"builds an integer of more than {MAX_INT_BITS} bits (MAX_INT_BITS)")


# A filter that only the code generator writes (no template can spell its name): a step, then the
# value unchanged.
_STEP_FILTER = "step!"


def _stepped(value: T) -> T:
    _step()
    return value


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja2's code generator, with steps taken (on entering each body, after each statement, as
    a loop's `if` tests each item) and what literals, slices and `~` build charged."""

    def blockvisit(self, nodes: Iterable[jinja2.nodes.Node], frame: Frame) -> None:
        self.writeline("environment.step()")  # also when the body is empty: `{% for %}{% endfor %}`
        try:
            for node in nodes:
                self.visit(node, frame)
                self.writeline("environment.step()")
        except CompilerExit:
            pass

    def visit_Template(self, node: jinja2.nodes.Template, frame: Frame | None = None) -> None:
        # Before jinja2 collects the filters the template uses, which must include the step's.
        for loop in node.find_all(jinja2.nodes.For):
            if loop.test is not None:
                loop.test = jinja2.nodes.Filter(loop.test, _STEP_FILTER, [], [], None, None)
        super().visit_Template(node, frame)

    def _charged(self, visit: Callable[[Any, Frame], None], node: jinja2.nodes.Node, frame: Frame) -> None:
        self.write("environment.built(")
        visit(node, frame)
        self.write(")")

    def visit_Getitem(self, node: jinja2.nodes.Getitem, frame: Frame) -> None:
        if isinstance(node.arg, jinja2.nodes.Slice):  # `x[1:]` copies; an item exists already
            self._charged(super().visit_Getitem, node, frame)
        else:
            super().visit_Getitem(node, frame)

    def visit_Tuple(self, node: jinja2.nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":  # not the targets of `{% for k, v in ... %}`
            self._charged(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)

    def visit_List(self, node: jinja2.nodes.List, frame: Frame) -> None:
        self._charged(super().visit_List, node, frame)

    def visit_Dict(self, node: jinja2.nodes.Dict, frame: Frame) -> None:
        self._charged(super().visit_Dict, node, frame)

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self._charged(super().visit_Concat, node, frame)


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Filter `f`, checked for what it would build before it runs and charged for what it built."""
    value_at = 1 if hasattr(f, "jinja_pass_arg") else 0  # after the context jinja2 passes first

    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_result_length(name, args[value_at:], kwargs)
        return _built(f(*args, **kwargs))

    return bounded


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, charging the render's budget (`_Budget`) as the template runs."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})
    step = staticmethod(_step)
    built = staticmethod(_built)

    def concat(self, chunks: Iterable[str]) -> str:  # type: ignore[override]
        # Joins every buffer: a macro's output, a `{% set %}` block's, and the prompt, which arrives
        # chunk by chunk, so that endless output stops as soon as it is over the budget.
        return "".join([_built(chunk) for chunk in chunks])

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if isinstance(obj, types.BuiltinMethodType) and isinstance(obj.__self__, str):
            _check_result_length(obj.__name__, (obj.__self__, *args), kwargs)
        calls_template = isinstance(obj, (Macro, LoopContext))
        if calls_template:
            _step(_CALL_STEPS)
        budget = _budget.get()
        if budget.depth >= MAX_CALL_DEPTH:
            raise SecurityError(f"calls nested more than {MAX_CALL_DEPTH} deep (MAX_CALL_DEPTH)")
        budget.depth += 1
        try:
            result = super().call(context, obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        # What a macro, `caller()` or `loop()` returns was charged when `concat` joined it.
        return result if calls_template else _built(result)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _built(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        format_ = super().wrap_str_format(value)
        if format_ is None:
            return None

        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_room(_format_length(value.__self__, [*args, *kwargs.values()]))
            return format_(*args, **kwargs)

        return bounded


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


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    # Encoded and charged chunk by chunk, so that a value holding one long string many times over
    # stops at the budget rather than being built whole first.
    if isinstance(indent, int):  # the indent string is built before the first chunk
        _check_room(indent)
        indent = _built(" " * indent)
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                               sort_keys=sort_keys)
    return "".join([_built(chunk) for chunk in encoder.iterencode(value)])


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached: a script renders the same template once per prompt)."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"chat template: longer than {MAX_TEMPLATE_CHARS} characters (MAX_TEMPLATE_CHARS)")
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters.update({name: _bounded_filter(name, f) for name, f in env.filters.items()})
    env.filters["tojson"] = _tojson
    env.filters[_STEP_FILTER] = _stepped
    del env.globals["lipsum"]  # writes n paragraphs in one call; no chat template uses it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template: not a valid jinja2 template (line {e.lineno}: {e.message})") from e
    except (RecursionError, SyntaxError, MemoryError) as e:  # parsed by jinja2, too deep for Python
        raise ValueError(f"chat template: nested too deeply to compile ({type(e).__name__}: {e})") from e


def render(template: str, conversation: Conversation, add_generation_prompt: bool = False,
           variables: Mapping[str, Any] | None = None) -> str:
    """One normalised conversation rendered to prompt text. `variables` (special tokens such as
    `bos_token`, `tools`, extra keyword arguments) are visible to the template."""
    compiled = compile_template(template)
    token = _budget.set(_Budget())
    try:
        return compiled.render(**dict(variables or {}), messages=conversation,
                               add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:  # raise_exception() in the template, a sandbox refusal, a limit
        raise ValueError(f"chat template: {e}") from e
    except RecursionError as e:
        raise ValueError(f"chat template: nested deeper than Python's recursion limit "
                         f"({sys.getrecursionlimit()})") from e
    except MemoryError as e:
        raise ValueError("chat template: ran out of memory") from e
    except Exception as e:  # the template's own error, such as 1/0 or 'a' + 1
        raise ValueError(f"chat template: {type(e).__name__}: {e}") from e
    finally:
        _budget.reset(token)


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
