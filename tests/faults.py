"""Faults for the suite to inflict: a Redis that persists, dies and comes back, and a client that
keeps following a stream through it all as EventSource would.

`PersistentRedis` runs redis-server as compose.yaml does (append-only file on, `appendfsync
everysec`), on a free loopback port with its files in a temporary folder. A test can SIGKILL it,
start it again on the same port from its append-only file, start it empty (what Redis without
persistence comes back as), or roll it back: `snapshot` copies the append-only file while Redis
runs, and `restore` puts that copy back after a kill, so Redis comes back lacking everything written
since (what an AOF that missed its last second, or a replica promoted without the last writes,
looks like). Other helpers may import it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from tests.ports import free_port
from tests.procs import SSE, sse_events
from tokenfan.ops.embedded import EmbeddedRedis

AOF_DIR = "appendonlydir"
# How long a client waits before it reconnects (EventSource's default `retry` is a few seconds;
# the API's own `reconnect` event asks for 250 ms).
RECONNECT_S = 0.25


class PersistentRedis(EmbeddedRedis):
    """A redis-server with an append-only file, that can be killed and brought back on its port."""

    def __init__(self, port: int | None = None, binary: str | None = None, appendonly: bool = True) -> None:
        super().__init__(port=port or free_port(), binary=binary)
        self.appendonly = appendonly
        self.snapshots = 0

    def start(self) -> PersistentRedis:
        # `--appendonly` given twice: the last wins, so ours overrides EmbeddedRedis' "no".
        self.extra = ["--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"]
        super().start()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last fsync, the clients' connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> PersistentRedis:
        """Start again on the same port from whatever its folder holds."""
        return self.start()

    def wipe(self) -> None:
        """Forget everything (call while it is down): it comes back empty."""
        shutil.rmtree(Path(self.dir) / AOF_DIR, ignore_errors=True)
        for f in Path(self.dir).glob("*.rdb"):
            f.unlink()

    def snapshot(self) -> Path:
        """A copy of the append-only file as it is now (Redis running): a prefix of what it logged."""
        self.snapshots += 1
        dest = Path(tempfile.mkdtemp(prefix="tokenfan-aof-")) / f"snap{self.snapshots}"
        shutil.copytree(Path(self.dir) / AOF_DIR, dest)
        return dest

    def restore(self, snap: Path) -> None:
        """Put a snapshot back as the append-only file (call while it is down)."""
        shutil.rmtree(Path(self.dir) / AOF_DIR, ignore_errors=True)
        shutil.copytree(snap, Path(self.dir) / AOF_DIR)
        shutil.rmtree(snap.parent, ignore_errors=True)

    def info(self, section: str = "persistence") -> dict[str, str]:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "info", section], capture_output=True,
                             text=True, timeout=10).stdout
        return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def follow(apis: Sequence[str], sid: str, *, timeout: float = 90.0, switch_every: int = 0,
           first: int = 0) -> list[SSE]:
    """Follow a native stream to its terminal event as EventSource would: whenever the connection
    ends without one (the API went away, Redis did, a `reconnect` event), reconnect with
    Last-Event-ID, each time to the next API in `apis`; with `switch_every`, also after that many
    events, so the stream is read across every replica. Returns the logged events, in order; fails
    after `timeout` seconds without a terminal event (a hung stream)."""
    got: list[SSE] = []
    deadline = time.monotonic() + timeout
    turn = 0
    while time.monotonic() < deadline:
        base = apis[turn % len(apis)]
        turn += 1
        last = max([first, *(int(e.id) for e in got if e.id.isdigit())])
        try:
            if _read_once(base, sid, last, got, switch_every):
                return got
        except httpx.HTTPError:
            time.sleep(RECONNECT_S)  # EventSource's retry delay, not a wait for a condition
    raise AssertionError(f"stream {sid} had no terminal event within {timeout}s: {[e.event for e in got][-5:]}")


def _read_once(base: str, sid: str, last: int, got: list[SSE], switch_every: int) -> bool:
    """One connection's worth of events into `got`; True when the stream has ended."""
    headers = {"Last-Event-ID": str(last)} if last else {}
    with httpx.stream("GET", f"{base}/v1/streams/{sid}", headers=headers,
                      timeout=httpx.Timeout(10.0, read=40.0)) as resp:
        if resp.status_code == 204:
            return True
        if resp.status_code != 200:
            resp.read()
            time.sleep(RECONNECT_S)
            return False
        n = 0
        for ev in sse_events(resp):
            if ev.event == "reconnect":
                return False
            if ev.event == "queued":
                continue
            got.append(ev)
            if ev.event in ("done", "error"):
                return True
            n += 1
            if switch_every and n >= switch_every:
                return False
    return False
