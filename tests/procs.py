"""Real tokenfan processes for integration tests: API and worker subprocesses
on a Redis of the suite's own, each waited for with a deadline, each stopped
(and killed if need be) when the test ends.

A process runs on this machine's loopback unless it is given a `Host`: a
network namespace (`ip netns`) and the address it has there, which is how a
multi-host test (tests/netns.py) runs each tier on a host of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from httpx_sse import EventSource, ServerSentEvent

from tests import zygote
from tests.ports import free_port
from tokenfan.ops.embedded import find_redis_server, stop_process
from tokenfan.shared import keys, viewers
from tokenfan.shared.jobs import queue
from tokenfan.shared.redisconn import sync_client
from tokenfan.shared.state import StreamState, StreamStatus
from tokenfan.worker.engines import fake_tokens

LOG_DIR = Path(__file__).resolve().parent.parent / "test-artifacts" / "logs"


def log_name(request: pytest.FixtureRequest) -> str:
    """A test's name for its log files, unique across modules (parallel workers write side by side)."""
    module = Path(str(request.node.path)).stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{module}.{request.node.name}")


def stream_viewers(r: redis.Redis, sid: str) -> set[bytes]:
    """The viewer entries of a stream's followers: its viewer set but the placeholder it was made with."""
    return {m for m in r.zrange(keys.viewers(sid), 0, -1) if m != viewers.PLACEHOLDER.encode()}


def stream_status(r: redis.Redis, sid: str) -> StreamStatus | None:
    """A stream's status as its state record says (None: no record)."""
    state = StreamState.load(r, sid, with_request=False)
    return None if state is None else state.status


def wait_for(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the thing polled may not exist yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})"
                                                                              if last_exc else ""))


@dataclass(frozen=True)
class Host:
    """Where a process runs: a network namespace (empty: this one) and the address it is reached at there."""

    address: str = "127.0.0.1"
    netns: str = ""

    def argv(self, argv: list[str]) -> list[str]:
        """The command line that runs `argv` on this host (`ip netns exec` execs it: the pid is argv's)."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv


LOCAL = Host()


@dataclass
class Proc:
    kind: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    name: str = ""
    host: Host = LOCAL

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host.address}:{self.port}/0"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.popen, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Cluster:
    """Starts tokenfan processes against one Redis and stops them all at the end."""

    redis_url: str
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    test_name: str = "test"

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFAN_") and k != "REDIS_URL"}
        env.update({
            "TOKENFAN_REDIS_URL": self.redis_url,
            "TOKENFAN_ENGINE": "fake",
            "TOKENFAN_METRICS_PORT": "0",
            "TOKENFAN_FAKE_RATE": "200",
            "TOKENFAN_KEEPER_INTERVAL_S": "0.25",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env)
        env.update(extra)
        return env

    def _spawn(self, kind: str, args: list[str], extra: dict[str, str], host: Host = LOCAL) -> Proc:
        env = self._env(extra)
        if host == LOCAL and env.get("TOKENFAN_ENGINE") == "fake" and zygote.enabled():
            log_path = self._log_path(kind)
            return self._keep(Proc(kind, zygote.zygote().spawn([kind, *args], env, log_path), log_path))
        return self.program(kind, [sys.executable, "-m", "tokenfan.ops", kind, *args], env, host)

    def program(self, kind: str, argv: list[str], env: dict[str, str] | None = None, host: Host = LOCAL) -> Proc:
        """Any program on `host`, its output in the test's log, stopped with the rest at the end."""
        log_path = self._log_path(kind)
        with log_path.open("ab") as fh:
            popen = subprocess.Popen(host.argv(argv), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self._keep(Proc(kind, popen, log_path, host=host))

    def _log_path(self, kind: str) -> Path:
        """The next process's log, made empty."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"{self.test_name}.{kind}{len(self.procs)}.log"
        log_path.write_bytes(b"")
        return log_path

    def _keep(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def redis_server(self, host: Host, *extra: str) -> Proc:
        """A redis-server of the test's own on `host` (its files, if `extra` asks for any, beside its log);
        the cluster's `redis_url` is left as it is: set it to `proc.redis_url` to use this one."""
        port = free_port()
        workdir = LOG_DIR / f"{self.test_name}.redis{len(self.procs)}.d"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        argv = [find_redis_server(), "--bind", host.address, "--port", str(port), "--protected-mode", "no",
                "--save", "", "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no", *extra]
        proc = self.program("redis", argv, host=host)
        proc.port = port

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"redis-server exited: {proc.log()}")
            with redis.Redis(host=host.address, port=port, socket_timeout=1) as r:
                return bool(r.ping())

        wait_for(ready, timeout=15, what=f"redis-server on {host.address}:{port}")
        return proc

    def api(self, host: Host = LOCAL, **env: str) -> Proc:
        port = free_port()
        bind = [] if host == LOCAL else ["--host", host.address]
        proc = self._spawn("api", ["--port", str(port), *bind], env, host)
        proc.port = port
        wait_for(lambda: _healthy(proc), timeout=30, what=f"API on port {port}\n{proc.log()}")
        return proc

    def worker(self, wait: bool = True, host: Host = LOCAL, name: str = "", **env: str) -> Proc:
        name = name or f"w{len(self.procs)}-{os.getpid()}-{time.monotonic_ns() % 100000}"
        proc = self._spawn("worker", ["--worker-name", name], env, host)
        proc.name = name
        if wait:
            model = env.get("TOKENFAN_MODEL", self.env.get("TOKENFAN_MODEL", "smollm2"))
            clustered = self.env.get("TOKENFAN_REDIS_CLUSTER") == "true"
            # sync_client: every URL form the processes take (a Sentinel's too).
            r = (redis.RedisCluster.from_url(self.redis_url) if clustered else sync_client(self.redis_url))
            try:
                wait_for(lambda: r.zscore(keys.workers(model), name) is not None or not proc.alive(),
                         timeout=60, what=f"worker {name}")
            finally:
                r.close()
            assert proc.alive(), proc.log()
        return proc

    def stop_all(self) -> None:
        """The end of a test: a worker is asked twice (SIGINT and SIGTERM, two signals that cannot merge
        into one), so it hands back what still runs at once instead of waiting out its grace. Every
        tokenfan process is signalled before any is waited for (an idle worker takes up to a second, its
        queue read), then the rest (Redis, nginx, …) the same way."""
        tokenfan = [p for p in reversed(self.procs) if p.kind in ("api", "worker")]
        others = [p for p in reversed(self.procs) if p.kind not in ("api", "worker")]
        for group in (tokenfan, others):  # tokenfan's first, side by side: then what they talk to
            for p in group:
                if p.kind == "worker":
                    p.signal(signal.SIGINT)
                p.signal(signal.SIGTERM)
            for p in group:
                p.stop()


def _healthy(proc: Proc) -> bool:
    if not proc.alive():
        raise AssertionError(f"process exited: {proc.log()}")
    return httpx.get(f"{proc.url}/healthz", timeout=1.0).status_code == 200


# --- SSE on the client's side ---------------------------------------------
# One parser for every test, httpx-sse's, as for the CLI and the benchmark. Per
# the SSE spec an event without an `id:` of its own keeps the last one seen
# (`.id` is "" only before the first): a test of ids checks that they change.
# httpx-sse 0.4 also yields an empty event for a comment and its blank line once
# an id was seen (florimondmanca/httpx-sse#35); the API's pings have no blank
# line (api/sse.py), but the filter stays: the spec dispatches nothing without data.

SSE = ServerSentEvent


def sse_events(resp: httpx.Response) -> Iterator[SSE]:
    """The events of a streaming response as they arrive; a content type other than SSE raises."""
    return (ev for ev in EventSource(resp).iter_sse() if ev.data)


def parse_sse(body: bytes | str) -> list[SSE]:
    """The events of a whole SSE body (a response already read, or frames made in a unit test)."""
    raw = body.encode() if isinstance(body, str) else body
    return list(sse_events(httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)))


def refused(r: redis.Redis, call: Callable[[], Any], model: str = "smollm2") -> dict[str, Any]:
    """The error body of a request the API refuses with a 400 in OpenAI's shape before any job runs
    (the queue and the active streams stay empty)."""
    with pytest.raises(openai.BadRequestError) as got:
        call()
    err = got.value.body
    assert isinstance(err, dict) and err["type"] == "invalid_request_error", err
    assert queue(r, model).count == 0 and not r.zcard(keys.active())
    return err


def expected_text(content: str, n: int) -> str:
    """What the fake engine answers a one-message chat with `n` tokens."""
    return "".join(fake_tokens([{"role": "user", "content": content}], n))


def create_stream(base: str, content: str = "hello there", max_tokens: int = 12, **extra: Any) -> str:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    resp = httpx.post(f"{base}/v1/streams", json=body, timeout=10)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def read_stream(base: str, sid: str, last: int | None = None, stop_after: int | None = None,
                timeout: float = 30.0, params: dict[str, str] | None = None) -> tuple[int, list[SSE]]:
    """Read a native stream (optionally from `last`, optionally dropping after `stop_after` events)."""
    headers = {"Last-Event-ID": str(last)} if last is not None else {}
    got: list[SSE] = []
    with httpx.stream("GET", f"{base}/v1/streams/{sid}", headers=headers, params=params,
                      timeout=httpx.Timeout(timeout)) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, got
        for ev in sse_events(resp):
            got.append(ev)
            if stop_after is not None and len([e for e in got if e.event != "queued"]) >= stop_after:
                break
            if ev.event in ("done", "error"):
                break
    return 200, got


def token_text(evs: list[SSE]) -> str:
    """The answer a client assembled: its `token` events' text, in order."""
    return "".join(e.json()["text"] for e in evs if e.event == "token")


def assert_whole(evs: list[SSE]) -> None:
    """Every seq from 1 exactly once, in order, and exactly one terminal event, at the end."""
    seqs = [int(e.id) for e in evs]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert sum(e.event in ("done", "error") for e in evs) == 1 and evs[-1].event in ("done", "error")


def logged(got: list[SSE]) -> list[SSE]:
    """The events that belong to the seq space (not API-made `queued`)."""
    return [e for e in got if e.event not in ("queued",)]
