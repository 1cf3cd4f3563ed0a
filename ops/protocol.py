"""The API's HTTP/1.1 protocol: uvicorn's httptools protocol with bounds on what a client may hold.

uvicorn bounds none of these (0.54: `h11_max_incomplete_event_size` exists for
h11 only, and no timeout runs before a request's headers are in), so an API
reached without a proxy, or through one that lets them pass, was held by a
64 MB header or by a connection that sent a byte every ten seconds. nginx's
`large_client_header_buffers`, `client_header_timeout` and
`client_body_timeout` are the model; each bound answers in OpenAI's error
shape and closes the connection:

- the request line and headers: at most `max_header_bytes` received before
  they are complete, else 431 (414 when the request line alone is that long).
  Counted per read, after the parser has seen it, so one connection holds at
  most the bound plus one read (uvloop reads 256 KB at a time); and a head
  that came whole in one read is measured from the parser's own pieces (its
  URL, each header's name and value) before the app sees it (issue 27: a
  126 KB head in one read was accepted).
- their time: `header_timeout_s` from the connection's start (a connection that
  sends nothing is closed without an answer), or on a kept-alive connection
  from the next request's first byte: an idle kept-alive connection is
  uvicorn's `timeout_keep_alive`, as before.
- the body's time: `body_timeout_s` for the whole body from the end of the
  headers (408 when no response has started, else just the close: a request
  that promised a body and got its answer without it is not answered twice).
  nginx times the gap between two reads, which a byte every few seconds
  never trips.
- HTTP/1.0: uvicorn answers it with chunks (1.0 has none: RFC 9112, 6.1) and
  `connection: close` beside the app's own `keep-alive`: a response without a
  length is sent as 1.0 frames it, ended by the close, under one
  `connection: close`.

Deliberate departures from the obvious:
- one timer per connection, re-armed per phase, not a task: a timer handle
  costs nothing while it waits, and a bodiless request arms and cancels it in
  the same read.
- the body timer still runs after a response completes while the body goes
  on (a 413 keeps the connection alive, so a client that writes its whole
  body before reading, as httpx does, gets to read it): the timer is what
  bounds such a drain.
- a timer that fires while a response is streaming on the connection (a
  client that pipelines a slow second request behind a stream) closes it
  without writing: an answer in the middle of a response would corrupt it.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from tokenfan.api.middleware import error_json

log = logging.getLogger(__name__)

# What the parser's pieces leave out: a header's ": " and line end; the request line's method, spaces
# and version (a lower bound: the test is that the bound holds, not its last byte).
HEADER_FRAMING = 4
LINE_FRAMING = 14


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded; `guarded()` makes one per set of limits."""

    limits: Limits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request line or headers
        self._head_bytes = 0
        self._line_ended = False  # a line break was seen in this head: past the request line
        self._got_bytes = False
        self._timer: asyncio.TimerHandle | None = None
        self._parsed = 0  # this head's bytes as the parser handed them over
        self._refused = False  # a head refused: nothing more of this connection reaches the app

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._in_head:
            self._head_bytes += len(data)
            self._line_ended = self._line_ended or b"\n" in data
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
            self._head_too_large()

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._parsed = LINE_FRAMING
        super().on_message_begin()
        if self._timer is None:  # a kept-alive connection's next request: timed from its first byte
            self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            self._parsed += len(url)
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            self._parsed += len(name) + len(value) + HEADER_FRAMING
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if self._parsed > self.limits.max_header_bytes:  # it came in one read: the app never sees it
            self._refused = True
            self._head_too_large()
            return
        self._in_head = False
        self._head_bytes = 0
        self._line_ended = False
        self._arm(self.limits.body_timeout_s, self._body_timed_out)
        super().on_headers_complete()
        if self.parser.get_http_version() == "1.0" and self.cycle is not None:
            _frame_as_http10(self.cycle)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_too_large(self) -> None:
        if self._line_ended:
            self._refuse(431, "headers_too_large", f"the request's headers are larger than "
                         f"{self.limits.max_header_bytes} bytes")
        else:
            self._refuse(414, "uri_too_long", f"the request line is longer than {self.limits.max_header_bytes} bytes")

    def _head_timed_out(self) -> None:
        self._timer = None
        if not self._got_bytes:  # nothing was ever sent: not an HTTP client worth an answer
            self.transport.close()
            return
        self._refuse(408, "request_timeout", f"the request's headers did not arrive within "
                     f"{self.limits.header_timeout_s:g} s")

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.cycle is not None and self.cycle.response_started:  # answered without its body: just close
            log.info("API: the body promised by %s never came after its response; closing the connection",
                     _peer(self.client))
            self.transport.close()
            return
        self._refuse(408, "request_timeout", f"the request body did not arrive within "
                     f"{self.limits.body_timeout_s:g} s")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer (unless a response is under way on this connection) and close."""
        if self.transport.is_closing():
            return
        log.info("API: %s from %s: %s; closing the connection", status, _peer(self.client), message)
        cycle = self.cycle
        busy = cycle is not None and cycle.response_started and not cycle.response_complete
        if not busy:
            self.transport.write(_response(status, code, message))
        if cycle is not None and not cycle.response_complete:
            # The app may still be reading the body or writing: it sees a disconnect and its
            # writes go nowhere, exactly as when the client leaves.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def _frame_as_http10(cycle: RequestResponseCycle) -> None:
    """An HTTP/1.0 request's response: one `connection` header (uvicorn's close: 1.0 keeps no
    connection alive here), and a body without a length sent as is, ended by the close, not in
    chunks. uvicorn's cycle skips its chunking when `chunked_encoding` is decided (False) before
    the response starts, and checks each body part against `expected_content_length`."""
    send = cycle.send
    unframed = False

    async def send_http10(message: Any) -> None:
        nonlocal unframed
        if message["type"] == "http.response.start":
            headers = [(n, v) for n, v in message.get("headers", []) if n.lower() != b"connection"]
            message = {**message, "headers": headers}
            unframed = not any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers)
            if unframed:
                cycle.chunked_encoding = False
        elif message["type"] == "http.response.body" and unframed:
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    setattr(cycle, "send", send_http10)  # noqa: B010 (an instance's bound method, replaced before the app runs)


def guarded(limits: Limits) -> type[GuardedProtocol]:
    """A protocol class with these limits, for uvicorn's `http=` (it wants a class, not a factory)."""
    return type("GuardedHttpToolsProtocol", (GuardedProtocol,), {"limits": limits})


def _response(status: int, code: str, message: str) -> bytes:
    body = error_json(message, code)
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
