"""The shipped nginx config, for real: Debian's nginx on the rendered ops/nginx template in front of two
real API processes and a worker (fake engine), checked through the proxy as a client meets it.

Timing is compared within one run, never against a fixed bound: the same stream is read through the
proxy and straight from a replica at once, and the proxy must deliver each token about when the replica
does (a buffering proxy holds them back and lets them out in bursts or at the end).
"""

from __future__ import annotations

import itertools
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
import redis

from tests.deploy import Nginx
from tests.procs import (
    SSE,
    Cluster,
    Proc,
    create_stream,
    expected_text,
    read_stream,
    sse_events,
    stream_status,
    wait_for,
)
from tokenfan.shared.state import StreamStatus

# The fake worker's pace for the timing test: a token every 50 ms.
RATE = 20.0
INTERVAL_S = 1 / RATE


@dataclass
class Stack:
    apis: list[Proc]
    worker: Proc
    nginx: Nginx
    cluster: Cluster

    @property
    def url(self) -> str:
        return self.nginx.url

    def api_logs(self) -> str:
        return "".join(a.log() for a in self.apis)

    def upstreams_of(self, path: str) -> list[str]:
        """The replica (`up=` in the tokenfan log format) of each logged request for `path`."""
        lines = [ln for ln in self.nginx.log().splitlines() if f" {path} " in ln or f" {path}?" in ln]
        return [m[1] for ln in lines if (m := re.search(r" up=(\S+)", ln))]


@pytest.fixture
def stack(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Stack]:
    rate = getattr(request, "param", RATE)
    apis = [cluster.api(), cluster.api()]
    worker = cluster.worker(TOKENFAN_FAKE_RATE=str(rate), TOKENFAN_FAKE_TOKENS="400")
    with Nginx([a.port for a in apis], cluster.test_name) as nginx:
        yield Stack(apis, worker, nginx, cluster)


@dataclass(eq=False)
class Reader(threading.Thread):
    """Reads a native stream in the background, noting when each event arrived."""

    base: str
    sid: str
    last: int | None = None
    events: list[SSE] = field(default_factory=list)
    arrived: dict[int, float] = field(default_factory=dict)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        super().__init__(daemon=True, name=f"reader-{self.base}")

    def run(self) -> None:
        headers = {"Last-Event-ID": str(self.last)} if self.last is not None else {}
        try:
            with httpx.stream("GET", f"{self.base}/v1/streams/{self.sid}", headers=headers,
                              timeout=httpx.Timeout(60)) as resp:
                for ev in sse_events(resp):
                    self.events.append(ev)
                    if ev.event == "token":
                        self.arrived[int(ev.id)] = time.monotonic()
                    if ev.event in ("done", "error", "reconnect"):
                        return
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


def seqs(events: list[SSE]) -> list[int]:
    return [int(e.id) for e in events if e.event in ("token", "done", "meta", "disclosure", "error")]


def text(events: list[SSE]) -> str:
    return "".join(orjson.loads(e.data)["text"] for e in events if e.event == "token")


def test_tokens_arrive_one_by_one_through_the_proxy(stack: Stack) -> None:
    n = 60
    prompt = "one token at a time please"
    sid = create_stream(stack.url, prompt, max_tokens=n)
    proxied, direct = Reader(stack.url, sid), Reader(stack.apis[0].url, sid)
    proxied.start()
    direct.start()
    for reader in (proxied, direct):
        reader.join(60)
        assert reader.error is None, reader.error
        assert reader.events and reader.events[-1].event == "done", reader.events[-3:]
    assert text(proxied.events) == text(direct.events) == expected_text(prompt, n)
    # The first few tokens may be read from the log by whichever reader subscribed second: compare the rest.
    live = sorted(set(proxied.arrived) & set(direct.arrived))[5:]
    assert len(live) >= n - 10
    lag = [proxied.arrived[s] - direct.arrived[s] for s in live]
    late = [x for x in lag if x > INTERVAL_S]
    # A buffering proxy delivers most tokens a whole stream late; a streaming one within a few ms.
    assert statistics.median(lag) < INTERVAL_S / 4, f"median lag {statistics.median(lag):.4f}s"
    assert len(late) <= len(lag) // 10, f"{len(late)} of {len(lag)} tokens a token interval late: {lag}"
    gaps = [proxied.arrived[b] - proxied.arrived[a] for a, b in itertools.pairwise(live)]
    direct_gaps = [direct.arrived[b] - direct.arrived[a] for a, b in itertools.pairwise(live)]
    # Bursts show as many near-zero gaps through the proxy where the replica had none.
    bunched = sum(g < INTERVAL_S / 5 for g in gaps) - sum(g < INTERVAL_S / 5 for g in direct_gaps)
    assert bunched <= len(gaps) // 10, f"proxied gaps {gaps}\ndirect gaps {direct_gaps}"


def test_resume_lands_exactly_on_either_replica(stack: Stack, r: redis.Redis) -> None:
    prompt = "resume me anywhere"
    sid = create_stream(stack.url, prompt, max_tokens=30)
    status, first = read_stream(stack.url, sid, stop_after=8)
    assert status == 200
    last = seqs(first)[-1]
    wait_for(lambda: stream_status(r, sid) is StreamStatus.FINISHED, timeout=30, what="the stream finished")
    _, whole = read_stream(stack.apis[0].url, sid)
    terminal = seqs(whole)[-1]
    expected = list(range(last + 1, terminal + 1))
    for api in stack.apis:  # each replica by itself ...
        _, rest = read_stream(api.url, sid, last=last)
        assert seqs(rest) == expected, api.url
    deadline = time.monotonic() + 30
    while len(set(stack.upstreams_of(f"/v1/streams/{sid}"))) < 2:  # ... and through nginx, until both served
        assert time.monotonic() < deadline, stack.nginx.log()
        _, rest = read_stream(stack.url, sid, last=last)
        assert seqs(rest) == expected
        assert text(first) + text(rest) == expected_text(prompt, 30)
    served = set(stack.upstreams_of(f"/v1/streams/{sid}"))
    assert served == {f"127.0.0.1:{a.port}" for a in stack.apis}


def serving(stack: Stack) -> Proc:
    """The one replica with a stream open (its own gauge says so)."""
    def find() -> Proc | None:
        busy = [a for a in stack.apis
                if re.search(r"^tokenfan_api_active_streams 1\.0$", httpx.get(f"{a.url}/metrics").text, re.M)]
        return busy[0] if len(busy) == 1 else None
    found: Proc = wait_for(find, timeout=15, what="the replica serving the stream")
    return found


def test_a_draining_replica_sends_reconnect_and_the_client_resumes_through_the_proxy(stack: Stack) -> None:
    prompt = "drain the replica under me"
    n = 80
    sid = create_stream(stack.url, prompt, max_tokens=n)
    before = Reader(stack.url, sid)
    before.start()
    wait_for(lambda: len(before.arrived) >= 5, timeout=15, what="tokens through the proxy")
    draining = serving(stack)
    draining.signal(signal.SIGTERM)
    before.join(30)
    assert before.error is None, before.error
    assert before.events[-1].event == "reconnect", before.events[-3:]
    resume_at = int(orjson.loads(before.events[-1].data)["last_event_id"])
    assert resume_at == seqs(before.events)[-1]
    after = Reader(stack.url, sid, last=resume_at)
    after.start()
    after.join(60)
    assert after.error is None, after.error
    assert after.events[-1].event == "done"
    got = seqs(before.events) + seqs(after.events)
    assert got == list(range(1, got[-1] + 1)), "every event exactly once, in order"
    assert text(before.events) + text(after.events) == expected_text(prompt, n)
    other = next(a for a in stack.apis if a is not draining)
    assert stack.upstreams_of(f"/v1/streams/{sid}")[-1] == f"127.0.0.1:{other.port}"


def test_the_cli_client_rides_out_a_draining_replica(stack: Stack) -> None:
    prompt = "keep chatting while one replica leaves"
    n = 80
    cli = subprocess.Popen([sys.executable, "-m", "tokenfan.ops", "chat", "--url", stack.url, "--max-tokens",
                            str(n), prompt], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        draining = serving(stack)
        draining.signal(signal.SIGTERM)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)
    assert cli.returncode == 0, err.decode()
    assert out.decode() == expected_text(prompt, n), err.decode()
    assert "drain" in draining.log() or not draining.alive()


def test_a_body_over_the_limit_gets_nginx_s_413(stack: Stack) -> None:
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 3_000_000 + b'"}]}'
    resp = httpx.post(f"{stack.url}/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"
    assert "x-request-id" not in resp.headers, "nginx answered, no replica saw it"
    # Under nginx's cap but over the API's: the replica's own 413, in the same shape.
    mid = b'{"messages": [{"role": "user", "content": "' + b"x" * 1_500_000 + b'"}]}'
    resp = httpx.post(f"{stack.url}/v1/chat/completions", content=mid,
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    assert "x-request-id" in resp.headers, "the replica answered"


@pytest.mark.soak
def test_a_slow_body_is_cut_off_by_nginx(stack: Stack) -> None:
    """client_body_timeout: a body that stops arriving ends with nginx's 408 in its log, the
    connection closed, and no replica ever sees the request."""
    host, port = "127.0.0.1", stack.nginx.port
    rid = f"slow-{secrets.token_hex(4)}"
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\nX-Request-ID: " + rid.encode() + b"\r\n\r\n{\"messages\": [")
        t0 = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    waited = time.monotonic() - t0
    assert waited >= 10, f"cut off after {waited:.1f}s, before client_body_timeout"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    wait_for(lambda: re.search(rf'"POST /v1/chat/completions HTTP/1.1" 408 .*rid={rid}', stack.nginx.log()),
             timeout=10, what=f"nginx's 408 line\n{stack.nginx.log()}")
    assert rid not in stack.api_logs()


def test_x_request_id_reaches_the_api_log(stack: Stack) -> None:
    rid = f"test-{secrets.token_hex(6)}"
    resp = httpx.post(f"{stack.url}/v1/streams", headers={"X-Request-ID": rid},
                      json={"messages": [{"role": "user", "content": "trace me"}], "max_tokens": 3}, timeout=10)
    assert resp.status_code == 201
    sid = resp.json()["id"]
    assert resp.headers["x-request-id"] == rid
    wait_for(lambda: f"request {rid}: POST /v1/streams -> 201 stream {sid}" in stack.api_logs(), timeout=10,
             what=f"{rid} in an API log")
    # Without one, nginx makes the id ($request_id); the API logs that one, nginx's log line too.
    status, _ = read_stream(stack.url, sid)
    assert status == 200
    line = wait_for(lambda: [ln for ln in stack.nginx.log().splitlines() if f"GET /v1/streams/{sid} " in ln],
                    timeout=10, what="nginx's line for the read")[-1]
    made = re.search(r" rid=([0-9a-f]{32})$", line)
    assert made, line
    wait_for(lambda: f"request {made[1]}: GET /v1/streams/{sid} -> 200 stream {sid}" in stack.api_logs(),
             timeout=10, what="nginx's request id in an API log")


def test_metrics_and_targets_stay_private_behind_the_proxy(stack: Stack) -> None:
    for path in ("/metrics", "/metrics/targets"):
        assert httpx.get(f"{stack.url}{path}", timeout=10).status_code == 404, path
    assert httpx.get(f"{stack.apis[0].url}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{stack.url}/v1/models", timeout=10).status_code == 200
