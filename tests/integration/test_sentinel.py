"""Redis Sentinel: REDIS_URL names a monitored primary, and a failover mid-stream is a pause.

The test's own Redis set: a primary and a replica (redis-server on free ports)
and three Sentinels (`redis-server --sentinel`, each with a config of its own
in a temporary folder), with a small down-after and failover timeout. Two API
processes and two workers (fake engine) run on `redis+sentinel://`; streams
are followed by clients that resume with Last-Event-ID on the other API
whenever a connection ends early, as EventSource would. Then the primary
fails over, once by `SENTINEL FAILOVER` and once by SIGKILL; the SIGKILL
case first cuts the replica off for a moment, so the primary it replaces
holds events the new one never got (asynchronous replication dropping the
last writes, made certain instead of left to luck).

What clients must see: every stream ends with `done` and exactly its text,
or with exactly one retryable `error`; never silence and never a hang (every
wait has a deadline).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.integration.test_redis_auth_tls import _certs
from tests.ports import free_port
from tests.procs import LOG_DIR, SSE, Cluster, create_stream, expected_text, log_name, sse_events, token_text, wait_for
from tokenfan.ops.embedded import find_redis_server, stop_process
from tokenfan.shared import keys
from tokenfan.shared.errors import ConfigError
from tokenfan.shared.redisconn import SENTINEL_PORT, require_url, sentinel_target, sync_client

SERVICE = "tf-primary"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000
TOKENS = 160
RATE = "20"  # tokens per second per stream: a stream lasts 8 s, the failover lands in its middle
STREAMS = 6
# Every stream ends within this (a stream's own 8 s, plus a failover, a lease and a takeover).
STREAM_DEADLINE_S = 90.0
# A connection that brings no event for this long is silence (pings come every 15 s at most).
SILENCE_S = 45.0


@dataclass
class Node:
    role: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path
    password: str = ""
    ca: str = ""  # TLS: the CA file to check the server's certificate with

    def client(self, **kw: float) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": self.ca} if self.ca else {}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=kw.get("socket_timeout", 5),
                           password=self.password or None, **tls)

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class SentinelSet:
    """A primary, a replica and three Sentinels, all on loopback ports of their own (with a
    password for the servers and another for the Sentinels, when given)."""

    folder: Path
    password: str = ""
    sentinel_password: str = ""
    tls: bool = False
    servers: list[Node] = field(default_factory=list)
    sentinels: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        creds = f":{self.password}@" if self.password else ""
        options = [f"sentinel_password={self.sentinel_password}"] if self.sentinel_password else []
        options += [f"ssl_ca_certs={self.folder / 'ca.crt'}"] if self.tls else []
        query = f"?{'&'.join(options)}" if options else ""
        return f"{'rediss' if self.tls else 'redis'}+sentinel://{creds}{hosts}/{SERVICE}/0{query}"

    def _tls(self) -> list[str]:
        """TLS only, on the port given (`tls-port`), for clients and for replication alike."""
        if not self.tls:
            return []
        if not (self.folder / "ca.crt").exists():
            _certs(self.folder)
        f = self.folder
        return ["tls-cert-file", str(f / "redis.crt"), "tls-key-file", str(f / "redis.key"),
                "tls-ca-cert-file", str(f / "ca.crt"), "tls-auth-clients", "no", "tls-replication", "yes"]

    def _start(self, role: str, port: int, argv: list[str]) -> Node:
        log = self.folder / f"{role}.log"
        fh = log.open("wb")
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        fh.close()
        return Node(role, port, popen, log, ca=str(self.folder / "ca.crt") if self.tls else "")

    def server(self, role: str, *extra: str) -> Node:
        port = free_port()
        folder = self.folder / role
        folder.mkdir()
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        tls = self._tls()
        ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
        node = self._start(role, port, [
            find_redis_server(), *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(folder), "--daemonize", "no", "--enable-debug-command", "local", *auth,
            *(f"--{a}" if i % 2 == 0 else a for i, a in enumerate(tls)), *extra])
        node.password = self.password
        self.servers.append(node)
        return node

    def sentinel(self, i: int, primary: Node) -> Node:
        port = free_port()
        folder = self.folder / f"sentinel{i}"
        folder.mkdir()
        conf = folder / "sentinel.conf"
        tls = self._tls()
        ports = ["port 0", f"tls-port {port}"] if tls else [f"port {port}"]
        conf.write_text("\n".join([
            *ports, "bind 127.0.0.1", "daemonize no", f'dir "{folder}"',
            *(f"{k} {v}" for k, v in zip(tls[::2], tls[1::2], strict=True)),
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SERVICE} 1",
            *([f"sentinel auth-pass {SERVICE} {self.password}"] if self.password else []),
            *([f"requirepass {self.sentinel_password}"] if self.sentinel_password else []), ""]))
        node = self._start(f"sentinel{i}", port, [find_redis_server(), str(conf), "--sentinel"])
        node.password = self.sentinel_password
        self.sentinels.append(node)
        return node

    def start(self) -> SentinelSet:
        primary = self.server("primary")
        wait_for(lambda: primary.client().ping(), timeout=15, what="the primary")
        replica = self.server("replica", "--replicaof", "127.0.0.1", str(primary.port))
        wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up",
                 timeout=15, what="the replica in sync")
        for i in range(3):
            self.sentinel(i, primary)
        # Ready when each Sentinel knows the replica and both other Sentinels (they learn of each
        # other through the primary's hello channel): only then can they agree on a failover.
        for s in self.sentinels:
            wait_for(lambda s=s: self._knows_all(s), timeout=30, what=f"Sentinel {s.port} to see the set")
        return self

    def _knows_all(self, s: Node) -> bool:
        c = s.client()
        try:
            replicas = c.execute_command("SENTINEL", "REPLICAS", SERVICE)
            peers = c.execute_command("SENTINEL", "SENTINELS", SERVICE)
        finally:
            c.close()
        return len(replicas) == 1 and len(peers) == 2

    def primary_port(self, sentinel: Node | None = None) -> int:
        c = (sentinel or self.sentinels[0]).client()
        try:
            _host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        finally:
            c.close()
        return int(port)

    def node(self, port: int) -> Node:
        return next(n for n in self.servers if n.port == port)

    def primary(self) -> Node:
        return self.node(self.primary_port())

    def replica(self) -> Node:
        return next(n for n in self.servers if n.port != self.primary_port())

    def all_agree_on(self, port: int) -> bool:
        """Every Sentinel names `port` as the primary, and that server says it is one."""
        if not all(self.primary_port(s) == port for s in self.sentinels):
            return False
        c = self.node(port).client()
        try:
            return bool(c.execute_command("ROLE")[0] == b"master")
        finally:
            c.close()

    def stop(self) -> None:
        for n in [*self.sentinels, *self.servers]:
            stop_process(n.popen, 10)

    def logs(self) -> str:
        return "\n".join(f"--- {n.role} ---\n{n.log.read_text(errors='replace')[-3000:]}"
                         for n in [*self.servers, *self.sentinels])


@pytest.fixture
def sentinel_set(request: pytest.FixtureRequest) -> Iterator[SentinelSet]:
    folder = Path(tempfile.mkdtemp(prefix="tokenfan-sentinel-"))
    s = SentinelSet(folder, **getattr(request, "param", {}))
    try:
        yield s.start()
    finally:
        s.stop()
        keep = LOG_DIR / "sentinel"
        keep.mkdir(parents=True, exist_ok=True)
        for node in [*s.servers, *s.sentinels]:
            if node.log.exists():
                shutil.copy(node.log, keep / f"{os.getpid()}.{node.role}.log")
        shutil.rmtree(folder, ignore_errors=True)


# --- clients that resume as EventSource would -------------------------------


@dataclass
class Reader:
    """One client of one stream: reads on one API, and when a connection ends before the stream
    does (an API's Redis failed, a connection broke), resumes with Last-Event-ID on the other."""

    sid: str
    apis: list[str]
    events: list[SSE] = field(default_factory=list)  # the logged events, in the order received
    local_errors: list[dict[str, object]] = field(default_factory=list)  # API-made errors (not in the log)
    resumes: int = 0
    drop_after: int = 0  # once past this seq, leave and resume on the other API (as a flaky network would)
    failure: str = ""
    thread: threading.Thread | None = None

    @property
    def last(self) -> int:
        return int(self.events[-1].id) if self.events else 0

    @property
    def tokens(self) -> int:
        return sum(e.event == "token" for e in self.events)

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1].event in ("done", "error")

    def start(self) -> Reader:
        self.thread = threading.Thread(target=self._run, name=f"reader-{self.sid}", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + STREAM_DEADLINE_S
        attempt = 0
        try:
            while not self.ended:
                if time.monotonic() > deadline:
                    self.failure = f"no terminal event within {STREAM_DEADLINE_S}s (last seq {self.last})"
                    return
                self._read_once(self.apis[attempt % len(self.apis)])
                attempt += 1
                if not self.ended:
                    self.resumes += 1
        except Exception as exc:  # reported by the test, with the stream it belongs to
            self.failure = f"{type(exc).__name__}: {exc}"

    def _read_once(self, base: str) -> None:
        headers = {"Last-Event-ID": str(self.last)} if self.last else {}
        try:
            with httpx.stream("GET", f"{base}/v1/streams/{self.sid}", headers=headers,
                              timeout=httpx.Timeout(SILENCE_S, connect=5)) as resp:
                if resp.status_code == 204:  # ended at or before our id: cannot be, we stop at the terminal
                    raise AssertionError(f"204 on resume at {self.last}")
                if resp.status_code == 503:  # Redis unreachable for now: try again after Retry-After
                    resp.read()
                    self.local_errors.append({"status": 503, **resp.json()})
                    time.sleep(min(float(resp.headers.get("retry-after", "1")), 1.0))  # the client's backoff
                    return
                if resp.status_code != 200:  # 404: the stream is gone (a failover lost it)
                    resp.read()
                    raise AssertionError(f"HTTP {resp.status_code} on resume at {self.last}: {resp.text} "
                                         f"(after {self.local_errors})")
                for ev in sse_events(resp):
                    if not self._take(ev):
                        return
        except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
            if isinstance(exc, httpx.ReadTimeout):
                raise AssertionError(f"silence: nothing for {SILENCE_S}s after seq {self.last}") from exc

    def _take(self, ev: SSE) -> bool:
        """Record one event; False when this connection is done (terminal, or an API-made error)."""
        if ev.event in ("queued", "reconnect"):
            return ev.event != "reconnect"
        seq = int(ev.id)
        if ev.event == "error" and seq <= self.last:  # made by the API (its id is the last seq sent)
            self.local_errors.append(ev.json())
            if not ev.json().get("retryable"):
                raise AssertionError(f"a non-retryable error from the API: {ev.data}")
            return False
        if seq != self.last + 1:
            raise AssertionError(f"seq {seq} after {self.last}: {ev.event} {ev.data}")
        self.events.append(ev)
        if self.drop_after and seq >= self.drop_after and ev.event not in ("done", "error"):
            self.drop_after = 0
            return False
        return ev.event not in ("done", "error")



def _check_outcome(reader: Reader, content: str) -> str:
    """'done' or 'error'; fails unless the stream ended with done and its exact text, or one retryable error."""
    assert not reader.failure, f"stream {reader.sid}: {reader.failure}"
    evs = reader.events
    assert [int(e.id) for e in evs] == list(range(1, len(evs) + 1))
    terminals = [e for e in evs if e.event in ("done", "error")]
    assert len(terminals) == 1 and terminals[0] is evs[-1], [e.event for e in terminals]
    if evs[-1].event == "error":
        assert evs[-1].json()["retryable"] is True, evs[-1].data
        return "error"
    assert token_text(evs) == expected_text(content, TOKENS), f"stream {reader.sid}: the text differs"
    assert evs[-1].json()["usage"]["completion_tokens"] == TOKENS
    return "done"


# --- the processes on Sentinel ---------------------------------------------


def _start_tokenfan(cluster: Cluster, s: SentinelSet) -> list[str]:
    """Two APIs and two workers on the Sentinel URL (the harness waits for each worker through it)."""
    cluster.redis_url = s.url
    cluster.env.update({"TOKENFAN_FAKE_RATE": RATE, "TOKENFAN_FAKE_TOKENS": str(TOKENS)})
    apis = [cluster.api().url, cluster.api().url]
    cluster.worker()
    cluster.worker()
    return apis


@pytest.fixture
def tf(sentinel_set: SentinelSet, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(sentinel_set.url, test_name=log_name(request))
    yield c
    c.stop_all()


# --- the failovers -----------------------------------------------------------


def _sentinel_failover(s: SentinelSet, sids: list[str]) -> dict[str, int]:
    """`SENTINEL FAILOVER`: the replica is promoted; the old primary takes writes until Sentinel
    demotes it. Returns no certain gap (what the old primary alone got depends on timing)."""
    new = s.replica().port
    c = s.sentinels[0].client()
    try:
        assert c.execute_command("SENTINEL", "FAILOVER", SERVICE)
    finally:
        c.close()
    wait_for(lambda: s.all_agree_on(new), timeout=30, what="the replica promoted")
    return {}


def _sigkill_with_a_gap(s: SentinelSet, sids: list[str]) -> dict[str, int]:
    """SIGKILL of the primary while its replica is cut off, so the new primary lacks the last
    events of every stream: returns how many each lacks."""
    primary, replica = s.primary(), s.replica()
    p, rc = primary.client(), replica.client(socket_timeout=10)
    before = {sid: p.xlen(keys.log(sid)) for sid in sids}
    # One read for all: the replica drops its link and sleeps (less than down-after, so the
    # Sentinels keep it eligible) before its replication cron can reconnect, and says what it
    # holds the moment it wakes, before it can serve anyone else (a promotion included).
    pipe = rc.pipeline(transaction=False)
    pipe.execute_command("CLIENT", "KILL", "TYPE", "master")
    pipe.execute_command("DEBUG", "SLEEP", "0.8")
    pipe.execute_command("ROLE")
    for sid in sids:
        pipe.xlen(keys.log(sid))
    replies: list[Any] = []
    cut = threading.Thread(target=lambda: replies.extend(pipe.execute()), name="cut-replica", daemon=True)
    cut.start()
    wait_for(lambda: all(p.xlen(keys.log(sid)) >= before[sid] + 3 for sid in sids), timeout=5, interval=0.01,
             what="three more events per stream on the primary alone")
    at_kill = {sid: p.xlen(keys.log(sid)) for sid in sids}
    assert cut.is_alive(), "the replica woke before the primary was killed: no gap to speak of"
    primary.popen.send_signal(signal.SIGKILL)
    primary.popen.wait(10)
    cut.join(10)
    assert not cut.is_alive()
    role, kept = replies[2], dict(zip(sids, replies[3:], strict=True))
    assert isinstance(role, list) and role[0] == b"slave", role
    p.close()
    rc.close()
    wait_for(lambda: s.all_agree_on(replica.port), timeout=30, what="the replica promoted")
    return {sid: at_kill[sid] - int(kept[sid]) for sid in sids}


@pytest.mark.soak
@pytest.mark.parametrize("how", ["sentinel_failover", "sigkill_primary"])
def test_failover_mid_stream(tf: Cluster, sentinel_set: SentinelSet, how: str) -> None:
    s = sentinel_set
    apis = _start_tokenfan(tf, s)
    contents = [f"sentinel {how} {i}" for i in range(STREAMS)]
    sids = [create_stream(apis[i % 2], c, max_tokens=TOKENS) for i, c in enumerate(contents)]
    readers = [Reader(sid, apis[i % 2:] + apis[:i % 2]).start() for i, sid in enumerate(sids)]
    wait_for(lambda: all(r.tokens >= 20 or r.failure or r.ended for r in readers), timeout=30,
             what="every stream under way")
    assert not any(r.ended for r in readers), "a stream ended before the failover"
    old = s.primary_port()
    for r in readers:  # each client leaves and resumes on the other API as the primary fails over ...
        r.drop_after = r.last + 2  # (the SIGKILL waits for 3 more events of each stream)
    gaps = (_sigkill_with_a_gap if how == "sigkill_primary" else _sentinel_failover)(s, sids)
    assert s.primary_port() != old
    wait_for(lambda: all(r.drop_after == 0 or r.failure for r in readers), timeout=30,
             what="every client resumed on the other API")
    for r in readers:  # ... and once more after, from the new primary's log
        r.drop_after = r.last + 2
    if gaps:  # the new primary lacks events the clients already had: the workers must re-send them
        assert all(n > 0 for n in gaps.values()), gaps
    for r in readers:
        assert r.thread is not None
        r.thread.join(STREAM_DEADLINE_S + 10)
    outcomes = [_check_outcome(r, c) for r, c in zip(readers, contents, strict=True)]
    assert all(r.resumes >= 2 for r in readers), [r.resumes for r in readers]
    print(f"{how}: outcomes {outcomes}, resumes {[r.resumes for r in readers]}, gaps {gaps}, "
          f"API-made errors {[r.local_errors for r in readers]}")
    # New work runs on the new primary, through both APIs.
    for i, base in enumerate(apis):
        sid = create_stream(base, f"after {how} {i}", max_tokens=TOKENS)
        after = Reader(sid, [base]).start()
        assert after.thread is not None
        after.thread.join(STREAM_DEADLINE_S + 10)
        assert _check_outcome(after, f"after {how} {i}") == "done"
    for p in tf.procs:
        assert p.alive(), f"{p.kind} exited:\n{p.log()[-3000:]}"


# --- the URL -----------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_options() -> None:
    t = sentinel_target("redis+sentinel://tf:pw%40rd@10.0.0.1:26380,sentinel-b,[::1]:5000/main%20one/3"
                        "?sentinel_password=spw&socket_timeout=4")
    assert t.sentinels == (("10.0.0.1", 26380), ("sentinel-b", SENTINEL_PORT), ("::1", 5000))
    assert t.service == "main one"
    assert t.server == {"username": "tf", "password": "pw@rd", "db": 3, "socket_timeout": 4.0}
    assert t.sentinel == {"password": "spw"}
    tls = sentinel_target("rediss+sentinel://h/svc?ssl_cert_reqs=none")
    assert tls.server["ssl"] is True and tls.sentinel == {"ssl": True, "ssl_cert_reqs": "none"}
    assert "db" not in tls.server  # redis-py's default, 0


def _tokenfan(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFAN_") and k != "REDIS_URL"}
    return subprocess.run([sys.executable, "-m", "tokenfan.ops", *args], capture_output=True, text=True,
                          timeout=60, env={**clean, "PYTHONUNBUFFERED": "1", **env})


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://:hunter2@127.0.0.1:26379", "needs the monitored service's name"),
    ("redis+sentinel://:hunter2@127.0.0.1:26379,127.0.0.1:x/tf", "'x' is not a port"),
    ("redis+sentinel://:hunter2@127.0.0.1/tf/zero", "the database must be a number"),
    ("sentinel://:hunter2@127.0.0.1:26379/tf", "must specify one of the following schemes"),
])
@pytest.mark.parametrize("command", [["api", "--port", "0"], ["worker", "--engine", "fake", "--metrics-port", "0"],
                                     ["keys", "list"]])
def test_a_bad_url_is_one_line_naming_redis_url_without_its_password(url: str, says: str,
                                                                     command: list[str]) -> None:
    res = _tokenfan(*command, env={"REDIS_URL": url})
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("tokenfan: TOKENFAN_REDIS_URL: ") and says in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "hunter2" not in res.stderr and "***" in res.stderr
    with pytest.raises(ConfigError, match="REDIS_URL"):
        require_url(url)


def test_a_password_cut_by_a_slash_is_not_echoed_either() -> None:
    """A '/' left unencoded in a password ends the host part there: redis-py then reports the
    password's first piece as a port that is not a number. The line must not carry it."""
    res = _tokenfan("api", "--port", "0", env={"REDIS_URL": "redis://:hun/ter2@127.0.0.1:6379/0"})
    assert res.returncode == 2 and res.stderr.startswith("tokenfan: TOKENFAN_REDIS_URL: "), res.stderr
    assert "hun" not in res.stderr and "ter2" not in res.stderr, res.stderr


def test_a_sentinel_url_with_a_redis_cluster_is_one_line() -> None:
    res = _tokenfan("api", "--port", "0", env={"REDIS_URL": "redis+sentinel://127.0.0.1:1/tf",
                                                "TOKENFAN_REDIS_CLUSTER": "true"})
    assert res.returncode == 2 and res.stderr.startswith("tokenfan: TOKENFAN_REDIS_CLUSTER: "), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr


def test_a_client_moves_to_the_new_primary_at_the_switch(sentinel_set: SentinelSet) -> None:
    """The sync client (the worker's, RQ's) writes to the new primary once Sentinel announces it,
    not only once the old primary is demoted, seconds later: what it writes then is not lost."""
    s = sentinel_set
    old, new = s.primary(), s.replica()
    r = sync_client(s.url)
    try:
        r.set("before", "1")
        c = s.sentinels[0].client()
        assert c.execute_command("SENTINEL", "FAILOVER", SERVICE)
        c.close()
        wait_for(lambda: s.all_agree_on(new.port), timeout=30, what="the replica promoted")
        watch = r.connection_pool.connection_kwargs["primary_watch"]
        wait_for(lambda: watch.primary == ("127.0.0.1", new.port), timeout=10, what="the switch heard")
        r.set("after", "1")
        nc, oc = new.client(), old.client()
        assert nc.get("after") == b"1" and nc.get("before") == b"1"
        assert r.connection_pool.master_address == ("127.0.0.1", new.port)
        # Unless Sentinel demoted it already (then it holds a copy of the new primary's data),
        # the old primary, still a primary, never got the write.
        on_old = oc.get("after")
        if oc.execute_command("ROLE")[0] == b"master":
            assert on_old is None
        oc.close()
        nc.close()
    finally:
        r.close()


class _FakeSentinel:
    def __init__(self, ip: str, port: int, epoch: int) -> None:
        self.state = {"ip": ip, "port": port, "config-epoch": epoch, "is_master": True, "is_sdown": False,
                      "is_odown": False, "num-other-sentinels": 2}
        self.asked = 0

    def sentinel_masters(self) -> dict[str, dict[str, object]]:
        self.asked += 1
        return {SERVICE: self.state}


def test_discovery_believes_the_sentinel_that_saw_the_last_failover() -> None:
    from tokenfan.shared.redisconn import PrimaryWatch, SentinelTarget, _Sentinel

    stale, fresh = _FakeSentinel("10.0.0.1", 6379, 1), _FakeSentinel("10.0.0.2", 6379, 2)
    manager = _Sentinel([])
    manager.sentinels = [stale, fresh]
    manager.watch = PrimaryWatch(SentinelTarget((("s", 1),), SERVICE))  # never started: no thread
    # Nothing heard of a failover: the first answer, as redis-py takes it.
    assert manager.discover_master(SERVICE) == ("10.0.0.1", 6379) and fresh.asked == 0
    # A switch to 10.0.0.2 was announced: the stale answer is not enough; the newest epoch wins
    # and its Sentinel is asked first from then on.
    assert manager.watch.heard(f"{SERVICE} 10.0.0.1 6379 10.0.0.2 6379")
    assert manager.watch.epoch == 1 and not manager.watch.heard(f"{SERVICE} 10.0.0.1 6379 10.0.0.2 6379")
    assert manager.discover_master(SERVICE) == ("10.0.0.2", 6379)
    assert manager.sentinels[0] is fresh
    stale.asked = 0
    assert manager.discover_master(SERVICE) == ("10.0.0.2", 6379) and stale.asked == 0
    assert not manager.watch.heard("another-service 1.1.1.1 1 2.2.2.2 2") and manager.watch.epoch == 1


@pytest.mark.parametrize("how", ["sentinel_failover", "sigkill_primary"])
async def test_the_hub_follows_the_primary(sentinel_set: SentinelSet, how: str) -> None:
    """An API process's pub/sub connection is on the new primary once Sentinel names it: a
    message published there reaches a subscription that was made on the old one (with the gap
    marked, so its follower re-reads the log)."""
    from tokenfan.api.hub import Hub
    from tokenfan.shared.redisconn import async_client

    s = sentinel_set
    old, new = s.primary(), s.replica()
    client = async_client(s.url)
    hub = Hub(client)
    try:
        await hub.start()
        sub = await hub.subscribe("tf:test:channel")
        if how == "sigkill_primary":
            old.popen.send_signal(signal.SIGKILL)
        else:
            c = s.sentinels[0].client()
            assert c.execute_command("SENTINEL", "FAILOVER", SERVICE)
            c.close()
        deadline = time.monotonic() + 30
        while not s.all_agree_on(new.port):
            assert time.monotonic() < deadline, "the replica was not promoted"
            await asyncio.sleep(0.05)  # polling the Sentinels, with a deadline
        publisher = new.client()
        got: list[bytes] = []
        gap = False
        try:
            while not got:  # the hub subscribes again on the new primary: publish until it hears
                assert time.monotonic() < deadline, "the hub never heard the new primary"
                publisher.publish("tf:test:channel", b"on the new primary")
                res = await sub.get(0.1)
                if res is not None:
                    got, gap = res[0], gap or res[1]
        finally:
            publisher.close()
        assert got[0] == b"on the new primary"
        if how == "sentinel_failover":
            # Heard while the old primary still takes writes (Sentinel demotes it 8-10 s after the
            # switch, and only then would a hub left on it be dropped, or hear the new one's
            # messages through replication): the hub moved at the switch itself.
            oc = old.client()
            role = oc.execute_command("ROLE")[0]
            oc.close()
            assert role == b"master", "the hub moved only when the old primary was demoted"
    finally:
        await hub.close()
        await client.aclose()


@pytest.mark.parametrize("sentinel_set", [{"password": "servers-Pa55", "sentinel_password": "sentinels-Pa55"},
                                          {"tls": True}], indirect=True, ids=["passwords", "tls"])
async def test_passwords_and_tls_reach_the_servers_and_the_sentinels(sentinel_set: SentinelSet) -> None:
    """The URL's password reaches the servers (the clients and the hub's own connection), the
    `sentinel_password` option the Sentinels (discovery and the failover listener); with
    `rediss+sentinel://` all of them speak TLS."""
    from tokenfan.api.hub import Hub
    from tokenfan.shared.redisconn import async_client

    s = sentinel_set
    with redis.Redis(host="127.0.0.1", port=s.sentinels[0].port, socket_timeout=2) as plain, \
            pytest.raises(redis.AuthenticationError if s.password else redis.ConnectionError):
        plain.execute_command("SENTINEL", "MASTERS")  # no password, or no TLS: refused
    r = sync_client(s.url)
    client = async_client(s.url)
    hub = Hub(client)
    try:
        r.set("k", "v")
        assert await client.get("k") == b"v"
        await hub.start()
        sub = await hub.subscribe("tf:test:auth")
        assert r.publish("tf:test:auth", b"hello") == 1
        got = await sub.get(5)
        assert got is not None and got[0] == [b"hello"]
        new = s.replica()
        c = s.sentinels[0].client()
        assert c.execute_command("SENTINEL", "FAILOVER", SERVICE)
        c.close()
        watch = r.connection_pool.connection_kwargs["primary_watch"]
        deadline = time.monotonic() + 30
        while watch.primary != ("127.0.0.1", new.port):  # heard through the Sentinels' password
            assert time.monotonic() < deadline, "the listener never heard the switch"
            await asyncio.sleep(0.05)
        r.set("after", "1")
        nc = new.client()
        assert nc.get("after") == b"1"
        nc.close()
    finally:
        await hub.close()
        await client.aclose()
        r.close()
