"""A small hostile HTTP client for the suite: raw sockets doing what no well-behaved client does.

Each move opens its own connection and reports what the server did (`Outcome`):
the status it answered, if any, and whether it closed the connection, all
within a deadline (a move that the server lets run for ever ends at the
deadline with `closed=False`, which a test then fails on). `Crowd` runs many
moves at once in threads, for the tests that check the API goes on serving
others and keeps its memory bounded meanwhile. The API process's own side is
read from /proc: its resident memory and its open sockets.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Last-Event-ID values no stream can have: Python's int() takes the first four, Redis refuses the
# next ones as stream ids, and the rest are not numbers at all.
ODD_RESUME_IDS = ["+5", "1_0", "\u0665", "\uff15", "-1", "1e3", "0x10", "5.0", "18446744073709551615",
                  "18446744073709551616", "9" * 40, "5" * 5000]
CHUNK = 65_536


@dataclass
class Outcome:
    status: int | None  # the status line's code; None: closed (or still open) without an answer
    closed: bool  # the server closed the connection before the deadline
    sent: int = 0  # bytes this client got to send
    seconds: float = 0.0  # from the connection to the close (or the deadline)
    answer: bytes = b""


def _status(answer: bytes) -> int | None:
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit() else None


class _Conn:
    def __init__(self, port: int, deadline_s: float) -> None:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=deadline_s)
        self.sent = 0
        self.closed = False

    def send(self, data: bytes) -> bool:
        """Send; False once the server has closed (a reset or a broken pipe)."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True
            return False
        self.sent += len(data)
        return True

    def spoke(self) -> bool:
        """Without blocking: whether the server answered or closed (what it answered stays to be read)."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            self.sock.setblocking(True)

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def finish(self) -> Outcome:
        """Read what the server answers until it closes or the deadline passes."""
        got = b""
        while self.left() > 0:
            self.sock.settimeout(max(0.01, self.left()))
            try:
                data = self.sock.recv(CHUNK)
            except TimeoutError:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            got += data
        self.sock.close()
        return Outcome(_status(got), self.closed, self.sent, time.monotonic() - self.t0, got)


def one_write(port: int, data: bytes, deadline_s: float) -> Outcome:
    """`data` in one write (a whole head arrives in one read), then whatever the server answers."""
    c = _Conn(port, deadline_s)
    c.send(data)
    return c.finish()


def silent(port: int, deadline_s: float) -> Outcome:
    """Connect and send nothing."""
    return _Conn(port, deadline_s).finish()


def huge_header(port: int, size: int, deadline_s: float = 30.0, *, in_line: bool = False) -> Outcome:
    """A request whose one header (or, `in_line`, its request line) is `size` bytes, sent as fast as it goes."""
    c = _Conn(port, deadline_s)
    c.send(b"GET /" if in_line else b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: ")
    left = size
    while left > 0 and c.left() > 0 and c.send(b"a" * min(CHUNK, left)):
        left -= CHUNK
        if c.spoke():
            break
    c.send(b" HTTP/1.1\r\nHost: x\r\n\r\n" if in_line else b"\r\n\r\n")
    return c.finish()


def slow_header(port: int, every_s: float, deadline_s: float) -> Outcome:
    """A request head sent a byte at a time, `every_s` apart, for ever."""
    c = _Conn(port, deadline_s)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 1_000_000
    for i in range(len(head)):
        if c.left() <= 0 or not c.send(head[i:i + 1]) or _wait_closed(c, every_s):
            break
    return c.finish()


def slow_body(port: int, path: str, declared: int, every_s: float, deadline_s: float) -> Outcome:
    """A POST that declares `declared` bytes of body and sends them a byte every `every_s`."""
    c = _Conn(port, deadline_s)
    c.send(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           f"Content-Length: {declared}\r\n\r\n".encode())
    for _ in range(declared):
        if c.left() <= 0 or _wait_closed(c, every_s) or not c.send(b" "):
            break
    return c.finish()


def chunked_flood(port: int, path: str, total: int | None, deadline_s: float = 30.0) -> Outcome:
    """A chunked POST of `total` bytes (None: without end), sent as fast as the server takes it."""
    c = _Conn(port, deadline_s)
    c.send(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           "Transfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"%x\r\n%s\r\n" % (CHUNK, b"[" * CHUNK)
    sent = 0
    while (total is None or sent < total) and c.left() > 0 and c.send(chunk):
        sent += CHUNK
        if c.spoke():
            break
    if total is not None:
        c.send(b"0\r\n\r\n")
    return c.finish()


def _wait_closed(c: _Conn, seconds: float) -> bool:
    """Wait up to `seconds` for the server to answer or close; True if it did."""
    end = min(c.deadline, time.monotonic() + seconds)
    while time.monotonic() < end:
        if c.spoke():
            return True
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    return c.spoke()


@dataclass
class Crowd:
    """Hostile moves run at once in threads; `results()` waits for them all."""

    workers: int = 64
    futures: list[cf.Future[Outcome]] = field(default_factory=list)
    _pool: cf.ThreadPoolExecutor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="hostile")

    def run(self, move: Callable[..., Outcome], *args: object, times: int = 1, **kwargs: object) -> None:
        assert self._pool is not None
        with self._lock:
            self.futures += [self._pool.submit(move, *args, **kwargs) for _ in range(times)]

    def results(self, timeout: float) -> list[Outcome]:
        out = [f.result(timeout=timeout) for f in self.futures]
        self.close()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


@contextmanager
def crowd(workers: int = 64) -> Iterator[Crowd]:
    c = Crowd(workers)
    try:
        yield c
    finally:
        c.close()


# --- the API process's side ---------------------------------------------------

def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_sockets(pid: int) -> int:
    """The process's open sockets (its listening socket, Redis connections and clients)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:  # closed while we looked
            pass
    return n
