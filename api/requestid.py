"""X-Request-ID into the API's logs: the id nginx gives every request (the
client's own when it sends one, ops/nginx's `$req_id`) joins the proxy's
access log line to the API's.

The API keeps no access log per request (ops/serve.py: a line per request
costs under thousands of streams), so this logs one line where an operator
looks for a request: one that starts, follows or cancels a stream (with
the stream's id when the response names it, in X-Tokenfan-Stream-Id or
Location), and any 5xx. The id goes back to the
client in the response too, so a user can quote it.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

HEADER = b"x-request-id"
STREAM_HEADER = b"x-tokenfan-stream-id"
LOCATION = b"location"
# The routes that make or read streams: worth a line each.
STREAM_PATHS = ("/v1/streams", "/v1/chat/completions", "/v1/completions", "/v1/responses")
# A client may send anything: a log line quotes at most this much of it.
MAX_ID_CHARS = 200


class RequestIds:
    """Pure ASGI, like api/middleware.py: one dict lookup on requests without the header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = dict(scope["headers"]).get(HEADER) if scope["type"] == "http" else None
        if not rid:
            await self.app(scope, receive, send)
            return

        async def tagged(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                headers = [*msg.get("headers", []), (HEADER, rid)]
                named = dict(headers)
                _log(scope, rid, msg["status"], named.get(STREAM_HEADER) or _stream_of(named.get(LOCATION)))
                msg = {**msg, "headers": headers}
            await send(msg)

        await self.app(scope, receive, tagged)


def _stream_of(location: bytes | None) -> bytes | None:
    return location.rsplit(b"/", 1)[-1] if location and location.startswith(b"/v1/streams/") else None


def _log(scope: Scope, rid: bytes, status: int, stream: bytes | None) -> None:
    if status < 500 and not str(scope["path"]).startswith(STREAM_PATHS):
        return
    edge = getattr(scope["app"].state, "edge", None) if "app" in scope else None
    log.info("API %s: request %s: %s %s -> %d%s", edge.name if edge else "-",
             rid.decode(errors="replace")[:MAX_ID_CHARS], scope["method"], scope["path"], status,
             f" stream {stream.decode(errors='replace')}" if stream else "")
