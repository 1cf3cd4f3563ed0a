"""The streaming path across real processes: API → Redis/RQ → worker → pub/sub → SSE."""

from __future__ import annotations

import concurrent.futures as cf
import zlib

import httpx
import openai
import orjson
import pytest
import redis

from tests.procs import Cluster, create_stream, expected_text, logged, read_stream, sse_events, wait_for
from tokenfan.shared import keys


def _check_native(got: list, content: str, n: int) -> None:
    evs = logged(got)
    assert [int(e.id) for e in evs] == list(range(1, len(evs) + 1)), "seq has a gap or a duplicate"
    assert [e.event for e in evs[:2]] == ["meta", "disclosure"]
    assert evs[-1].event == "done"
    assert sum(e.event in ("done", "error") for e in evs) == 1
    text = "".join(e.json()["text"] for e in evs if e.event == "token")
    assert text == expected_text(content, n)
    assert all(e.json()["seq"] == int(e.id) for e in evs)


def test_native_stream_delivers_exact_tokens_in_order(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    sid = create_stream(api.url, "tell me about fans", max_tokens=20)
    status, got = read_stream(api.url, sid)
    assert status == 200
    _check_native(got, "tell me about fans", 20)
    meta = logged(got)[0].json()
    assert meta["stream_id"] == sid and meta["model"] == "smollm2" and meta["worker"]
    done = logged(got)[-1].json()
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 20
    assert set(done["timings"]) >= {"queue_wait_ms", "ttft_ms", "tokens_per_s", "worker", "gen_ms"}


def test_stream_response_headers_stop_proxy_buffering(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    sid = create_stream(api.url, max_tokens=2)
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=10) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-accel-buffering"] == "no"
        assert resp.headers["cache-control"] == "no-store"
        resp.read()


def test_two_apis_two_workers_twenty_concurrent_streams(cluster: Cluster, r: redis.Redis) -> None:
    apis = [cluster.api(), cluster.api()]
    workers = [cluster.worker(TOKENFAN_FAKE_RATE="100"), cluster.worker(TOKENFAN_FAKE_RATE="100")]
    prompts = [f"stream number {i}" for i in range(20)]

    def one(i: int) -> tuple[str, list]:
        base = apis[i % 2].url
        sid = create_stream(base, prompts[i], max_tokens=10)
        status, got = read_stream(apis[(i + 1) % 2].url, sid)  # read on the other API
        assert status == 200
        return prompts[i], got

    with cf.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    served_by = set()
    for prompt, got in results:
        _check_native(got, prompt, 10)
        served_by.add(logged(got)[0].json()["worker"])
    assert served_by == {w.name for w in workers}


def test_openai_client_streams_and_completes(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    content = "openai client check"
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": content}], max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert text == expected_text(content, 8)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

    full = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": content}],
                                          max_tokens=8)
    assert full.choices[0].message.content == expected_text(content, 8)
    assert full.usage is not None and full.usage.completion_tokens == 8
    assert [m.id for m in client.models.list()] == ["smollm2"]


def test_openai_chunks_carry_sse_ids(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    body = {"messages": [{"role": "user", "content": "ids"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=10) as resp:
        sid = resp.headers["x-tokenfan-stream-id"]
        frames = list(sse_events(resp))
    assert frames[-1].data == "[DONE]"
    ids = [int(f.id) for f in frames[:-1]]  # an id repeats only if a chunk came without one of its own
    assert ids[0] == 1 and ids == sorted(set(ids))
    assert {orjson.loads(f.data)["id"] for f in frames[:-1]} == {sid}


BAD_BODIES = [
    ("{not json", "invalid_json"),
    ('{"messages": []}', "invalid_value"),
    ('{"messages": "hi"}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": ""}]}', "invalid_value"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": 5}]}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 999999}', "max_tokens_too_large"),
    ('{"messages": [{"role": "user", "content": "x"}], "model": "nope"}', "model_not_found"),
    ('[1, 2]', "invalid_value"),
    # Found by the schema fuzzer: both were a 500 (orjson cannot store either).
    ('{"messages": [{"role": "user", "content": "a\\udbf9b"}]}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "stop": ["\\ud800"]}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "seed": -75027582023117910647228071936}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "seed": 9223372036854775808}', "invalid_value"),
]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/streams"])
def test_bad_input_gets_openai_shaped_4xx_and_enqueues_nothing(cluster: Cluster, r: redis.Redis,
                                                                route: str) -> None:
    api = cluster.api()
    for body, code in BAD_BODIES:
        resp = httpx.post(f"{api.url}{route}", content=body, headers={"content-type": "application/json"})
        assert 400 <= resp.status_code < 500, (body, resp.status_code, resp.text)
        err = resp.json()["error"]
        assert err["code"] == code, (body, err)
        assert err["message"] and "type" in err
    assert r.llen(keys.queue_list("smollm2")) == 0
    assert not r.keys(keys.stream_tag("*") + "*")
    # Under the body cap (1 MB) but over max_prompt_chars (100,000): the prompt, not the body, is refused.
    long_prompt = {"messages": [{"role": "user", "content": "x" * 200_000}]}
    resp = httpx.post(f"{api.url}{route}", json=long_prompt)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded", resp.text
    # Over the body cap: 413 before the body is parsed.
    huge = {"messages": [{"role": "user", "content": "x" * 1_100_000}]}
    resp = httpx.post(f"{api.url}{route}", json=huge)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large", resp.text


def test_unknown_stream_is_404_and_bad_last_event_id_is_400(cluster: Cluster) -> None:
    api = cluster.api()
    resp = httpx.get(f"{api.url}/v1/streams/doesnotexist000000000000")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "stream_not_found"
    cluster.worker()
    sid = create_stream(api.url, max_tokens=2)
    resp = httpx.get(f"{api.url}/v1/streams/{sid}", headers={"Last-Event-ID": "abc"})
    assert resp.status_code == 400


def test_engine_failure_ends_stream_with_one_error_event(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_FAIL_AFTER="3")
    sid = create_stream(api.url, max_tokens=10)
    _, got = read_stream(api.url, sid)
    evs = logged(got)
    assert [e.event for e in evs] == ["meta", "disclosure", "token", "token", "token", "error"]
    assert evs[-1].json()["code"] == "engine_error" and evs[-1].json()["retryable"] is True
    resp = httpx.post(f"{api.url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 10})
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "engine_error"


def test_prompt_over_the_context_ends_with_context_error(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_N_CTX="64")
    sid = create_stream(api.url, "word " * 400, max_tokens=5)
    _, got = read_stream(api.url, sid)
    evs = logged(got)
    assert evs[-1].event == "error" and evs[-1].json()["code"] == "context_length_exceeded"
    assert sum(e.event in ("done", "error") for e in evs) == 1
    resp = httpx.post(f"{api.url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 5})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"


def test_job_timeout_ends_stream_with_error(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_JOB_TIMEOUT_S="6", TOKENFAN_FAKE_RATE="2", TOKENFAN_FAKE_TOKENS="100")
    sid = create_stream(api.url, max_tokens=100)
    _, got = read_stream(api.url, sid, timeout=30)
    evs = logged(got)
    assert evs[-1].event == "error" and evs[-1].json()["code"] == "timeout"


def test_redis_unreachable_is_503(cluster: Cluster, own_redis) -> None:
    cluster.redis_url = own_redis.url
    api = cluster.api()
    own_redis.stop()
    resp = httpx.post(f"{api.url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "x"}], "stream": True}, timeout=60)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "redis_unavailable"
    assert httpx.get(f"{api.url}/readyz", timeout=60).status_code == 503


def test_invalid_job_payload_is_rejected_with_error_event_not_run(cluster: Cluster, r: redis.Redis) -> None:
    from tokenfan.shared import jobs

    api = cluster.api()
    cluster.worker()
    sid = create_stream(api.url, max_tokens=3)
    read_stream(api.url, sid)  # the real one, to finish first
    # now a hand-made job with a bad payload for a fresh queued stream
    sid2 = create_stream(api.url, max_tokens=3)
    read_stream(api.url, sid2)
    r.hset(keys.state(sid2), mapping={"status": "queued"})
    r.delete(keys.log(sid2))
    q = jobs.queue(r, "smollm2")
    q.enqueue_call(func=jobs.JOB_FUNC, args=({"stream_id": sid2, "max_tokens": "lots", "code": "evil"},),
                   job_id=f"{sid2}_9")
    stored = r.hget(f"rq:job:{sid2}_9", "data")
    assert stored is not None
    # RQ stores (function, instance, args, kwargs) compressed; with our serializer that is JSON, not a pickle.
    func, _, args, _ = orjson.loads(zlib.decompress(stored))
    assert func == jobs.JOB_FUNC and args == [{"stream_id": sid2, "max_tokens": "lots", "code": "evil"}]
    wait_for(lambda: r.xlen(keys.log(sid2)) >= 1, what="the rejection event")
    _, got2 = read_stream(api.url, sid2)
    evs = logged(got2)
    assert [e.event for e in evs] == ["error"]
    assert evs[0].json()["code"] == "invalid_job"


def test_models_and_health(cluster: Cluster) -> None:
    api = cluster.api()
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api.url}/readyz")
    assert ready.status_code == 503 and "no live worker" in ready.json()["reason"]
    cluster.worker()
    wait_for(lambda: httpx.get(f"{api.url}/readyz").status_code == 200, what="readyz 200")
    assert [m["id"] for m in httpx.get(f"{api.url}/v1/models").json()["data"]] == ["smollm2"]


def test_heartbeat_comments_during_silence(cluster: Cluster) -> None:
    api = cluster.api(TOKENFAN_HEARTBEAT_S="0.5")
    cluster.worker(TOKENFAN_FAKE_PREFILL_S="2.5")
    sid = create_stream(api.url, max_tokens=2)
    lines = []
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=10) as resp:
        for line in resp.iter_lines():
            lines.append(line)
            if line.startswith("event: done"):
                break
    pings = [ln for ln in lines if ln.startswith(": ping")]
    assert len(pings) >= 2
    assert lines.index(pings[0]) < next(i for i, ln in enumerate(lines) if ln == "event: token")
