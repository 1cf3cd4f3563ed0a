"""`tokenfan up`: everything on one machine, stopped cleanly on Ctrl-C.

The worker and the API run as the same `tokenfan worker` and `tokenfan api`
commands an operator runs, given the flags `up` was given for each tier; the
CLI built both tiers' settings first, so a mistake in either stops `up`
before anything starts.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import httpx

from tokenfan.ops.embedded import EmbeddedRedis
from tokenfan.shared.settings import ApiSettings, WorkerSettings

READY_TIMEOUT_S = 120.0
logging.getLogger("httpx").setLevel(logging.WARNING)
STOP_TIMEOUT_S = 30.0


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: Ctrl-C reaches only us, and we stop the children in order.
    return subprocess.Popen([sys.executable, "-m", "tokenfan.ops", *args], env=env, start_new_session=True)


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
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


def run_up(api: ApiSettings, worker: WorkerSettings, worker_flags: list[str], api_flags: list[str]) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # a process manager's stop cleans up like Ctrl-C
    redis = None if api.redis_url else EmbeddedRedis().start()
    url = api.redis_url or (redis.url if redis else "")
    env = {**os.environ, "TOKENFAN_REDIS_URL": url}
    env.pop("REDIS_URL", None)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_child(["worker", *worker_flags], env))
        procs.append(_child(["api", *api_flags], env))
        base = f"http://{api.host}:{api.port}"
        if not _wait_ready(base, procs):
            print("tokenfan: the worker or the API did not come up; see the log above", file=sys.stderr)
            return 1
        where = f"embedded Redis at {url}" if redis else "Redis from REDIS_URL"
        print(f"\ntokenfan is up ({where}, model {worker.model}).\n"
              f"  chat page   {base}/\n  API         {base}/v1  (OpenAI-compatible: {base}/v1/chat/completions)\n"
              f"  ops page    {base}/ops\n  try         tokenfan chat \"Hello\"\n"
              "Press Ctrl-C to stop.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        print("\ntokenfan: stopping…", file=sys.stderr)
        return 0
    finally:
        # A second Ctrl-C (or a SIGTERM) must not cut the clean-up short and
        # leave the worker, the API or the embedded Redis running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(procs)
        if redis:
            redis.stop()

