"""Resume, many viewers, cancel, abandoned streams, queue positions: real processes, real Redis."""

from __future__ import annotations

import concurrent.futures as cf
import random
import time

import httpx
import orjson
import redis

from tests.procs import (
    SSE,
    Cluster,
    create_stream,
    expected_text,
    logged,
    read_stream,
    sse_events,
    stream_status,
    token_text,
    wait_for,
)
from tokenfan.shared import keys
from tokenfan.shared.state import StreamStatus


def _assert_exact(evs: list[SSE], n_total: int | None = None) -> None:
    seqs = [int(e.id) for e in evs]
    assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate: {seqs}"
    assert sum(e.event in ("done", "error") for e in evs) == 1 and evs[-1].event in ("done", "error")
    if n_total is not None:
        assert len(evs) == n_total


def _read_with_drops(bases: list[str], sid: str, drop_points: list[int]) -> list[SSE]:
    """Read a stream, dropping the connection after each number of events, resuming each time."""
    got: list[SSE] = []
    last: int | None = None
    for i, point in enumerate([*drop_points, None]):
        status, part = read_stream(bases[i % len(bases)], sid, last=last, stop_after=point)
        if status == 204:
            break
        assert status == 200
        part = logged(part)
        got += part
        if part:
            last = int(part[-1].id)
        if part and part[-1].event in ("done", "error"):
            break
    return got


def test_resume_at_random_points_while_generating(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="100")
    rng = random.Random(7)
    n = 20  # meta + disclosure + 20 tokens + done = 23 events
    points_sets = [[1], [22], [23], [2, 5], [1, 1, 1], [rng.randint(1, 5) for _ in range(5)]]
    points_sets += [[rng.randint(1, 8) for _ in range(rng.randint(1, 4))] for _ in range(6)]
    for points in points_sets:
        content = f"resume test {points}"
        sid = create_stream(api.url, content, max_tokens=n)
        evs = _read_with_drops([api.url], sid, points)
        _assert_exact(evs, n + 3)
        assert token_text(evs) == expected_text(content, n), points


def test_resume_after_finish_and_on_another_api(cluster: Cluster) -> None:
    a, b = cluster.api(), cluster.api()
    cluster.worker()
    sid = create_stream(a.url, "two apis", max_tokens=10)
    _, full = read_stream(a.url, sid)
    full = logged(full)
    _assert_exact(full, 13)
    for cut in range(0, 13):
        status, rest = read_stream(b.url, sid, last=cut)
        assert status == 200
        assert [e.data for e in logged(rest)] == [e.data for e in full[cut:]]
    assert read_stream(b.url, sid, last=13)[0] == 204
    assert read_stream(b.url, sid, last=99)[0] == 204
    # the query parameter works like the header
    status, rest = read_stream(b.url, sid, params={"last_event_id": "11"})
    assert status == 200 and [e.id for e in logged(rest)] == ["12", "13"]


def test_drop_mid_stream_and_resume_on_other_api_while_live(cluster: Cluster) -> None:
    a, b = cluster.api(), cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="40")
    sid = create_stream(a.url, "live switch", max_tokens=30)
    evs = _read_with_drops([a.url, b.url], sid, [4, 6, 9])
    _assert_exact(evs, 33)
    assert token_text(evs) == expected_text("live switch", 30)


def test_three_viewers_get_the_full_sequence(cluster: Cluster) -> None:
    api = cluster.api()
    api2 = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="50")
    sid = create_stream(api.url, "three viewers", max_tokens=25)
    with cf.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda base: read_stream(base, sid)[1], [api.url, api.url, api2.url]))
    for got in results:
        evs = logged(got)
        _assert_exact(evs, 28)
        assert token_text(evs) == expected_text("three viewers", 25)


def test_openai_format_resumes_to_done(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="100")
    body = {"messages": [{"role": "user", "content": "openai resume"}], "max_tokens": 12, "stream": True}
    frames: list[SSE] = []
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=10) as resp:
        sid = resp.headers["x-tokenfan-stream-id"]
        for f in sse_events(resp):
            frames.append(f)
            if len(frames) == 4:
                break
    last = frames[-1].id
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", params={"format": "openai"},
                      headers={"Last-Event-ID": last}, timeout=10) as resp:
        rest = list(sse_events(resp))
    assert rest[-1].data == "[DONE]"
    chunks = [orjson.loads(f.data) for f in frames + rest[:-1]]
    assert {c["id"] for c in chunks} == {sid}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected_text("openai resume", 12)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_unknown_and_expired_streams_are_404(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api(TOKENFAN_LOG_TTL_S="1")
    cluster.worker(TOKENFAN_LOG_TTL_S="1")
    sid = create_stream(api.url, max_tokens=2)
    _, got = read_stream(api.url, sid)
    assert logged(got)[-1].event == "done"
    assert 0 < r.ttl(keys.log(sid)) <= 1
    wait_for(lambda: httpx.get(f"{api.url}/v1/streams/{sid}").status_code == 404, timeout=5,
             what="the finished stream to expire")
    assert httpx.get(f"{api.url}/v1/streams/{sid}").json()["error"]["code"] == "stream_not_found"
    assert r.xlen(keys.log(sid)) == 0


def test_log_is_capped(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_LOG_MAXLEN="5", TOKENFAN_FAKE_RATE="0", TOKENFAN_FAKE_TOKENS="400")
    sid = create_stream(api.url, max_tokens=400)
    wait_for(lambda: stream_status(r, sid) is StreamStatus.FINISHED, what="finish")
    # approximate trimming keeps at most a node's worth beyond the cap, never the whole stream
    assert r.xlen(keys.log(sid)) < 200


def test_cancel_stops_within_a_token_and_worker_takes_next_job(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="20", TOKENFAN_FAKE_TOKENS="200")
    sid = create_stream(api.url, "cancel me", max_tokens=200)
    seen: list[SSE] = []
    cancelled_at = 0.0
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=30) as resp:
        for ev in sse_events(resp):
            seen.append(ev)
            if len([e for e in seen if e.event == "token"]) == 5:
                assert httpx.delete(f"{api.url}/v1/streams/{sid}").status_code == 202
                cancelled_at = time.time()  # the cancel is in Redis from here on
            if ev.event in ("done", "error"):
                break
    evs = logged(seen)
    done = evs[-1].json()
    assert evs[-1].event == "done" and done["finish_reason"] == "cancelled" and done["cancel_reason"] == "client"
    tokens = [e for e in evs if e.event == "token"]
    # Stopped within one token of seeing the cancel, plus the one in flight: counted by the tokens the
    # worker made after the cancel was in Redis (their own `ts`), not by how many the client had read by
    # then, which the machine's load decides.
    assert len(tokens) >= 5
    assert len([e for e in tokens if e.json()["ts"] > cancelled_at]) <= 2, [e.json()["ts"] - cancelled_at
                                                                            for e in tokens]
    assert done["usage"]["completion_tokens"] == len(tokens)
    _assert_exact(evs)
    sid2 = create_stream(api.url, "next job", max_tokens=3)
    _, got = read_stream(api.url, sid2)
    assert logged(got)[-1].event == "done"
    assert httpx.delete(f"{api.url}/v1/streams/{sid}").json()["status"] == "finished"


def test_cancel_while_queued_ends_at_once(cluster: Cluster) -> None:
    api = cluster.api()
    sid = create_stream(api.url, max_tokens=5)  # no worker: stays queued
    assert httpx.delete(f"{api.url}/v1/streams/{sid}").status_code == 202
    _, got = read_stream(api.url, sid, timeout=10)
    evs = logged(got)
    assert [e.event for e in evs] == ["done"] and evs[0].json()["finish_reason"] == "cancelled"
    cluster.worker()  # the queued job is skipped, not run
    sid2 = create_stream(api.url, max_tokens=2)
    assert logged(read_stream(api.url, sid2)[1])[-1].event == "done"
    assert [e.event for e in logged(read_stream(api.url, sid)[1])] == ["done"]


def test_queued_events_report_position(cluster: Cluster) -> None:
    api = cluster.api(TOKENFAN_QUEUED_INTERVAL_S="0.2")
    first = create_stream(api.url, max_tokens=3)
    second = create_stream(api.url, max_tokens=3)
    got: list[SSE] = []
    with httpx.stream("GET", f"{api.url}/v1/streams/{second}", timeout=10) as resp:
        for ev in sse_events(resp):
            got.append(ev)
            if len(got) == 2:
                break
    assert [e.event for e in got] == ["queued", "queued"]
    assert got[0].json()["position"] == 1
    cluster.worker()
    _, got = read_stream(api.url, second)
    assert logged(got)[-1].event == "done"
    assert logged(read_stream(api.url, first)[1])[-1].event == "done"


def test_abandoned_stream_stops_after_grace(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_ABANDON_GRACE_S="1", TOKENFAN_FAKE_RATE="10", TOKENFAN_FAKE_TOKENS="300")
    sid = create_stream(api.url, max_tokens=300)
    read_stream(api.url, sid, stop_after=4)  # look briefly, then go away
    wait_for(lambda: stream_status(r, sid) is StreamStatus.FINISHED, timeout=20,
             what="the abandoned stream to stop")
    evs = logged(read_stream(api.url, sid)[1])
    assert evs[-1].json()["finish_reason"] == "cancelled" and evs[-1].json()["cancel_reason"] == "abandoned"
    assert len([e for e in evs if e.event == "token"]) < 200


def test_stream_keeps_going_without_viewer_by_default(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="50")
    sid = create_stream(api.url, "keep going", max_tokens=60)
    read_stream(api.url, sid, stop_after=3)
    wait_for(lambda: stream_status(r, sid) is StreamStatus.FINISHED, timeout=20, what="finish")
    evs = logged(read_stream(api.url, sid, last=10)[1])
    assert evs[-1].json()["finish_reason"] == "length"
    assert [int(e.id) for e in evs] == list(range(11, 64))


def test_cancel_on_disconnect_stops_at_once(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="20", TOKENFAN_FAKE_TOKENS="300")
    sid = create_stream(api.url, max_tokens=300, cancel_on_disconnect=True)
    read_stream(api.url, sid, stop_after=5)
    wait_for(lambda: stream_status(r, sid) is StreamStatus.FINISHED, timeout=10,
             what="the stream to stop after its viewer left")
    evs = logged(read_stream(api.url, sid)[1])
    assert evs[-1].json()["cancel_reason"] == "disconnect"
    assert len([e for e in evs if e.event == "token"]) < 40


def test_slow_client_catches_up_from_the_log(cluster: Cluster) -> None:
    api = cluster.api(TOKENFAN_SUBSCRIBER_BUFFER="4")
    cluster.worker(TOKENFAN_FAKE_RATE="0", TOKENFAN_FAKE_TOKENS="400")
    sid = create_stream(api.url, "slow reader", max_tokens=400)
    fast = create_stream(api.url, "fast reader", max_tokens=20)
    got: list[SSE] = []
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=30) as resp:
        for ev in sse_events(resp):
            got.append(ev)
            if len(got) % 50 == 0:
                time.sleep(0.2)  # a slow reader: the API must buffer or catch up, never drop
            if ev.event in ("done", "error"):
                break
    evs = logged(got)
    _assert_exact(evs, 403)
    assert token_text(evs) == expected_text("slow reader", 400)
    assert logged(read_stream(api.url, fast)[1])[-1].event == "done"
