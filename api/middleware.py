"""Pure ASGI middleware: cheap enough to sit in front of every token stream."""

from __future__ import annotations

import json
from typing import Any

import anyio
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenfan.api.errors import openai_error_body
from tokenfan.shared.defaults import MAX_JSON_DEPTH

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A JSON body up to this size is checked on the event loop (microseconds); a larger one in a thread.
INLINE_JSON_BYTES = 64 * 1024


def error_json(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    """OpenAI's error body, for answers made below the app (its exception handlers are not reached)."""
    return orjson.dumps(openai_error_body(message, type, code))


class BodyLimit:
    """A request body, read whole before the app: 413 past the cap, 400 `invalid_json` for JSON that is not.

    The cap holds by Content-Length at once and by counting what arrives, so a
    chunked body gets the same 413 as a declared one (the app's body parser
    turned an exception raised mid-read into a 400 of its own). The connection
    stays open after a 413, so a client that writes its whole body before it
    reads (httpx does) reads the answer; ops/protocol.py's body timeout bounds
    the drain.

    A JSON body (by its content type) is checked with the parser the app uses
    (Starlette's `json.loads`), as strict UTF-8 and at most `MAX_JSON_DEPTH`
    deep, so every way JSON can be malformed, undecodable, nested to blow the
    parser's recursion or carry a number past Python's 4,300 digits answers
    `invalid_json` and the app's own parse cannot fail. That parse is then a
    second one: about 10 us for a 1 KB chat request, nothing beside a stream.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        body = await self._read(receive)
        if body is None:
            await self._too_large(send)
            return
        if not body.complete:
            return  # the client left while sending: nobody to answer
        json_body = body.data and is_json(headers.get(b"content-type", b""))
        problem = await _json_problem_of(body.data) if json_body else None
        if problem:
            await send_json(send, 400, error_json(f"the body is not valid JSON: {problem}", "invalid_json"))
            return
        await self.app(scope, _replay(body.data, receive), send)

    async def _read(self, receive: Receive) -> _Body | None:
        """The whole body, or None as soon as it passes the cap."""
        parts: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return _Body(b"".join(parts), complete=False)
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return None
            parts.append(chunk)
            if not msg.get("more_body", False):
                return _Body(b"".join(parts), complete=True)

    async def _too_large(self, send: Send) -> None:
        await send_json(send, 413, error_json(f"the request body is larger than {self.max_bytes} bytes",
                                            "payload_too_large"))


class _Body:
    __slots__ = ("complete", "data")

    def __init__(self, data: bytes, *, complete: bool) -> None:
        self.data = data
        self.complete = complete


def _replay(data: bytes, receive: Receive) -> Receive:
    """The body in one message, then whatever the connection says next (a disconnect, for the SSE responses)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    return replayed


async def send_json(send: Send, status: int, body: bytes, retry_after: int | None = None) -> None:
    """A whole JSON answer from a middleware."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if retry_after is not None:
        headers.append((b"retry-after", b"%d" % retry_after))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json_problem_of(data: bytes) -> str | None:
    """`_json_problem`, in a worker thread for a body past `INLINE_JSON_BYTES` (about 10 ms a megabyte
    on the event loop otherwise, every stream of the process waiting behind it)."""
    if len(data) <= INLINE_JSON_BYTES:
        return _json_problem(data)
    return await anyio.to_thread.run_sync(_json_problem, data)


def is_json(content_type: bytes) -> bool:
    """As FastAPI decides to parse a body as JSON: application/json or application/*+json."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _json_problem(data: bytes) -> str | None:
    """What is wrong with a JSON body, or None: the message names the kind of fault, never echoes the input."""
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        return f"it is not UTF-8 (byte {exc.start})"
    except _NotJson as exc:
        return str(exc)
    except json.JSONDecodeError as exc:
        return exc.msg + f" (line {exc.lineno}, column {exc.colno})"
    except RecursionError:
        return f"it is nested deeper than {MAX_JSON_DEPTH} levels"
    except ValueError:  # int() of a number past sys.get_int_max_str_digits()
        return "a number in it has too many digits"
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and _deeper_than(doc, MAX_JSON_DEPTH):
        return f"it is nested deeper than {MAX_JSON_DEPTH} levels"
    return None


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    """Python's json reads NaN and Infinity, which JSON has not (nor OpenAI, nor orjson when a job is stored)."""
    raise _NotJson(f"{name} is not a JSON value")


def _deeper_than(doc: Any, limit: int) -> bool:
    """Whether arrays and objects nest past `limit` (no recursion of our own: the walk is a stack)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


class RequestMetrics:
    """tokenfan_api_requests_total{route,status}, labelled by the route's template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        finally:
            _count(scope, status)


def _count(scope: Scope, status: int) -> None:
    app = scope.get("app")
    edge = getattr(getattr(app, "state", None), "edge", None)
    if edge is None:
        return
    route = scope.get("route")
    path = getattr(route, "path", None) or "unmatched"
    edge.metrics.requests.labels(path, str(status)).inc()
