"""`tokenfan up`: everything on one machine, watched, and stopped cleanly on Ctrl-C.

The worker and the API run as the same `tokenfan worker` and `tokenfan api`
commands an operator runs, given the flags `up` was given for each tier; the
CLI built both tiers' settings first, so a mistake in either stops `up`
before anything starts.

`up` is their supervisor, as a process manager would be: a child that exits
is named with its exit code or signal ("worker exited with SIGSEGV") and
started again after a backoff, its streams going on through the usual
takeover (or ending with their `error` event when the embedded Redis was the
one that died). A child that keeps dying soon after its start is not
restarted for ever: after `RESTART_LIMIT` such exits in a row `up` stops
with exit code 1 and says why, and a child that stopped on a configuration
mistake (exit code 2, its one line already printed) stops `up` at once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tokenfan.ops.embedded import EmbeddedRedis
from tokenfan.shared.settings import ApiSettings, WorkerSettings

READY_TIMEOUT_S = 120.0
logging.getLogger("httpx").setLevel(logging.WARNING)
STOP_TIMEOUT_S = 30.0
# How often the supervisor looks at its children.
WATCH_S = 0.2
# Exits within this long of a start count as one crash loop; a child that ran longer starts the count again.
STABLE_S = 60.0
# A child that exits this many times in a row, each soon after its start, is left down and `up` stops:
# a crash at start (a llama.cpp build this CPU cannot run) would otherwise restart for ever.
RESTART_LIMIT = 5
# Backoff before restart n: RESTART_BACKOFF_S * 2**(n-1), at most RESTART_BACKOFF_MAX_S.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
# The exit code of a tokenfan command that stopped on a configuration mistake (ops/cli.py).
CONFIG_EXIT = 2


def describe_exit(code: int) -> str:
    """An exit code as people read it: `exit code 1`, or the signal's name for a negative one."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def backoff(crashes: int) -> float:
    return float(min(RESTART_BACKOFF_S * 2 ** max(crashes - 1, 0), RESTART_BACKOFF_MAX_S))


class Stop(Exception):
    """`up` stops: the message is its last line."""


@dataclass(eq=False)
class Child:
    """One supervised process: how to start it, and its recent exits."""

    name: str
    spawn: Callable[[], subprocess.Popen[bytes]]
    hint: str = ""  # said when it crashes at start for good
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    crashes: int = 0  # exits in a row, each within STABLE_S of its start
    restart_at: float | None = None

    def start(self) -> None:
        self.proc = self.spawn()
        self.started = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def watch(self, now: float) -> None:
        """Restart it when due; on an exit, say so and plan the restart, or raise Stop."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                print(f"tokenfan: starting the {self.name} again", file=sys.stderr, flush=True)
                self.start()
            return
        if self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        how = describe_exit(code)
        if code == CONFIG_EXIT:
            raise Stop(f"the {self.name} stopped on a configuration mistake ({how}; its line is above)")
        self.crashes = self.crashes + 1 if now - self.started < STABLE_S else 1
        if self.crashes >= RESTART_LIMIT:
            raise Stop(f"the {self.name} exited {self.crashes} times in a row, each soon after its start (last: "
                       f"{how}); not restarting it{self.hint}")
        wait = backoff(self.crashes)
        print(f"tokenfan: the {self.name} exited with {how}; restarting it in {wait:g}s", file=sys.stderr,
              flush=True)
        self.restart_at = now + wait


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: Ctrl-C reaches only us, and we stop the children in order.
    return subprocess.Popen([sys.executable, "-m", "tokenfan.ops", *args], env=env, start_new_session=True)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _redis_child(redis: EmbeddedRedis) -> Child:
    def spawn() -> subprocess.Popen[bytes]:
        redis.start()  # the same port: the children's REDIS_URL stays right
        assert redis.proc is not None
        return redis.proc

    return Child("embedded Redis", spawn)


def _banner(base: str, url: str, embedded: bool, model: str) -> str:
    where = f"embedded Redis at {url}" if embedded else "Redis from REDIS_URL"
    return (f"\ntokenfan is up ({where}, model {model}).\n"
            f"  chat page   {base}/\n  API         {base}/v1  (OpenAI-compatible: {base}/v1/chat/completions)\n"
            f"  ops page    {base}/ops\n  try         tokenfan chat \"Hello\"\nPress Ctrl-C to stop.")


def _supervise(children: list[Child], base: str, banner: str) -> None:
    """Watch until Ctrl-C (KeyboardInterrupt) or a Stop."""
    ready_by: float | None = time.monotonic() + READY_TIMEOUT_S
    while True:
        now = time.monotonic()
        for child in children:
            child.watch(now)
        if ready_by is not None and all(c.alive() for c in children) and _ready(base):
            print(banner, flush=True)
            ready_by = None
        elif ready_by is not None and now > ready_by:
            raise Stop(f"the API did not answer {base}/readyz within {READY_TIMEOUT_S:g}s; see the log above")
        time.sleep(WATCH_S)


def run_up(api: ApiSettings, worker: WorkerSettings, worker_flags: list[str], api_flags: list[str]) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # a process manager's stop cleans up like Ctrl-C
    redis = None if api.redis_url else EmbeddedRedis().start()
    url = api.redis_url or (redis.url if redis else "")
    env = {**os.environ, "TOKENFAN_REDIS_URL": url}
    env.pop("REDIS_URL", None)
    repack = "" if worker.engine == "fake" else "; if llama.cpp crashes on this CPU, try --cpu-repack off"
    children = [Child("worker", lambda: _child(["worker", *worker_flags], env), hint=repack),
                Child("API", lambda: _child(["api", *api_flags], env))]
    if redis is not None and redis.proc is not None:
        rchild = _redis_child(redis)
        rchild.proc, rchild.started = redis.proc, time.monotonic()
        children.insert(0, rchild)
    try:
        for child in children:
            if child.proc is None:
                child.start()
        _supervise(children, f"http://{api.host}:{api.port}", _banner(f"http://{api.host}:{api.port}", url,
                                                                          redis is not None, worker.model))
        return 0
    except KeyboardInterrupt:
        print("\ntokenfan: stopping…", file=sys.stderr)
        return 0
    except Stop as exc:
        print(f"tokenfan: {exc}; stopping", file=sys.stderr, flush=True)
        return 1
    finally:
        # A second Ctrl-C (or a SIGTERM) must not cut the clean-up short and
        # leave the worker, the API or the embedded Redis running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop([c.proc for c in children if c.proc is not None and c.proc is not getattr(redis, "proc", None)])
        if redis:
            redis.stop()
