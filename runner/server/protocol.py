"""Request bodies of the OpenAI API as vLLM's server reads them, and the `SamplingParams`
each becomes.

Unknown fields are ignored, as vLLM ignores them (clients send `user`, `metadata`, ...);
fields that ask for something this engine does not do are refused by name instead of being
ignored, so a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runner.sampling_params import RequestOutputKind, SamplingParams
from runner.server.errors import ApiError

# The most completions one request may ask for: each is a request in the engine, and a huge
# `n` would build them all before the first step.
MAX_N = 128
# OpenAI's range for a logit bias; vLLM clamps to it too.
MAX_LOGIT_BIAS = 100.0


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Request(BaseModel):
    """Fields both generation endpoints take: OpenAI's, plus vLLM's extensions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_tokens_as_token_ids: bool = False
    echo: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per entry: a string or a list of ints is one prompt, as OpenAI reads it."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt: expected a non-empty string, list of strings or list of token ids",
                           param="prompt")
        return list(prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... reach the template as given

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template reads them: each content one string."""
    return [{**m.model_dump(exclude_none=True), "content": _text_content(i, m.content)}
            for i, m in enumerate(messages)]


def _text_content(index: int, content: str | list[dict[str, Any]] | None) -> str:
    """A message's text; parts of type "text" joined by newlines, as vLLM joins them."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{index}].content: only text parts are supported "
                                f"(this model takes text only), got type {part.get('type')!r}",
                           param=f"messages[{index}].content")
        texts.append(part["text"])
    return "\n".join(texts)


def _refuse(request: _Request) -> None:
    """Fields asking for what this engine does not do: refused, never silently ignored."""
    refusals = {
        "echo": (request.echo, "echoing the prompt is not supported"),
        "suffix": (getattr(request, "suffix", None) is not None, "suffix is not supported"),
        "continue_final_message": (getattr(request, "continue_final_message", False),
                                   "end the conversation with the message to answer"),
        # A template from the request would run the client's code in the server; newer vLLM
        # refuses it too unless told to trust it.
        "chat_template": (getattr(request, "chat_template", None) is not None,
                          "the model's own chat template is used"),
        "response_format": ((getattr(request, "response_format", None) or {}).get("type", "text") != "text",
                            "structured (JSON) output is not implemented"),
        "tool_choice": (getattr(request, "tool_choice", None) not in (None, "none", "auto"),
                        "forced tool calls are not implemented"),
    }
    for name, (refused, why) in refusals.items():
        if refused:
            raise ApiError(400, f"{name}: {why}", param=name)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    try:
        return {int(k): max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, v)) for k, v in bias.items()}
    except ValueError:
        raise ApiError(400, "logit_bias: keys must be token ids (integers as strings)", param="logit_bias") from None


def sampling_params(request: CompletionRequest | ChatCompletionRequest, defaults: dict[str, Any]) -> SamplingParams:
    """The request's settings; a setting it leaves out takes the model's generation_config
    value (`defaults`), then vLLM's. A bad value is a 400 naming the field."""
    _refuse(request)
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs and not request.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = next((m for m in (request.max_completion_tokens, request.max_tokens, defaults.get("max_tokens"))
                           if m is not None), None)
    else:
        logprobs, max_tokens = request.logprobs, request.max_tokens
    unset = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
    chosen = {name: defaults.get(name, value) if getattr(request, name) is None else getattr(request, name)
              for name, value in unset.items()}
    try:
        return SamplingParams(
            n=request.n, best_of=request.best_of, seed=request.seed, stop=request.stop,
            stop_token_ids=request.stop_token_ids, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, logit_bias=_logit_bias(request.logit_bias),
            ignore_eos=request.ignore_eos, min_tokens=request.min_tokens, max_tokens=max_tokens,
            skip_special_tokens=request.skip_special_tokens, logprobs=logprobs,
            include_stop_str_in_output=request.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY, **chosen)
    except ValueError as e:
        raise ApiError(400, str(e), param=field_of(str(e))) from None


def field_of(message: str) -> str | None:
    """The setting an engine message names (`SamplingParams.top_p: ...`), for OpenAI's `param`."""
    found = re.search(r"SamplingParams\.(\w+)", message)
    return found.group(1) if found else None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int]


class CollectiveRpcRequest(BaseModel):
    method: str
    timeout: float | None = None
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] | None = None
