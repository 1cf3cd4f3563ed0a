"""What `/openapi.json` says beyond FastAPI's own: the error answers and event streams of the routes.

The routes document their errors in three ways, kept as they were so the schema clients and tests
are made from does not move: `errors_doc` (the chat, completions, streams and models routes: the
`ErrorBody` model), `responses_doc` (the Responses API: an inline schema, described "error, OpenAI's
shape"), and `described_errors` (the ops routes: a description only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def errors_doc(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody} for s in statuses}


COMMON_ERRORS = (401, 403, 503)
# One SSE event as OpenAPI tools read a text/event-stream body: id, event name, data (a JSON line).
SSE_EVENT: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"}, "retry": {"type": "integer"}}}
SSE_DOC: dict[str, Any] = {"content": {"text/event-stream": {"schema": SSE_EVENT}}}


def described_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"description": "error, OpenAI's shape"} for s in statuses}


_ERROR_SCHEMA: dict[str, Any] = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}}}}}
OBJECT: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
EVENTS: dict[str, Any] = {"text/event-stream": {"schema": {"type": "object", "properties": {
    "id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"}}}}}


def responses_doc(ok: dict[str, Any], *errors: int) -> dict[int | str, dict[str, Any]]:
    doc: dict[int | str, dict[str, Any]] = {200: {"description": "OK", "content": ok}}
    for status in (*errors, *COMMON_ERRORS):
        doc[status] = {"description": "error, OpenAI's shape", "content": {
            "application/json": {"schema": _ERROR_SCHEMA}}}
    return doc


def openapi_without_422(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """We answer bad input with 400 in OpenAI's shape, never FastAPI's 422."""
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema
    return build
