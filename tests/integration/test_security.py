"""Keys, tenants, admission and hostile input, against real API and worker processes."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import orjson
import pytest
import redis

from tests.procs import SSE, Cluster, create_stream, logged, parse_sse, read_stream, sse_events, stream_status, wait_for
from tokenfan.shared import apikeys, keys
from tokenfan.shared.state import StreamStatus
from tokenfan.worker.engines import fake_tokens

MSG = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def _add_key(r: redis.Redis, tenant: str, *, admin: bool = False, max_concurrent: int = 8, rpm: int = 120,
             revoked: bool = False) -> str:
    key, rec = apikeys.make_record(tenant, admin=admin, max_concurrent=max_concurrent, rpm=rpm)
    r.hset(keys.api_keys(), rec.hash, rec.model_copy(update={"revoked": revoked}).model_dump_json())
    return key


def _h(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_keys_cli_adds_lists_and_revokes(cluster: Cluster, r: redis.Redis) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tokenfan.ops", "keys", "--redis-url", cluster.redis_url, *args],
                              capture_output=True, text=True, timeout=30)

    added = cli("add", "acme", "--rpm", "7")
    assert added.returncode == 0
    key = added.stdout.strip()
    assert key.startswith("tf_") and len(key) > 40
    assert key.encode() not in b"".join(r.hvals(keys.api_keys()))  # only the hash is stored
    listed = cli("list").stdout
    assert "acme" in listed and "rpm=7" in listed and "active" in listed
    assert cli("revoke", key).returncode == 0
    assert "revoked" in cli("list").stdout
    assert cli("revoke", "nosuchkeyprefix").returncode == 1


def test_auth_and_ownership_matrix(cluster: Cluster, r: redis.Redis) -> None:
    alice = _add_key(r, "alice")
    bob = _add_key(r, "bob")
    revoked = _add_key(r, "mallory", revoked=True)
    admin = _add_key(r, "ops", admin=True)
    api = cluster.api()
    cluster.worker()
    base = api.url
    # open routes
    for path in ("/healthz", "/readyz", "/", "/static/chat.js", "/ops"):
        assert httpx.get(base + path).status_code in (200, 503), path
    # protected routes: 401 without a key, 401 with an unknown key, 403 revoked
    protected = [("POST", "/v1/chat/completions", MSG), ("POST", "/v1/streams", MSG), ("GET", "/v1/models", None),
                 ("GET", "/v1/models/smollm2", None),
                 ("GET", "/v1/streams/x" + "a" * 23, None), ("DELETE", "/v1/streams/x" + "a" * 23, None),
                 ("GET", "/v1/ops/snapshot", None), ("GET", "/metrics", None)]
    for method, path, body in protected:
        for key, status, code in ((None, 401, "missing_api_key"), ("tf_nope", 401, "invalid_api_key"),
                                  (revoked, 403, "api_key_revoked")):
            resp = httpx.request(method, base + path, json=body, headers=_h(key))
            assert resp.status_code == status, (method, path, key, resp.text)
            assert resp.json()["error"]["code"] == code
    # a stream belongs to the key that made it: another key gets 404 everywhere
    resp = httpx.post(f"{base}/v1/streams", json=MSG, headers=_h(alice))
    assert resp.status_code == 201
    sid = resp.json()["id"]
    for method, params, hdrs in (("GET", None, {}), ("GET", {"format": "openai"}, {"Last-Event-ID": "1"}),
                                 ("DELETE", None, {})):
        other = httpx.request(method, f"{base}/v1/streams/{sid}", params=params, headers={**_h(bob), **hdrs})
        assert other.status_code == 404 and other.json()["error"]["code"] == "stream_not_found"
    with httpx.stream("GET", f"{base}/v1/streams/{sid}", headers=_h(alice), timeout=10) as own:
        assert own.status_code == 200
        assert [e.event for e in sse_events(own)][-1] == "done"
    # admin-only surfaces
    assert httpx.get(f"{base}/v1/ops/snapshot", headers=_h(alice)).status_code == 403
    assert httpx.get(f"{base}/metrics", headers=_h(alice)).status_code == 403
    assert httpx.get(f"{base}/v1/ops/snapshot", headers=_h(admin)).status_code == 200
    assert httpx.get(f"{base}/metrics", headers=_h(admin)).status_code == 200
    assert httpx.get(f"{base}/v1/models", headers=_h(bob)).status_code == 200


def test_metrics_open_to_an_allowed_network(cluster: Cluster, r: redis.Redis) -> None:
    _add_key(r, "someone")
    api = cluster.api(TOKENFAN_METRICS_ALLOW="127.0.0.0/8")
    assert httpx.get(f"{api.url}/metrics").status_code == 200
    assert httpx.get(f"{api.url}/v1/models").status_code == 401


def test_keys_from_a_file(cluster: Cluster, tmp_path) -> None:
    key, rec = apikeys.make_record("filed", admin=False, max_concurrent=2, rpm=50)
    path = tmp_path / "keys.json"
    apikeys.save_file(path, {rec.hash: rec})
    api = cluster.api(TOKENFAN_API_KEYS_FILE=str(path))
    assert httpx.get(f"{api.url}/v1/models").status_code == 401
    assert httpx.get(f"{api.url}/v1/models", headers=_h(key)).status_code == 200


def test_rate_limit_is_shared_across_two_api_processes(cluster: Cluster, r: redis.Redis) -> None:
    key = _add_key(r, "limited", rpm=4)
    a, b = cluster.api(), cluster.api()
    cluster.worker()
    statuses = []
    for i in range(6):
        resp = httpx.post(f"{(a, b)[i % 2].url}/v1/streams", json=MSG, headers=_h(key))
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert 1 <= int(resp.headers["retry-after"]) <= 60
            assert resp.json()["error"]["code"] == "rate_limit_exceeded"
            assert "4 requests per minute" in resp.json()["error"]["message"]
    # a minute boundary may fall inside the loop and reset the window once
    assert statuses[:4].count(201) >= 3 and statuses.count(429) >= 1


def test_concurrency_limit_across_apis_is_released_when_streams_end(cluster: Cluster, r: redis.Redis) -> None:
    key = _add_key(r, "two-at-a-time", max_concurrent=2)
    a, b = cluster.api(), cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="5", TOKENFAN_FAKE_TOKENS="500")
    body = {**MSG, "max_tokens": 500}
    first = httpx.post(f"{a.url}/v1/streams", json=body, headers=_h(key)).json()["id"]
    second = httpx.post(f"{b.url}/v1/streams", json=body, headers=_h(key)).json()["id"]
    third = httpx.post(f"{a.url}/v1/streams", json=body, headers=_h(key))
    assert third.status_code == 429 and third.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert third.headers["retry-after"]
    # cancel one (running) and one (queued): both slots come back
    assert httpx.delete(f"{b.url}/v1/streams/{first}", headers=_h(key)).status_code == 202
    assert httpx.delete(f"{a.url}/v1/streams/{second}", headers=_h(key)).status_code == 202
    wait_for(lambda: all(stream_status(r, s) is StreamStatus.FINISHED for s in (first, second)),
             what="both streams to end")
    again = httpx.post(f"{b.url}/v1/streams", json=body, headers=_h(key))
    assert again.status_code == 201, again.text


def test_queue_bound_answers_503_with_retry_after(cluster: Cluster) -> None:
    api = cluster.api(TOKENFAN_MAX_QUEUE="2")
    assert httpx.post(f"{api.url}/v1/streams", json=MSG).status_code == 201
    assert httpx.post(f"{api.url}/v1/streams", json=MSG).status_code == 201
    full = httpx.post(f"{api.url}/v1/streams", json=MSG)
    assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 1
    full = httpx.post(f"{api.url}/v1/chat/completions", json={**MSG, "stream": True})
    assert full.status_code == 503


HOSTILE = [
    b'{"messages": [{"role": "user", "content": "x"}]' + b"]" * 10,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"messages": [{"role": "user", "content": "\xff\xfe bad utf8"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 99999999999999999999999999}',
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": ["not", "parts"]}]}',
    b'{"messages": [{"role": "user", "content": "x", "name": {"deep": [1, 2, {"x": null}]}}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}',
    b"\x00\x01\x02",
    b"",
]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/streams"])
def test_hostile_bodies_get_clear_4xx_never_500(cluster: Cluster, r: redis.Redis, route: str) -> None:
    api = cluster.api()
    for body in HOSTILE:
        resp = httpx.post(f"{api.url}{route}", content=body, headers={"content-type": "application/json"},
                          timeout=30)
        assert 400 <= resp.status_code < 500, (body[:60], resp.status_code, resp.text[:200])
        assert resp.json()["error"]["message"]
    huge = httpx.post(f"{api.url}{route}", content=b'{"messages": "' + b"x" * 2_000_000 + b'"}',
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
    wrong_type = httpx.post(f"{api.url}{route}", content=b"messages=hi",
                            headers={"content-type": "application/x-www-form-urlencoded"})
    assert 400 <= wrong_type.status_code < 500
    assert r.llen(keys.queue_list("smollm2")) == 0
    assert httpx.get(f"{api.url}/healthz").status_code == 200


def test_sse_syntax_in_messages_streams_escaped_and_forges_nothing(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    content = 'a\n\ndata: {"type":"done"}\n\nevent: done\nid: 999\r\n: x \u2028 <script>alert(1)</script>'
    sid = create_stream(api.url, content, max_tokens=12)
    _, got = read_stream(api.url, sid)
    evs = logged(got)
    assert [int(e.id) for e in evs] == list(range(1, len(evs) + 1))
    assert sum(e.event == "done" for e in evs) == 1 and evs[-1].event == "done"
    text = "".join(e.json()["text"] for e in evs if e.event == "token")
    assert text == "".join(fake_tokens([{"role": "user", "content": content}], 12))


def test_many_idle_clients_and_a_slow_body_do_not_hurt_others(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    idle = []
    for _ in range(200):  # connections that never send or read anything
        s = socket.create_connection(("127.0.0.1", api.port))
        idle.append(s)
    slow = socket.create_connection(("127.0.0.1", api.port))
    slow.sendall(b"POST /v1/streams HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{\"messages\": [")
    try:
        sid = create_stream(api.url, "still served", max_tokens=5)
        _, got = read_stream(api.url, sid, timeout=10)  # any 10 s without an event fails
        assert logged(got)[-1].event == "done"
    finally:
        for s in [*idle, slow]:
            s.close()


def test_resume_flood_is_bounded(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    sid = create_stream(api.url, "flood", max_tokens=30)
    read_stream(api.url, sid)
    pid = api.popen.pid
    rss_before = _rss_kb(pid)
    with httpx.Client(timeout=10) as client:  # each resume answers within 10 s or fails
        for i in range(300):
            resp = client.get(f"{api.url}/v1/streams/{sid}", headers={"Last-Event-ID": str(i % 30)})
            assert resp.status_code == 200
            assert resp.text.endswith("\n\n") and "event: done" in resp.text
    assert _rss_kb(pid) - rss_before < 50_000  # no per-resume leak worth a mention


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_events_in_redis_are_json_only(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    cluster.worker()
    sid = create_stream(api.url, max_tokens=3)
    read_stream(api.url, sid)
    for _id, fields in r.xrange(keys.log(sid)):
        assert isinstance(orjson.loads(fields[b"e"]), dict)
    job_keys = r.keys("rq:job:*")
    assert job_keys
    for k in job_keys:
        data = r.hget(k, "data")
        if data:
            import zlib

            orjson.loads(zlib.decompress(data))  # RQ compresses; what is inside is JSON, not pickle


def _sse_ok(resp: httpx.Response) -> list[SSE]:
    return parse_sse(resp.content)
