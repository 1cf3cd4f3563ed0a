"""The processes a benchmark runs: Redis, API, workers, llama_cpp.server, clients, publishers.

Every process is a child of the bench with its output in a temporary log
file (shown when it fails), stopped with SIGTERM (then killed) when its
scenario ends. On a machine with at least two CPUs, relay scenarios pin
the API process to one CPU of its own and every other process (Redis, the
publisher, the client) to the rest, so "one API process on one core" is
what gets measured.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import redis

from tokenfan.ops.embedded import EmbeddedRedis, free_port, stop_process
from tokenfan.shared import keys
from tokenfan.shared.jobs import queue as rq_queue

# Seconds to wait for a process to come up (a model load takes a few).
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0


class BenchError(Exception):
    """A benchmark process failed or a step timed out."""


def progress(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class Layout:
    """Which CPUs the API gets and which the load generators get (empty: no pinning)."""

    api: frozenset[int] = frozenset()
    load: frozenset[int] = frozenset()

    @classmethod
    def detect(cls) -> Layout:
        if not hasattr(os, "sched_getaffinity"):
            return cls()
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls()
        return cls(frozenset(cpus[-1:]), frozenset(cpus[:-1]))

    def describe(self) -> str:
        if not self.api:
            return "no CPU pinning"
        return f"API on CPU {sorted(self.api)}, Redis/publisher/client on CPU {sorted(self.load)}"


def pin(pid: int, cpus: frozenset[int]) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, cpus)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def sched_ns(pid: int) -> tuple[int, int]:
    """Nanoseconds a process's threads ran and waited runnable for a CPU (Linux schedstat; 0s elsewhere).

    Exact, unlike `cpu_seconds` (clock ticks): what scenario 4 uses to show where a token's time goes."""
    run = wait = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            fields = stat.read_text().split()
        except OSError:  # a thread that just ended
            continue
        run += int(fields[0])
        wait += int(fields[1])
    return run, wait


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def child_env(redis_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFAN_") and k != "REDIS_URL"}
    env.update({"TOKENFAN_REDIS_URL": redis_url, "TOKENFAN_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.popen, STOP_TIMEOUT_S)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # a pipe the child broke when it exited
                    pass


class LineChild(Child):
    """A child that talks JSON lines: the client and the publisher."""

    lines: queue.Queue[bytes]
    reader: threading.Thread

    def start_reader(self) -> None:
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True, name=f"bench-{self.name}")
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                self.lines.put(line)
        except (OSError, ValueError):  # the pipe closed under us: the child is gone
            pass
        self.lines.put(b"")

    def _close_pipes(self) -> None:
        # The reader sees EOF once the child has exited; close the pipes only after it is done.
        if getattr(self, "reader", None) is not None:
            self.reader.join(5)
        super()._close_pipes()

    def send(self, obj: dict[str, Any] | str) -> None:
        assert self.popen.stdin is not None
        line = obj if isinstance(obj, str) else orjson.dumps(obj).decode()
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.01, left))
            except queue.Empty:
                raise BenchError(f"{self.name}: no '{event}' within {timeout:.0f}s\n{self.log_tail()}") from None
            if not line:
                raise BenchError(f"{self.name} exited before '{event}'\n{self.log_tail()}")
            msg = orjson.loads(line)
            if msg.get("event") == event:
                return dict(msg)


@dataclass
class Stack:
    """One scenario's processes; everything is stopped on exit."""

    layout: Layout = field(default_factory=Layout)
    redis_server: EmbeddedRedis | None = None
    children: list[Child] = field(default_factory=list)
    spawned: int = 0
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tokenfan-bench-")))

    def __enter__(self) -> Stack:
        self.redis_server = EmbeddedRedis().start()
        assert self.redis_server.proc is not None
        pin(self.redis_server.proc.pid, self.layout.load)
        return self

    def __exit__(self, *exc: object) -> None:
        for c in reversed(self.children):
            c.stop()
        if self.redis_server is not None:
            self.redis_server.stop()
        if exc[0] is None:
            shutil.rmtree(self.logs, ignore_errors=True)
        else:
            progress(f"process logs kept in {self.logs}")

    @property
    def redis_pid(self) -> int:
        assert self.redis_server is not None and self.redis_server.proc is not None
        return self.redis_server.proc.pid

    @property
    def redis_url(self) -> str:
        assert self.redis_server is not None
        return self.redis_server.url

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cls: type[Child] = Child, pipes: bool = False, python: bool = True) -> Child:
        """Start `python argv…` (or, with `python=False`, the program `argv[0]`) with its output in a log."""
        self.spawned += 1
        log_path = self.logs / f"{self.spawned:02d}-{name}.log"
        with log_path.open("wb") as fh:
            popen = subprocess.Popen(
                [sys.executable, *argv] if python else argv, env=env or child_env(self.redis_url), stderr=fh,
                stdout=subprocess.PIPE if pipes else fh, stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                start_new_session=True,
            )
        child = cls(name, popen, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def api(self, pinned: bool = False, extra: dict[str, str] | None = None, pythonpath: Path | None = None) -> Child:
        """An API process; with `pythonpath`, another checkout's (`bench versus`), started through the CLI
        entry point every commit has (`tokenfan.ops.cli:main`) with that checkout first on the path."""
        port = free_port()
        args = ["api", "--port", str(port), "--log-level", "WARNING"]
        env = child_env(self.redis_url, extra)
        if pythonpath is None:
            argv = ["-m", "tokenfan.ops", *args]
        else:
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
            argv = ["-c", "import sys; from tokenfan.ops.cli import main; sys.exit(main())", *args]
        child = self.spawn("api", argv, env)
        child.port = port
        if pinned:
            pin(child.pid, self.layout.api)
        wait_http(child, "/healthz")
        self._prime(child)
        return child

    def _prime(self, api: Child) -> None:
        """One stream created alone before any burst: the hub's pub/sub connection is opened lazily,
        and concurrent first subscribes race in redis-py (each opens a connection, one wins)."""
        body = {"messages": [{"role": "user", "content": "prime"}], "max_tokens": 1}
        resp = httpx.post(api.url + "/v1/streams", json=body, timeout=30)
        if resp.status_code != 201:
            raise BenchError(f"the API did not create a stream: {resp.status_code} {resp.text[:200]}")
        self.drain_queue()

    def worker(self, name: str, args: list[str], extra: dict[str, str] | None = None) -> Child:
        argv = ["-m", "tokenfan.ops", "worker", "--worker-name", name, "--log-level", "WARNING", *args]
        child = self.spawn("worker", argv, child_env(self.redis_url, extra))
        r = self.redis()
        try:
            wait_until(lambda: r.zscore(keys.workers("smollm2"), name) is not None, child, "the worker to register")
        finally:
            r.close()
        return child

    def llama_server(self, model_path: str, threads: int, n_ctx: int, interrupt: bool = True) -> Child:
        port = free_port()
        argv = ["-m", "llama_cpp.server", "--model", model_path, "--model_alias", "smollm2",
                "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
                "--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", str(interrupt)]
        child = self.spawn("llama-server", argv, child_env(self.redis_url))
        child.port = port
        wait_http(child, "/v1/models")
        return child

    def line_child(self, name: str, module: str, job: dict[str, Any], pinned: bool = True) -> LineChild:
        child = self.spawn(name, ["-m", module], child_env(self.redis_url), cls=LineChild, pipes=True)
        assert isinstance(child, LineChild)
        if pinned:
            pin(child.pid, self.layout.load)
        child.start_reader()
        child.send(job)
        return child

    def flush(self) -> None:
        r = self.redis()
        try:
            r.flushall()
        finally:
            r.close()

    def drain_queue(self, model: str = "smollm2") -> None:
        """Drop the RQ jobs the API enqueued: the publisher plays their worker."""
        r = self.redis()
        try:
            rq_queue(r, model).empty()
        finally:
            r.close()


def wait_until(check: Any, child: Child, what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited while waiting for {what}\n{child.log_tail()}")
        try:
            if check():
                return
        except (httpx.HTTPError, redis.RedisError):
            pass
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for {what}\n{child.log_tail()}")


def wait_http(child: Child, path: str) -> None:
    wait_until(lambda: httpx.get(child.url + path, timeout=1.0).status_code == 200, child, f"{child.name} {path}")
