"""A preloaded parent that forks the suite's tokenfan processes (issue 29).

Every API or worker a test starts used to be a new interpreter importing
FastAPI, pydantic, redis-py and tokenfan again: about 1.4 CPU-seconds for an
API and 0.7 for a worker, some 400 times a run, on 2 CPUs. The zygote
imports them once per pytest worker and forks a child per start. The child
is still a process of its own (its own pid, session, environment, working
folder, log and signal dispositions) that runs the entry point a
`python -m tokenfan.ops` start runs, and exits through the interpreter's
normal shutdown (threads joined, `atexit` run), so everything that crosses
processes is tested as before. What it shares with its siblings is what
`fork` shares: the imported code and the hash seed.

Only local processes of the fake engine are forked: a real model, another
host (a network namespace) or `TOKENFAN_TEST_ZYGOTE=0` starts an interpreter
anew (`tests/procs.py` decides).

The zygote is one thread, so `fork` is safe: it waits on its requests
(stdin, one JSON line each, answered with the child's pid) and on SIGCHLD,
reaping each child and reporting `exit <pid> <returncode>`. `Forked` gives
the test `subprocess.Popen`'s interface over those reports, and signals the
child through a pidfd, so a reused pid is never hit.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# What a start would import: the CLI, the API app and the worker with the fake engine (llama_cpp is
# left out: a real-model worker is never forked, and its native library is best loaded per process).
PRELOAD = ("tokenfan.ops.cli", "tokenfan.ops.serve", "tokenfan.api.app", "tokenfan.worker.main")
# How long the zygote may take to import PRELOAD and say so; a hang guard only.
READY_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parent.parent


# --- the zygote's side --------------------------------------------------------------------------------

def _serve() -> dict[str, Any] | None:
    """The zygote's loop; returns a request only in a forked child, which then runs it."""
    for name in PRELOAD:
        importlib.import_module(name)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.buffer.raw, selectors.EVENT_READ, "request")  # type: ignore[attr-defined]
    sel.register(wake_r, selectors.EVENT_READ, "child")
    _say("ready")
    lines = sys.stdin.buffer.raw  # type: ignore[attr-defined]
    pending = b""
    while True:
        for key, _ in sel.select():
            if key.data == "child":
                os.read(wake_r, 4096)
                _reap()
                continue
            chunk = lines.read(65536)
            if not chunk:
                return None  # the test process is gone: so are we
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    signal.set_wakeup_fd(-1)
                    os.close(wake_r)
                    os.close(wake_w)
                    return dict(req)
                _say(f"pid {pid}")


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")


def _say(line: str) -> None:
    os.write(1, f"{line}\n".encode())


def _become(req: dict[str, Any]) -> None:
    """In the child: the session, streams, environment and signals a fresh `python -m tokenfan.ops` has."""
    os.setsid()
    log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    spec = importlib.util.find_spec("tokenfan.ops.__main__")
    sys.argv = [spec.origin if spec and spec.origin else "tokenfan.ops", *req["args"]]


def main() -> int:
    req = _serve()
    if req is None:
        return 0
    _become(req)
    from tokenfan.ops.cli import main as cli_main
    return cli_main()


# --- the test's side ----------------------------------------------------------------------------------

class Zygote:
    """One zygote per pytest worker; `spawn` forks a tokenfan process from it."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self._lock = threading.Lock()  # one request at a time: its pid is the next reply
        self._changed = threading.Condition()
        self._pids: list[int] = []
        self.exits: dict[int, int] = {}
        self._ready = False
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()
        with self._changed:
            if not self._changed.wait_for(lambda: self._ready or self.proc.poll() is not None, READY_TIMEOUT_S):
                raise RuntimeError("the test zygote did not start")
        if not self._ready:
            raise RuntimeError(f"the test zygote exited with {self.proc.returncode}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            word, *rest = raw.decode().split()
            with self._changed:
                if word == "ready":
                    self._ready = True
                elif word == "pid":
                    self._pids.append(int(rest[0]))
                elif word == "exit":
                    self.exits[int(rest[0])] = int(rest[1])
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def spawn(self, args: Sequence[str], env: dict[str, str], log: Path) -> Forked:
        """`python -m tokenfan.ops *args` with `env`, its output appended to `log`."""
        req = json.dumps({"args": list(args), "env": env, "log": str(log), "cwd": os.getcwd()})
        assert self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(req.encode() + b"\n")
            self.proc.stdin.flush()
            with self._changed:
                if not self._changed.wait_for(lambda: self._pids or self.proc.poll() is not None, 30):
                    raise RuntimeError("the test zygote did not fork")
                if not self._pids:
                    raise RuntimeError(f"the test zygote exited with {self.proc.returncode}")
                pid = self._pids.pop(0)
        return Forked(self, pid, [sys.executable, "-m", "tokenfan.ops", *args])

    def returncode(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self.exits, timeout)
            return self.exits.get(pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Forked(subprocess.Popen[bytes]):
    """`subprocess.Popen`'s poll, wait and signals for a process the zygote forked."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str]) -> None:  # no super(): nothing to exec
        self.zygote = zygote
        self.pid = pid
        self.args = args
        self.returncode: Any = None
        self.stdin = self.stdout = self.stderr = None
        self._child_created = False  # Popen.__del__ has nothing to reap: the zygote does
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None  # reaped already: its exit is reported

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.returncode(self.pid, 0)
            if self.returncode is not None:
                self._close_pidfd()
        return self.returncode  # type: ignore[no-any-return]

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self.zygote.returncode(self.pid, timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = code
            self._close_pidfd()
        return self.returncode  # type: ignore[no-any-return]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None and self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass  # it exited a moment ago

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        self._close_pidfd()


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def enabled() -> bool:
    """`TOKENFAN_TEST_ZYGOTE=0` starts every process anew, as before."""
    return os.environ.get("TOKENFAN_TEST_ZYGOTE", "1") != "0"


def zygote() -> Zygote:
    """This pytest worker's zygote, started on first use and closed at its exit."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or _zygote.proc.poll() is not None:
            if _zygote is None:
                atexit.register(close)
            _zygote = Zygote()
        return _zygote


def close() -> None:
    global _zygote
    with _zygote_lock:
        if _zygote is not None:
            _zygote.close()
            _zygote = None


if __name__ == "__main__":
    sys.exit(main())
