"""The benchmark's client process: many HTTP/1.1 connections on one asyncio loop.

`tokenfan bench` starts it as `python -m tokenfan.bench.client`, sends
one JSON object (the job) as the first line of stdin, and reads JSON lines
back from stdout (`created`, `ready`, `result`); later stdin lines are
commands (`connect`). It runs in a process of its own so that what the
client costs is never charged to the API process being measured.

Deliberate departures from the obvious:
- no HTTP library: an `asyncio.Protocol` parses the status line and chunked
  bodies itself, because a general client (httpx) costs tens of
  microseconds per event and would be the bottleneck at 20,000 events/s;
- SSE is parsed by httpx-sse all the same, the one parser of every tokenfan
  client: its line splitter and decoder, fed from the protocol (its
  `EventSource` wants an httpx response, and those classes are not
  exported, hence the pinned version). They cost more CPU than the
  hand-made parser they replace (about 3-5 against 2-3 µs an event,
  measured on a busy machine), in this process, not the API's.
- every read is stamped with `time.time()` in `data_received`, the moment
  the loop hands over the bytes, so relay latency is worker publish time
  (`ts` in the event) to the client's receipt on the same clock;
- one connection per request (`Connection: close`), the same for every
  server the bench compares.
"""

from __future__ import annotations

import asyncio
import codecs
import sys
import time
import zlib
from array import array
from collections.abc import Callable
from typing import Any

import orjson
from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from tokenfan.bench.stats import summary

# Connections being opened at once: keeps the server's accept backlog from overflowing.
CONNECT_CONCURRENCY = 32
# Stream creations in flight at once.
CREATE_CONCURRENCY = 32
# A creation answered 503 (Redis pool, queue bound) is retried, with backoff, this many times in all.
CREATE_ATTEMPTS = 5
# Bucket width of the delivered-events histogram.
BUCKETS_PER_S = 10


class SSEParser:
    """Bytes in, httpx-sse's events out; its decoders accept LF, CRLF and CR line ends."""

    __slots__ = ("events", "lines", "text")

    def __init__(self) -> None:
        self.text = codecs.getincrementaldecoder("utf-8")()
        self.lines = SSELineDecoder()
        self.events = SSEDecoder()

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        text = self.text.decode(data)
        if not text:
            return []
        # No data, no event (the spec); httpx-sse 0.4 yields one per ping after an id (httpx-sse#35).
        return [ev for ev in map(self.events.decode, self.lines.decode(text)) if ev is not None and ev.data]


class Handler:
    """What a connection reports to; subclasses keep what they measure."""

    status = 0
    headers: dict[bytes, bytes]

    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status, self.headers = status, headers

    def on_body(self, now: float, data: bytes) -> bool:
        """Consume body bytes; True when the handler wants the connection closed."""
        return False

    def on_end(self, exc: Exception | None) -> None:
        pass


class HttpConn(asyncio.Protocol):
    """One HTTP/1.1 exchange: head, then a chunked, sized or read-to-EOF body."""

    def __init__(self, handler: Handler, request: bytes, closed: asyncio.Future[None]) -> None:
        self.h = handler
        self.request = request
        self.closed = closed
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_head = True
        self.chunked = False
        self.length = -1
        self.left = 0  # body bytes left in the current chunk
        self.crlf = 0  # bytes of the CRLF after a chunk still to skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buf += data
        if self.in_head and not self._head():
            return
        if self._body(now) and self.transport is not None:
            self.transport.close()

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[: end + 4]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self.length = int(headers.get(b"content-length", b"-1"))
        self.in_head = False
        self.h.on_head(int(lines[0].split()[1]), headers)
        return True

    def _body(self, now: float) -> bool:
        if not self.chunked:
            data = bytes(self.buf)
            self.buf.clear()
            if self.length >= 0:
                self.length -= len(data)
            return self.h.on_body(now, data) or self.length == 0
        out, ended = self._dechunk()
        stop = bool(out) and self.h.on_body(now, out)
        return stop or ended

    def _dechunk(self) -> tuple[bytes, bool]:
        out = bytearray()
        buf = self.buf
        while buf:
            if self.left:
                take = min(self.left, len(buf))
                out += buf[:take]
                del buf[:take]
                self.left -= take
                self.crlf = 0 if self.left else 2
                continue
            if self.crlf:
                take = min(self.crlf, len(buf))
                del buf[:take]
                self.crlf -= take
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                break
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            del buf[: eol + 2]
            if size == 0:
                return bytes(out), True
            self.left = size
        return bytes(out), False

    def connection_lost(self, exc: Exception | None) -> None:
        self.h.on_end(exc)
        if not self.closed.done():
            self.closed.set_result(None)


def request_bytes(method: str, path: str, host: str, port: int, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             "Accept: text/event-stream, application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def exchange(host: str, port: int, handler: Handler, request: bytes) -> None:
    """Open a connection, send `request`, wait until the connection is closed."""
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    try:
        await loop.create_connection(lambda: HttpConn(handler, request, closed), host, port)
    except OSError as exc:
        handler.on_end(exc)
        return
    await closed


# --- handlers ---------------------------------------------------------------

class Body(Handler):
    """A plain response, collected whole."""

    def __init__(self) -> None:
        self.data = bytearray()

    def on_body(self, now: float, data: bytes) -> bool:
        self.data += data
        return False

    def json(self) -> Any:
        return orjson.loads(bytes(self.data)) if self.data else None


class Follow(Handler):
    """A native `GET /v1/streams/{id}`: relay latency of every token event."""

    def __init__(self, run: FollowRun) -> None:
        self.run = run
        self.on_first: Callable[[], None] | None = None
        self.sse = SSEParser()
        self.events = 0
        self.tokens = 0
        self.terminal = b""
        self.t_first = 0.0
        self.first_ts = 0.0
        self.done: dict[str, Any] = {}

    def on_body(self, now: float, data: bytes) -> bool:
        for ev in self.sse.feed(data):
            if ev.event == "queued":
                continue
            self.events += 1
            if self.events == 1:
                self._first()
            if ev.event == "token":
                ts = orjson.loads(ev.data)["ts"]
                self.tokens += 1
                if not self.t_first:
                    self.t_first, self.first_ts = now, ts
                self.run.token(now, ts)
            elif ev.event in ("done", "error"):
                self.terminal = ev.event.encode()
                self.done = orjson.loads(ev.data)
                return True
        return False

    def _first(self) -> None:
        self.run.ready_one()
        if self.on_first is not None:
            self.on_first()
            self.on_first = None

    def on_end(self, exc: Exception | None) -> None:
        if self.events == 0:
            self._first()
        self.run.finish_one()


class Chat(Handler):
    """An OpenAI streaming chat completion: first token time, token count, how it ended."""

    def __init__(self) -> None:
        self.sse = SSEParser()
        self.t_first = 0.0
        self.t_last = 0.0
        self.tokens = 0
        self.finish = ""
        self.done = False
        self.error = ""
        self.data = bytearray()
        self.text: list[str] = []

    def on_body(self, now: float, data: bytes) -> bool:
        if self.status != 200:
            self.data += data
            return False
        for ev in self.sse.feed(data):
            if ev.data == "[DONE]":
                self.done = True
                return True
            self._chunk(now, orjson.loads(ev.data))
        return False

    def _chunk(self, now: float, obj: dict[str, Any]) -> None:
        if "error" in obj:
            self.error = str(obj["error"].get("code") or obj["error"].get("message") or "error")
            return
        for choice in obj.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.text.append(content)
                self.tokens += 1
                self.t_last = now
                if not self.t_first:
                    self.t_first = now
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def on_end(self, exc: Exception | None) -> None:
        if exc is not None and not self.error:
            self.error = type(exc).__name__


# --- runs -------------------------------------------------------------------

class FollowRun:
    """Many native streams followed at once (relay overhead, capacity, idle streams)."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.host, self.port = job["host"], int(job["port"])
        self.lags = array("d")
        self.buckets: dict[int, int] = {}
        self.waiting = 0
        self.open = 0
        self.all_ready = asyncio.Event()
        self.all_done = asyncio.Event()
        self.create_retries = 0

    def ready_one(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.all_ready.set()

    def finish_one(self) -> None:
        self.open -= 1
        if self.open <= 0:
            self.all_done.set()

    def token(self, now: float, ts: float) -> None:
        self.lags.append(now - ts)
        b = int(now * BUCKETS_PER_S)
        self.buckets[b] = self.buckets.get(b, 0) + 1

    async def main(self) -> None:
        sids = self.job.get("sids") or await self._create()
        if self.job.get("create"):
            emit({"event": "created", "sids": sids})
            await read_command("connect")
        self.waiting = self.open = len(sids)
        handlers, tasks = await self._attach(sids)
        await self._wait(self.all_ready, float(self.job.get("ready_timeout_s", 120)))
        ok = sum(1 for h in handlers if h.status == 200 and h.events > 0)
        emit({"event": "ready", "ready": ok, "failed": len(sids) - ok})
        await self._wait(self.all_done, float(self.job.get("finish_timeout_s", 600)))
        for t in tasks:
            t.cancel()
        emit({"event": "result", **self._result(handlers)})

    async def _attach(self, sids: list[str]) -> tuple[list[Follow], list[asyncio.Task[None]]]:
        handlers = [Follow(self) for _ in sids]
        gate = asyncio.Semaphore(int(self.job.get("connect_concurrency", CONNECT_CONCURRENCY)))
        tasks = [asyncio.create_task(self._follow(sid, h, gate)) for sid, h in zip(sids, handlers, strict=True)]
        return handlers, tasks

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            pass

    async def _follow(self, sid: str, h: Follow, gate: asyncio.Semaphore) -> None:
        # The gate opens again once this stream has answered (or failed): at most
        # `connect_concurrency` requests are being set up by the API at any moment.
        await gate.acquire()
        h.on_first = gate.release
        req = request_bytes("GET", f"/v1/streams/{sid}", self.host, self.port)
        await exchange(self.host, self.port, h, req)

    async def _create(self) -> list[str]:
        spec = self.job["create"]
        body = orjson.dumps(spec["body"])
        gate = asyncio.Semaphore(CREATE_CONCURRENCY)

        async def one() -> str:
            async with gate:
                for attempt in range(CREATE_ATTEMPTS):
                    h = Body()
                    await exchange(self.host, self.port, h, request_bytes("POST", "/v1/streams", self.host,
                                                                           self.port, body))
                    if h.status == 201:
                        return str(h.json()["id"])
                    self.create_retries += 1
                    await asyncio.sleep(0.05 * 2**attempt)
                return ""

        got = await asyncio.gather(*(one() for _ in range(int(spec["count"]))))
        return [s for s in got if s]

    def _result(self, handlers: list[Follow]) -> dict[str, Any]:
        finished = [h for h in handlers if h.terminal == b"done"]
        per_stream = [h.tokens for h in handlers]
        return {
            "streams": len(handlers),
            "create_retries": self.create_retries,
            "finished": len(finished),
            "error_events": sum(1 for h in handlers if h.terminal == b"error"),
            "failed": sum(1 for h in handlers if not h.terminal),
            "tokens": sum(per_stream),
            "tokens_per_stream": [min(per_stream, default=0), max(per_stream, default=0)],
            "lag_ms": summary(self.lags, 1000.0),
            "buckets": {str(k): v for k, v in sorted(self.buckets.items())},
            "streams_detail": [_follow_record(h) for h in handlers] if self.job.get("detail") else [],
        }


def _follow_record(h: Follow) -> dict[str, Any]:
    return {"status": h.status, "tokens": h.tokens, "t_first": h.t_first, "first_ts": h.first_ts,
            "terminal": h.terminal.decode(), "done": h.done}


class RedisRun(FollowRun):
    """The floor under the relay: the same streams' channels read straight from Redis, no API.

    One redis-py asyncio pub/sub connection (hiredis), as the API's hub has;
    what is left of the relay overhead above this is the API's own cost.
    """

    async def _attach(self, sids: list[str]) -> tuple[list[Follow], list[asyncio.Task[None]]]:
        import redis.asyncio as aredis

        from tokenfan.shared import keys

        handlers = {keys.channel(sid).encode(): Follow(self) for sid in sids}
        client = aredis.Redis.from_url(self.job["redis_url"])
        pubsub = client.pubsub()
        for start in range(0, len(sids), 500):
            await pubsub.subscribe(*list(handlers)[start:start + 500])
        task = asyncio.create_task(self._read(pubsub, client, handlers))
        return list(handlers.values()), [task]

    async def _read(self, pubsub: Any, client: Any, handlers: dict[bytes, Follow]) -> None:
        try:
            while self.open > 0:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is None:
                    continue
                h = handlers.get(msg["channel"])
                if h is None:
                    continue
                if msg["type"] == "subscribe":
                    h.status = 200
                    h.events += 1
                    self.ready_one()
                elif msg["type"] == "message":
                    self._message(h, time.time(), msg["data"])
        finally:
            await pubsub.aclose()
            await client.aclose()

    def _message(self, h: Follow, now: float, data: bytes) -> None:
        obj = orjson.loads(data)
        if obj["type"] == "token":
            h.tokens += 1
            self.token(now, obj["ts"])
        elif obj["type"] in ("done", "error"):
            h.terminal = obj["type"].encode()
            self.finish_one()


class ChatRun:
    """`clients` concurrent clients, each sending `requests` streaming chat requests in turn."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.host, self.port = job["host"], int(job["port"])

    async def main(self) -> None:
        t0 = time.time()
        groups = await asyncio.gather(*(self._client() for _ in range(int(self.job["clients"]))))
        records = [r for g in groups for r in g]
        emit({"event": "result", "records": records, "t_start": t0, "t_end": time.time()})

    async def _client(self) -> list[dict[str, Any]]:
        out = []
        body = orjson.dumps(self.job["body"])
        for _ in range(int(self.job["requests"])):
            out.append(await self._one(body))
            await asyncio.sleep(float(self.job.get("gap_s", 0)))
        return out

    async def _one(self, body: bytes) -> dict[str, Any]:
        h = Chat()
        req = request_bytes("POST", self.job.get("path", "/v1/chat/completions"), self.host, self.port, body)
        t_send, cpu0 = time.time(), time.thread_time()
        try:
            await asyncio.wait_for(exchange(self.host, self.port, h, req), float(self.job.get("timeout_s", 300)))
        except TimeoutError:
            h.error = h.error or "timeout"
        return {
            "t_send": t_send, "t_first": h.t_first, "t_last": h.t_last, "t_end": time.time(),
            "cpu_s": time.thread_time() - cpu0,  # this client's own CPU for the request (one thread)
            "status": h.status, "tokens": h.tokens, "finish": h.finish, "done": h.done, "error": h.error,
            "stream_id": (getattr(h, "headers", {}) or {}).get(b"x-tokenfan-stream-id", b"").decode(),
            "body": bytes(h.data[:300]).decode(errors="replace"),
            "text_crc": zlib.crc32("".join(h.text).encode()),
        }


class NativeRun:
    """Sequential `POST /v1/streams` then `GET /v1/streams/{id}`: time to first token event."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.host, self.port = job["host"], int(job["port"])
        self.run = FollowRun(job)

    async def main(self) -> None:
        body = orjson.dumps(self.job["body"])
        records = []
        for _ in range(int(self.job["requests"])):
            records.append(await self._one(body))
            await asyncio.sleep(float(self.job.get("gap_s", 0)))
        emit({"event": "result", "records": records})

    async def _one(self, body: bytes) -> dict[str, Any]:
        t_send = time.time()
        made = Body()
        await exchange(self.host, self.port, made, request_bytes("POST", "/v1/streams", self.host, self.port, body))
        if made.status != 201:
            return {"t_send": t_send, "status": made.status, "error": bytes(made.data[:300]).decode(errors="replace")}
        sid = str(made.json()["id"])
        h = Follow(self.run)
        self.run.open = self.run.waiting = 1
        req = request_bytes("GET", f"/v1/streams/{sid}", self.host, self.port)
        await asyncio.wait_for(exchange(self.host, self.port, h, req), float(self.job.get("timeout_s", 60)))
        return {"t_send": t_send, "stream_id": sid, **_follow_record(h)}


# --- the process ------------------------------------------------------------

def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


async def read_command(expected: str) -> None:
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line or line.strip() == expected:
            return


RUNS: dict[str, Callable[[dict[str, Any]], FollowRun | ChatRun | NativeRun]] = {
    "follow": FollowRun, "redis": RedisRun, "chat": ChatRun, "native": NativeRun,
}


def main() -> int:
    job = orjson.loads(sys.stdin.readline())
    run = RUNS[job["mode"]](job)
    try:
        import uvloop

        uvloop.run(run.main())
    except ImportError:
        asyncio.run(run.main())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
