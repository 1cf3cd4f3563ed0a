"""Request bodies checked off the event loop (issue 27).

A request model's validators convert its schemas and tools (shared/schema.py),
which can take seconds for a large `response_format`: run by FastAPI on the
event loop, one such body froze every stream of its API (16 s for 961 KB).
`CheckedBodyRoute` checks a route's body first, in a worker thread (at most
`PARSE_THREADS` at once a process), with what the route itself does first
(a legacy completion's or a Responses request's chat request), against the
grammar limits of the API's settings (`GRAMMAR_LIMITS`); then
FastAPI's own validation on the loop skips those conversions
(`COSTLY_CHECKED`): it runs the cheap rest again and makes the objects the
route gets.

Deliberate departures from the obvious:
- the caller is authenticated and its rate asked before the body is read:
  a key past its rpm gets its 429 without costing any parsing, and a refusal
  whose checks took a thread more than `PARSE_COUNTED_S` counts in its minute
  like an admitted request (issue 27: twelve costly 400s in a row passed a
  limit of ten a minute).
- the route keeps its body model in its signature, so the OpenAPI schema
  (and the clients and tests made from it) is FastAPI's as before.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from tokenfan.api.edge import Edge
from tokenfan.api.middleware import is_json
from tokenfan.shared.defaults import PARSE_COUNTED_S
from tokenfan.shared.schema import COSTLY_CHECKED, GRAMMAR_LIMITS
from tokenfan.shared.structured import Limits

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class CheckedBodyRoute(APIRoute):
    """A route whose one JSON body model is checked in a worker thread before FastAPI sees it."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        model = _body_model(self)
        if model is None:
            return handler

        async def checked(request: Request) -> Response:
            await check_body(request, model)
            return await handler(request)

        return checked


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    params = route.dependant.body_params
    kind = params[0].field_info.annotation if len(params) == 1 else None
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


async def check_body(request: Request, model: type[BaseModel]) -> None:
    """Authenticate, refuse a key past its rate, then check the body in a thread: its errors are
    raised as FastAPI would raise them (the app's handlers answer them the same way)."""
    edge: Edge = request.app.state.edge
    GRAMMAR_LIMITS.set(Limits.of(edge.settings))  # for the thread below and the route's own validation
    who = await edge.auth.principal(request)
    await edge.admission.check_rate(who)
    if not is_json(request.headers.get("content-type", "application/json").encode("latin-1")):
        return  # not parsed as JSON by FastAPI either: its own validation refuses it, cheaply
    raw = await request.body()
    t0 = time.monotonic()
    try:
        await anyio.to_thread.run_sync(_check, model, raw, limiter=edge.parse_limiter)
    except BaseException:
        if time.monotonic() - t0 > PARSE_COUNTED_S:
            await edge.admission.count(who)
        raise
    COSTLY_CHECKED.set(True)


def _check(model: type[BaseModel], raw: bytes) -> None:
    """In a worker thread: the body as FastAPI validates it, then what the route does with it first."""
    if not raw:
        return  # FastAPI answers a missing body itself
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return  # FastAPI's own parse refuses it (a body sent without a JSON content type: unchecked below)
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    to_chat = getattr(req, "to_chat", None)
    if callable(to_chat):
        to_chat()
