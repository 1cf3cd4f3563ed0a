"""Errors at the edge: the one builder of OpenAI's error body, and the app's handlers that map our
typed errors (shared/errors.py), FastAPI's validation errors, Redis failures and Starlette's routing
errors onto it with their status.

Every error the API answers or streams is OpenAI's shape, built by `openai_error_body`: a JSON
answer (`error_response`), an answer made below the app by a middleware (api/middleware.py's
`error_json`), and the last event of an OpenAI-format stream (api/formats.py's `openai_error`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenfan.shared.defaults import REDIS_RETRY_S
from tokenfan.shared.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    TokenfanError,
    Unavailable,
)
from tokenfan.shared.schema import ParamError

log = logging.getLogger(__name__)
# Starlette's own HTTP errors, as our classes (which carry the status).
ROUTE_ERRORS: dict[int, type[TokenfanError]] = {404: NotFound, 405: MethodNotAllowed}


def openai_error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, its fields in OpenAI's order: what every error of the API says."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: TokenfanError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(openai_error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status,
                        headers=headers)


# Pydantic names the member of a union (or the validator) it tried in an error's location:
# `messages.0.content.function-after[_unicode(), str]`. A client needs only the field.
_TYPE_TAG = re.compile(r"^(?:[\w-]+\[.*\]|str|int|float|bool)$")


# ... and, in a list of a tagged union, the tag it chose, right after the item's index: the message's
# role in `messages.0.user.content`. By position, whatever the tag's value.
_TAGGED_LISTS = frozenset({"messages", "input"})


def _field_path(loc: Any) -> list[str]:
    parts = [p for p in loc if p != "body" and not _TYPE_TAG.match(str(p))]
    tag = 2 if len(parts) > 2 and parts[0] in _TAGGED_LISTS and isinstance(parts[1], int) else -1
    return [str(p) for i, p in enumerate(parts) if i != tag]


def add_handlers(app: FastAPI) -> None:
    @app.exception_handler(TokenfanError)
    async def tokenfan_error(request: Request, exc: TokenfanError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The deepest error is the most specific: for a union (a string or a list of parts) it is
        # the member that got furthest, not "Input should be a valid string".
        first: dict[str, Any] = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={})
        loc = _field_path(first.get("loc", ()))
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            return error_response(InvalidRequest("the body is not valid JSON", code="invalid_json"))
        cause = first.get("ctx", {}).get("error")
        param: str | None
        if isinstance(cause, ParamError):  # a check of the whole request, about one field: named by it
            param = ".".join([*loc, cause.param])
            text = f"{'.'.join(loc)}.{msg}" if loc else msg
        else:
            param = ".".join(loc) or None
            text = f"{param}: {msg}" if param else msg
        return error_response(InvalidRequest(text, code="invalid_value", param=param))

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("API: Redis failed during %s %s: %s", request.method, request.url.path, exc)
        return error_response(Unavailable("Redis is unreachable; try again shortly", code="redis_unavailable",
                                          retry_after=REDIS_RETRY_S))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's routing raises these (unknown path, wrong method); our own code raises ours.
        cls = ROUTE_ERRORS.get(exc.status_code, InvalidRequest if exc.status_code < 500 else TokenfanError)
        return error_response(cls(str(exc.detail)))
