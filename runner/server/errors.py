"""Errors as OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`, with vLLM's
type names. Every error the app answers goes through here, FastAPI's own included: its
validation errors (a 422 with its own body by default) become 400s naming the field."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger("runner.server")

ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
               409: "ConflictError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """An error answered with `status` (the request's fault, or the server's state)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": param,
                      "code": status}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param), status_code=error.status)


def validation_error(errors: list[Any]) -> ApiError:
    """The first of pydantic's errors as one line that names its field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [part for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg"))
        return ApiError(400, f"the body is not valid JSON: {detail}")
    if not loc:
        return ApiError(400, f"body: {first.get('msg')}; expected a JSON object")
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return ApiError(400, f"{path}: {first.get('msg')}", param=str(loc[0]))


def install(app: FastAPI) -> None:
    async def on_api_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ApiError)
        return error_response(error)

    async def on_validation(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return error_response(validation_error(list(error.errors())))

    async def on_http(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        return error_response(ApiError(error.status_code, str(error.detail)))

    async def on_anything(_: Request, error: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=error)
        return error_response(ApiError(500, f"{type(error).__name__}: {error}"))

    app.add_exception_handler(Exception, on_anything)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
