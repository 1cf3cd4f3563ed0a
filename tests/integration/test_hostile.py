"""Odd and hostile clients (issue 14) against real API and worker processes, with or without a proxy's help.

Each bound the API keeps on its own: the size of a request's head, the times
to receive the head and the body, a chunked body over the cap, strict
Last-Event-IDs and JSON, the docs routes behind a key, what a refused request
costs a key's rpm, a dead worker leaving the registry. Every wait has a
deadline; memory is bounded by RSS deltas and socket counts, not by time.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests import hostile
from tests.procs import (
    Cluster,
    Proc,
    create_stream,
    expected_text,
    logged,
    read_stream,
    sse_events,
    stream_status,
    wait_for,
)
from tokenfan.shared import apikeys, keys
from tokenfan.shared.defaults import MAX_HEADER_BYTES, MAX_TOKENS_CAP, SEQ_SLACK, WORKER_LIVE_S
from tokenfan.shared.state import StreamStatus

MSG = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
# Short bounds for the tests that wait for them (the defaults are 15 s and 60 s).
FAST = {"TOKENFAN_HEADER_TIMEOUT_S": "1", "TOKENFAN_BODY_TIMEOUT_S": "2"}
# A client left running by a bound that does not hold ends here, and the test fails on it.
DEADLINE_S = 30.0
SEQ_BOUND = MAX_TOKENS_CAP + SEQ_SLACK


def _add_key(r: redis.Redis, tenant: str, *, max_concurrent: int = 8, rpm: int = 120) -> tuple[str, str]:
    key, rec = apikeys.make_record(tenant, admin=False, max_concurrent=max_concurrent, rpm=rpm)
    r.hset(keys.api_keys(), rec.hash, rec.model_dump_json())
    return key, rec.owner


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _err(resp: httpx.Response) -> str:
    return str(resp.json()["error"]["code"])


def _serves_a_stream(api: Proc, content: str = "still served", n: int = 8) -> None:
    """Another client gets its whole stream, exactly (any 10 s without an event fails)."""
    sid = create_stream(api.url, content, max_tokens=n)
    _, got = read_stream(api.url, sid, timeout=10)
    evs = logged(got)
    assert [int(e.id) for e in evs] == list(range(1, n + 4)) and evs[-1].event == "done"
    assert "".join(e.json()["text"] for e in evs if e.event == "token") == expected_text(content, n)


def _get_healthz(s: socket.socket) -> bytes:
    """One request on a kept-alive socket and its whole response (the head and the body come apart)."""
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got or len(got) < _response_length(got):
        chunk = s.recv(65536)
        assert chunk, f"closed after {got!r}"
        got += chunk
    return got


def _response_length(got: bytes) -> int:
    head, _, _ = got.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    length = int(lengths[0])
    return len(head) + 4 + length


# --- 3. the request head is bounded ------------------------------------------------------------

def test_huge_headers_are_refused_and_hold_no_memory(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    # Just under the bound is a request like any other.
    fits = httpx.get(f"{api.url}/healthz", headers={"X-Fits": "a" * (MAX_HEADER_BYTES - 1024)})
    assert fits.status_code == 200
    one = hostile.huge_header(api.port, 64_000_000, DEADLINE_S)
    assert one.status == 431 and one.closed and b'"code":"headers_too_large"' in one.answer
    line = hostile.huge_header(api.port, 64_000_000, DEADLINE_S, in_line=True)
    assert line.status == 414 and line.closed
    assert one.sent < 8_000_000 and line.sent < 8_000_000  # refused near the bound, not at 64 MB
    rss = hostile.rss_kb(api.popen.pid)
    with hostile.crowd() as c:  # unbounded, these held 50 MB each before anyone was authenticated
        c.run(hostile.huge_header, api.port, 50_000_000, DEADLINE_S, times=16)
        _serves_a_stream(api)
        got = c.results(timeout=DEADLINE_S * 2)
    assert all(o.closed and o.status in (431, None) for o in got), [(o.status, o.closed) for o in got]
    assert sum(o.sent for o in got) < 16 * 50_000_000 / 4
    assert hostile.rss_kb(api.popen.pid) - rss < 40_000  # 16 x 50 MB would be 800 MB
    assert httpx.get(f"{api.url}/healthz").status_code == 200


# --- 4. slow and silent connections are closed ---------------------------------------------------

def test_silent_and_slow_connections_are_closed_by_the_api_itself(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api(**FAST)
    cluster.worker()
    with hostile.crowd() as c:
        c.run(hostile.silent, api.port, DEADLINE_S, times=5)
        c.run(hostile.slow_header, api.port, 0.2, DEADLINE_S, times=5)
        c.run(hostile.slow_body, api.port, "/v1/streams", 1000, 0.2, DEADLINE_S, times=5)
        _serves_a_stream(api)
        silent, slow_head, slow_body = (c.results(timeout=DEADLINE_S * 2)[i:i + 5] for i in (0, 5, 10))
    assert all(o.closed and o.status is None and not o.answer for o in silent)  # closed, no answer
    for o in slow_head + slow_body:  # still sending when the bound came: 408, then the close
        assert o.closed and o.status == 408 and b'"code":"request_timeout"' in o.answer, o
    assert all(o.sent < 1000 + 200 for o in slow_body)
    assert r.llen(keys.queue_list("smollm2")) == 0  # a body that never came made no stream


def test_the_timeouts_leave_kept_alive_connections_and_long_streams_alone(cluster: Cluster) -> None:
    api = cluster.api(**FAST)
    cluster.worker(TOKENFAN_FAKE_RATE="10")
    s = socket.create_connection(("127.0.0.1", api.port), timeout=DEADLINE_S)
    try:
        assert _get_healthz(s).startswith(b"HTTP/1.1 200")
        # Idle longer than both bounds on one connection: that is the keep-alive timeout's business
        # (75 s), not theirs. The wait is the condition under test, not a stand-in for one.
        time.sleep(3.5)
        assert _get_healthz(s).startswith(b"HTTP/1.1 200")
    finally:
        s.close()
    # A stream that outlasts both bounds (40 tokens at 10/s) is read whole, on either route.
    content = "a long one"
    _serves_a_stream(api, content, 40)
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=10) as resp:
        frames = list(sse_events(resp))
    assert frames[-1].data == "[DONE]"


def test_a_kept_alive_connections_next_request_is_timed_from_its_first_byte(cluster: Cluster) -> None:
    api = cluster.api(**FAST)
    s = socket.create_connection(("127.0.0.1", api.port), timeout=DEADLINE_S)
    try:
        assert _get_healthz(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
        t0 = time.monotonic()
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < DEADLINE_S
    finally:
        s.close()


# --- 5. a chunked body over the cap is 413 like a declared one ----------------------------------

def test_chunked_body_over_the_cap_is_413_like_content_length(cluster: Cluster) -> None:
    api = cluster.api(**FAST)
    ten_mb = b"x" * 10_000_000

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(ten_mb), 65536):
            yield ten_mb[i:i + 65536]

    for route in ("/v1/streams", "/v1/chat/completions"):
        for content in (ten_mb, chunks()):
            resp = httpx.post(f"{api.url}{route}", content=content, headers={"content-type": "application/json"},
                              timeout=DEADLINE_S)
            assert resp.status_code == 413 and _err(resp) == "payload_too_large", resp.text
    endless = hostile.chunked_flood(api.port, "/v1/streams", None, DEADLINE_S)
    assert endless.status == 413 and endless.closed  # answered, then cut by the body timeout
    rss = hostile.rss_kb(api.popen.pid)
    with hostile.crowd() as c:
        c.run(hostile.chunked_flood, api.port, "/v1/streams", None, DEADLINE_S, times=8)
        got = c.results(timeout=DEADLINE_S * 2)
    assert all(o.closed and o.status in (413, None) for o in got)
    assert hostile.rss_kb(api.popen.pid) - rss < 40_000


# --- 7. strict JSON -------------------------------------------------------------------------------

STRICT_BODIES = [
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.0}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "2"}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": 1}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "0.5"}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": false}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": "true"}}',
     "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe bad utf8"}]}', "invalid_json"),
    ('{"messages": [{"role": "user", "content": "x"}]}'.encode("utf-16"), "invalid_json"),
    (b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "x"}]}', "invalid_json"),
    (b"[" * 10_000 + b"]" * 10_000, "invalid_json"),
    (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "invalid_json"),
    (b"[" * 65 + b"]" * 65, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"7" * 5000 + b"}", "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}]', "invalid_json"),
]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/streams"])
def test_booleans_and_integers_are_strict_and_malformed_json_says_so(cluster: Cluster, r: redis.Redis,
                                                                      route: str) -> None:
    api = cluster.api()
    for body, code in STRICT_BODIES:
        resp = httpx.post(f"{api.url}{route}", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and _err(resp) == code, (body[:70], resp.status_code, resp.text[:200])
    assert r.llen(keys.queue_list("smollm2")) == 0
    # An integer where a number goes is a number (JSON has one number type); a depth of 64 is fine.
    ok = {"messages": [{"role": "user", "content": "x", "name": "n"}], "max_tokens": 2, "temperature": 1}
    assert httpx.post(f"{api.url}/v1/streams", json=ok).status_code == 201
    deep = b'{"messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * 62 + b"]" * 62 + b"}"
    assert httpx.post(f"{api.url}/v1/streams", content=deep,
                      headers={"content-type": "application/json"}).status_code == 201


# --- 1, 2 and 7. resume ids -----------------------------------------------------------------------

def test_odd_resume_ids_get_400_from_header_and_query_alike(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="5", TOKENFAN_FAKE_TOKENS="500")
    running = create_stream(api.url, "still running", max_tokens=500)
    for odd in [*hostile.ODD_RESUME_IDS, str(SEQ_BOUND + 1), str(2**64), str(2**64 + 5)]:
        as_header = httpx.get(f"{api.url}/v1/streams/{running}", headers={"Last-Event-ID": odd.encode()})
        as_query = httpx.get(f"{api.url}/v1/streams/{running}", params={"last_event_id": odd})
        for resp in (as_header, as_query):
            assert resp.status_code == 400 and _err(resp) == "invalid_last_event_id", (odd[:30], resp.text)
    # The largest id any stream can reach is a valid id: it waits for the stream like any other.
    with httpx.stream("GET", f"{api.url}/v1/streams/{running}", headers={"Last-Event-ID": str(SEQ_BOUND)},
                      timeout=10) as resp:
        assert resp.status_code == 200
    assert httpx.delete(f"{api.url}/v1/streams/{running}").status_code == 202


@pytest.mark.parametrize("fmt", ["native", "openai"])
def test_a_resume_past_the_end_of_a_running_stream_ends_with_the_stream(cluster: Cluster, r: redis.Redis,
                                                                         fmt: str) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="20")
    sid = create_stream(api.url, "short", max_tokens=20)  # 23 events, about a second
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", params={"format": fmt},
                      headers={"Last-Event-ID": "500"}, timeout=httpx.Timeout(DEADLINE_S)) as resp:
        assert resp.status_code == 200
        frames = list(sse_events(resp))  # ends when the stream ends, not never
    wait_for(lambda: stream_status(r, sid) is StreamStatus.FINISHED, what="the stream to finish")
    if fmt == "native":
        assert [f.event for f in frames] == ["error"]
        err = frames[0].json()
        assert err["code"] == "invalid_last_event_id" and err["retryable"] is False
        assert "ended at event 23" in err["message"]
    else:
        assert frames[-1].data == "[DONE]" and '"invalid_last_event_id"' in frames[0].data
    # Finished: the same id is a 204 at once, as any id at or past its end.
    ended = httpx.get(f"{api.url}/v1/streams/{sid}", headers={"Last-Event-ID": "500"})
    assert ended.status_code == 204


# --- 6. the docs routes ---------------------------------------------------------------------------

DOCS = ("/docs", "/redoc", "/openapi.json")


def test_docs_need_a_key_once_keys_exist_unless_public(cluster: Cluster, r: redis.Redis) -> None:
    open_api = cluster.api()
    for path in DOCS:
        assert httpx.get(open_api.url + path).status_code == 200, path  # no key anywhere: open
    key, _ = _add_key(r, "reader")
    closed, public = cluster.api(), cluster.api(TOKENFAN_PUBLIC_DOCS="true")
    for path in DOCS:
        resp = httpx.get(closed.url + path)
        assert resp.status_code == 401 and _err(resp) == "missing_api_key", path
        assert httpx.get(closed.url + path, headers=_h("tf_nope")).status_code == 401
        assert httpx.get(closed.url + path, headers=_h(key)).status_code == 200
        assert httpx.get(public.url + path).status_code == 200
    assert "/v1/streams" in httpx.get(closed.url + "/openapi.json", headers=_h(key)).json()["paths"]
    assert httpx.get(public.url + "/v1/models").status_code == 401  # public docs open nothing else


# --- 8. a request refused for concurrency counts toward rpm ---------------------------------------

def test_a_request_refused_for_concurrency_uses_up_its_place_in_the_minute(cluster: Cluster, r: redis.Redis) -> None:
    # The rate counts in minute windows. A run that straddles two of them proves nothing: it runs
    # again with a key of its own (the sequence takes seconds, so a second straddle is all but
    # impossible; a third attempt fails the test). The keys exist before the API starts.
    tenants = [_add_key(r, f"five-a-minute-{attempt}", max_concurrent=2, rpm=5) for attempt in range(3)]
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="5", TOKENFAN_FAKE_TOKENS="500")
    body = {**MSG, "max_tokens": 500}
    for key, owner in tenants:  # noqa: B007 (the owner of the run that counted is read below)
        minute = int(time.time() // 60)

        def post(key: str = key) -> httpx.Response:
            return httpx.post(f"{api.url}/v1/streams", json=body, headers=_h(key), timeout=10)

        first, second, third = post(), post(), post()
        for resp in (first, second):
            if resp.status_code == 201:
                assert httpx.delete(f"{api.url}/v1/streams/{resp.json()['id']}", headers=_h(key)).status_code == 202
        admitted = [x.json()["id"] for x in (first, second) if x.status_code == 201]
        wait_for(lambda: all(stream_status(r, sid) is StreamStatus.FINISHED for sid in admitted),  # noqa: B023
                 what="both streams to end")
        fourth, fifth, sixth = post(), post(), post()
        if int(time.time() // 60) == minute:
            break
    else:
        pytest.fail("three runs in a row straddled a minute")
    assert (first.status_code, second.status_code) == (201, 201)
    assert third.status_code == 429 and _err(third) == "concurrency_limit_exceeded"
    assert (fourth.status_code, fifth.status_code) == (201, 201)
    assert sixth.status_code == 429 and _err(sixth) == "rate_limit_exceeded"  # four admitted, five counted
    assert int(r.get(keys.rate_window(owner, minute)) or 0) == 6  # every request admission saw


# --- 9. a SIGKILLed worker leaves the registry ----------------------------------------------------

def test_a_sigkilled_worker_leaves_the_registry_within_the_liveness_window(cluster: Cluster,
                                                                            r: redis.Redis) -> None:
    api = cluster.api()
    dead, alive = cluster.worker(), cluster.worker()
    solo = cluster.worker(TOKENFAN_MODEL="solo")  # the only worker of its model: nobody else beats there
    for w in (dead, solo):
        os.kill(w.popen.pid, signal.SIGKILL)
        w.popen.wait(timeout=10)
    killed_at = time.monotonic()
    wait_for(lambda: r.zscore(keys.workers("smollm2"), dead.name) is None, timeout=WORKER_LIVE_S + 20,
             what="the dead worker to leave the registry")
    # The API's own reads of the registry (here /v1/models) drop a model's dead workers too.
    wait_for(lambda: httpx.get(f"{api.url}/v1/models").status_code == 200
             and r.zscore(keys.workers("solo"), solo.name) is None, timeout=WORKER_LIVE_S + 20,
             what="the solo worker to leave the registry")
    assert time.monotonic() - killed_at >= WORKER_LIVE_S - 1  # not before its heartbeat was stale
    assert r.zscore(keys.workers("smollm2"), alive.name) is not None
    names = [m["id"] for m in httpx.get(f"{api.url}/v1/models").json()["data"]]
    assert "solo" not in names and "smollm2" in names
    workers = httpx.get(f"{api.url}/v1/ops/snapshot").json()["workers"]
    assert [w["name"] for w in workers] == [alive.name]


# --- all of it at once: the API goes on serving others, its memory bounded ------------------------

def test_a_hostile_crowd_leaves_the_api_serving_others_with_bounded_memory(cluster: Cluster) -> None:
    api = cluster.api(**FAST)
    cluster.worker()
    finished = create_stream(api.url, "done already", max_tokens=4)
    read_stream(api.url, finished)
    _serves_a_stream(api)  # warm: the first stream's imports and caches are not the crowd's memory
    pid = api.popen.pid
    rss, sockets = hostile.rss_kb(pid), hostile.open_sockets(pid)
    with hostile.crowd(workers=96) as c:
        c.run(hostile.huge_header, api.port, 20_000_000, DEADLINE_S, times=8)
        c.run(hostile.huge_header, api.port, 20_000_000, DEADLINE_S, times=2, in_line=True)
        c.run(hostile.slow_header, api.port, 0.2, DEADLINE_S, times=20)
        c.run(hostile.slow_body, api.port, "/v1/chat/completions", 1000, 0.2, DEADLINE_S, times=20)
        c.run(hostile.chunked_flood, api.port, "/v1/streams", None, DEADLINE_S, times=4)
        c.run(hostile.silent, api.port, DEADLINE_S, times=30)
        for odd in hostile.ODD_RESUME_IDS[:6]:
            resp = httpx.get(f"{api.url}/v1/streams/{finished}", headers={"Last-Event-ID": odd.encode()})
            assert resp.status_code == 400
        for i in range(3):  # others are served, exactly, while the crowd is at it
            _serves_a_stream(api, f"served {i}")
        got = c.results(timeout=DEADLINE_S * 3)
    assert len(got) == 84 and all(o.closed for o in got), [(o.status, o.closed) for o in got if not o.closed]
    assert hostile.rss_kb(pid) - rss < 60_000
    # Every hostile connection is gone from the API process, not only from our side.
    wait_for(lambda: hostile.open_sockets(pid) <= sockets + 2, timeout=DEADLINE_S,
             what=f"the API's sockets back to {sockets}")
    _serves_a_stream(api, "after the crowd")
