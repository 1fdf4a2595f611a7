"""The FastAPI app: vLLM's OpenAI-compatible routes over one `AsyncLLM`.

- POST /v1/completions, /v1/chat/completions: generation; `stream` as server-sent events
- GET /v1/models: the served model names; GET /health: 200 while the engine runs, else 503
- POST /tokenize, /detokenize: text <-> token ids with the model's tokenizer
- GET /metrics: Prometheus text (`runner.server.metrics`)
- only with `enable_control_endpoints` (vLLM's development mode): POST /sleep, /wake_up,
  /pause, /resume, /reset_prefix_cache, /collective_rpc; GET /is_sleeping, /is_paused
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from runner.async_llm import AsyncLLM
from runner.server import errors
from runner.server.errors import ApiError
from runner.server.generation import ServerState, chat_completions, chat_prompt, completions
from runner.server.metrics import ServerMetrics
from runner.server.protocol import (ChatCompletionRequest, CollectiveRpcRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest)
from runner.server.streams import until_disconnected


async def _unless_disconnected(raw: Request, endpoint: str, state: ServerState,
                               handler: Callable[[], Awaitable[Response]]) -> Response:
    """Run `handler`, cancelling it if the client goes away first (vLLM's `with_cancellation`):
    a non-streamed request's generation is aborted, not finished for nobody. A stream
    returned by the handler watches for the client itself."""
    work = asyncio.ensure_future(handler())
    watch = asyncio.ensure_future(until_disconnected(raw.receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled():
        state.metrics.http.labels(endpoint=endpoint, status="499").inc()
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    try:
        response = work.result()
    except Exception as e:  # noqa: BLE001 - every error is answered in OpenAI's shape
        response = errors.error_response(await state.api_error(e))
    state.metrics.http.labels(endpoint=endpoint, status=str(response.status_code)).inc()
    return response


def _json_safe(value: Any) -> Any:
    """A collective_rpc result as JSON: as is when it encodes, else its repr."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def build_app(llm: AsyncLLM, model_names: list[str], defaults: dict[str, Any] | None = None,
              enable_control_endpoints: bool = False) -> FastAPI:
    """The app serving `llm` as `model_names` (the first is the id responses carry);
    `defaults` are the model's generation_config settings, used where a request sets none."""
    app = FastAPI(title="runner", description="OpenAI-compatible server (vLLM's routes)")
    errors.install(app)
    state = ServerState(llm, list(model_names), dict(defaults or {}), ServerMetrics(model_names[0]))
    app.state.server = state
    created = int(time.time())

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, "completions", state, lambda: completions(state, body))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, "chat", state, lambda: chat_completions(state, body))

    @app.get("/v1/models")
    async def show_models() -> dict[str, Any]:
        max_len = llm.config.scheduler_config.max_model_len
        root = llm.config.model_config.model
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "runner", "root": root,
             "parent": None, "max_model_len": max_len, "permission": []} for name in state.model_names]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if llm.is_running else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await state.metrics.render(llm), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.model_for(body.model)
        tokenizer = state.tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "expected exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = chat_prompt(tokenizer, body.messages, body.add_generation_prompt)[1]
        else:
            try:
                ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
            except ValueError as e:
                raise ApiError(400, f"prompt: {e}", param="prompt") from None
        strs = [tokenizer.decode([t]) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": llm.config.scheduler_config.max_model_len,
                "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        state.model_for(body.model)
        tokenizer = state.tokenizer()
        vocab = llm.config.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    if enable_control_endpoints:
        _add_control_endpoints(app, llm)
    return app


async def _control(call: Awaitable[Any]) -> Any:
    """A lifecycle call's result; its refusal as a 400 (a bad value) or a 409 (requests in
    flight, or the engine in the wrong state for it)."""
    try:
        return await call
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    except RuntimeError as e:
        raise ApiError(409, str(e)) from None


def _add_control_endpoints(app: FastAPI, llm: AsyncLLM) -> None:
    """vLLM's development-mode routes, for training loops that drive the server."""

    @app.post("/sleep")
    async def sleep(level: int = 1) -> Response:
        await _control(llm.sleep(level))
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up(tags: Annotated[list[str] | None, Query()] = None) -> Response:
        await _control(llm.wake_up(tags))
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict[str, bool]:
        return {"is_sleeping": await llm.is_sleeping()}

    @app.post("/pause")
    async def pause(mode: str = "abort", clear_cache: bool = False) -> Response:
        # Returns once paused: with mode=wait, once the requests in flight have finished.
        await _control(llm.pause_generation(mode=mode, clear_cache=clear_cache))
        return Response(status_code=200)

    @app.post("/resume")
    async def resume() -> Response:
        await _control(llm.resume_generation())
        return Response(status_code=200)

    @app.get("/is_paused")
    async def is_paused() -> dict[str, bool]:
        return {"is_paused": await llm.is_paused()}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict[str, bool]:
        # False while requests run (their blocks stay in use), as vLLM's engine answers.
        return {"success": bool(await _control(llm.reset_prefix_cache()))}

    @app.post("/collective_rpc")
    async def collective_rpc(body: CollectiveRpcRequest) -> JSONResponse:
        results = await _control(llm.collective_rpc(body.method, body.timeout, tuple(body.args), body.kwargs))
        return JSONResponse({"results": [_json_safe(r) for r in results]})
