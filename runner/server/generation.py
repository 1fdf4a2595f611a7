"""`/v1/completions` and `/v1/chat/completions`: a request's prompts into the engine, its
outputs back as one JSON body or as server-sent events.

The engine admits (or refuses) every prompt before any byte is sent: a refused prompt is a
400 with OpenAI's error body, not an error event inside a 200 stream. Errors after that
(the engine failing mid-run) arrive as a `data: {"error": ...}` event, as in vLLM.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response

from runner.async_llm import AsyncLLM, EngineDeadError
from runner.engine.outputs import CompletionOutput, RequestOutput
from runner.formats.tokenizer import Tokenizer
from runner.server import responses as shapes
from runner.server.errors import ApiError, error_body
from runner.server.metrics import ServerMetrics
from runner.server.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, conversation, field_of,
                                    sampling_params)
from runner.server.streams import EventStream, Requests

logger = logging.getLogger("runner.server")


@dataclasses.dataclass
class ServerState:
    llm: AsyncLLM
    model_names: list[str]
    defaults: dict[str, Any]  # the model's generation_config settings
    metrics: ServerMetrics

    def model_for(self, requested: str | None) -> str:
        if requested is not None and requested not in self.model_names:
            raise ApiError(404, f"The model `{requested}` does not exist.", param="model")
        return requested or self.model_names[0]

    def tokenizer(self) -> Tokenizer:
        tokenizer = self.llm.get_tokenizer()
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer (no tokenizer.json in its folder): "
                                "send token ids to /v1/completions")
        return tokenizer

    async def api_error(self, error: BaseException) -> ApiError:
        """What to answer for an error raised while serving a request."""
        if isinstance(error, ApiError):
            return error
        if isinstance(error, ValueError):  # the request's own fault, found by the engine
            return ApiError(400, str(error), param=field_of(str(error)))
        if isinstance(error, EngineDeadError) or not self.llm.is_running:
            return ApiError(503, f"the engine is not running: {error}")
        if isinstance(error, RuntimeError) and await self.llm.is_sleeping():
            return ApiError(503, f"the engine is asleep; POST /wake_up first ({error})")
        logger.error("request failed", exc_info=error)
        return ApiError(500, f"{type(error).__name__}: {error}")


def _check_context(state: ServerState, prompts: list[Any], max_tokens: int | None) -> None:
    """A completion that cannot fit the context is a 400, as vLLM's server answers (the
    engine alone would stop it at max_model_len with finish_reason "length"). A prompt that
    does not fit by itself is left to the engine, whose message names it."""
    tokenizer = state.llm.get_tokenizer()
    max_len = state.llm.config.scheduler_config.max_model_len
    for prompt in prompts if max_tokens is not None else ():
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else prompt
        if isinstance(ids, str):
            if tokenizer is None:
                continue
            ids = tokenizer.encode(ids)
        if len(ids) <= max_len < len(ids) + max_tokens:
            raise ApiError(400, f"This model's maximum context length is {max_len} tokens. However, you "
                                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} "
                                "in the completion). Please reduce the length of the prompt or completion.",
                           param="max_tokens")


async def _start(state: ServerState, prompts: list[Any], request: CompletionRequest | ChatCompletionRequest,
                 prefix: str) -> tuple[Requests, str]:
    params = sampling_params(request, state.defaults)
    _check_context(state, prompts, params.max_tokens)
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    requests = Requests(state.llm, prompts, params, request_id, state.metrics)
    try:
        await requests.started()
    except BaseException as e:
        requests.close()
        if isinstance(e, Exception):
            raise await state.api_error(e) from e
        raise
    return requests, request_id


async def _finals(state: ServerState, requests: Requests) -> list[RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    try:
        async for index, out in requests.outputs():
            finals[index] = out
    except Exception as e:
        raise await state.api_error(e) from e
    finally:
        requests.close()
    return [finals[i] for i in sorted(finals)]


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    return shapes.usage(sum(len(o.prompt_token_ids) for o in outputs),
                        sum(len(c.token_ids) for o in outputs for c in o.outputs))


async def completions(state: ServerState, request: CompletionRequest) -> Response:
    model = state.model_for(request.model)
    requests, request_id = await _start(state, request.prompts(), request, "cmpl")
    tokenizer, as_ids, created = state.llm.get_tokenizer(), request.return_tokens_as_token_ids, int(time.time())
    if request.stream:
        def chunk(index: int, c: CompletionOutput, offset: int, finished: bool) -> dict[str, Any]:
            logprobs = shapes.completion_logprobs(c, offset, as_ids, tokenizer)
            return {"choices": [shapes.completion_choice(index, c, logprobs, finished)]}
        head = {"id": request_id, "object": "text_completion", "created": created, "model": model}
        return EventStream(_events(requests, request, head, chunk), requests.close)
    outputs = await _finals(state, requests)
    choices = [shapes.completion_choice(i * request.n + c.index, c,
                                        shapes.completion_logprobs(c, 0, as_ids, tokenizer), True)
               for i, out in enumerate(outputs) for c in out.outputs]
    return JSONResponse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": _usage(outputs)})


def chat_prompt(tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None,
                template_kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
    """The conversation rendered with the model's chat template, as text and token ids."""
    try:
        text = tokenizer.apply_chat_template(conversation(messages), tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))
        # The template writes every special token itself: encode without adding more.
        return text, tokenizer.encode(text, add_special_tokens=False)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None


async def chat_completions(state: ServerState, request: ChatCompletionRequest) -> Response:
    model = state.model_for(request.model)
    tokenizer = state.tokenizer()
    text, ids = chat_prompt(tokenizer, request.messages, request.add_generation_prompt, request.tools,
                            request.chat_template_kwargs)
    requests, request_id = await _start(state, [{"prompt": text, "prompt_token_ids": ids}], request, "chatcmpl")
    as_ids, top, created = request.return_tokens_as_token_ids, request.top_logprobs or 0, int(time.time())
    if request.stream:
        def chunk(index: int, c: CompletionOutput, offset: int, finished: bool) -> dict[str, Any]:
            logprobs = shapes.chat_logprobs(c, top, as_ids, tokenizer)
            delta = {"content": c.text} if c.text or not finished else {}
            if not finished:
                return {"choices": [shapes.chat_delta(index, delta, logprobs)]}
            return {"choices": [shapes.chat_delta(index, delta, logprobs, c.finish_reason, c.stop_reason,
                                                  shapes.weight_versions(c))]}
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
        roles = [{**head, "choices": [shapes.chat_delta(i, {"role": "assistant", "content": ""})]}
                 for i in range(request.n)]
        return EventStream(_events(requests, request, head, chunk, roles), requests.close)
    outputs = await _finals(state, requests)
    choices = [shapes.chat_choice(c.index, c, shapes.chat_logprobs(c, top, as_ids, tokenizer))
               for c in outputs[0].outputs]
    return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": _usage(outputs), "prompt_logprobs": None})


Chunk = Callable[[int, CompletionOutput, int, bool], dict[str, Any]]


async def _events(requests: Requests, request: CompletionRequest | ChatCompletionRequest, head: dict[str, Any],
                  chunk: Chunk, first: list[dict[str, Any]] | None = None) -> AsyncIterator[str]:
    """The stream's events: one per choice that has news, a usage event when asked, [DONE]."""
    sent_text: dict[int, int] = defaultdict(int)  # per choice, for completions' text_offset
    done: set[int] = set()
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0
    for event in first or []:
        yield shapes.sse(event)
    try:
        async for i, out in requests.outputs():
            prompt_tokens.setdefault(i, len(out.prompt_token_ids))
            for c in out.outputs:
                index = i * request.n + c.index
                finished = c.finish_reason is not None
                if index in done or not (c.token_ids or c.text or finished):
                    continue  # a choice that ended earlier, or nothing new
                completion_tokens += len(c.token_ids)
                event = {**head, **chunk(index, c, sent_text[index], finished)}
                sent_text[index] += len(c.text)
                if finished:
                    done.add(index)
                if request.continuous_usage:
                    event["usage"] = shapes.usage(sum(prompt_tokens.values()), completion_tokens)
                yield shapes.sse(event)
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream, as vLLM does
        status = 400 if isinstance(e, ValueError) else 500
        if status == 500:
            logger.error("stream failed", exc_info=e)
        yield shapes.sse(error_body(status, f"{type(e).__name__}: {e}" if status == 500 else str(e)))
    if request.include_usage:
        yield shapes.sse({**head, "choices": [], "usage": shapes.usage(sum(prompt_tokens.values()),
                                                                        completion_tokens)})
    yield shapes.sse("[DONE]")
