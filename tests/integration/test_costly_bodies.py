"""Costly request bodies are checked off the API's event loop and counted by the rate limit (issue 27,
point 2): a `response_format` whose conversion takes seconds froze every stream of its API, and its
400 came before admission, so a key could send them without end."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import redis

from tests.procs import Cluster, create_stream, sse_events, wait_for
from tokenfan.shared import apikeys, keys

# An anyOf of objects, each with many properties: within the alternatives' bound, refused only once
# converted (its grammar is far past the size bound), which takes seconds.
COSTLY = {"type": "json_schema", "json_schema": {"name": "costly", "schema": {"anyOf": [
    {"type": "object", "properties": {f"p{i}_{j}": {"type": "string"} for j in range(200)}} for i in range(40)]}}}


def _body(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **extra}


def _token_times(base: str, sid: str, out: list[float]) -> None:
    with httpx.stream("GET", f"{base}/v1/streams/{sid}", timeout=60) as resp:
        for ev in sse_events(resp):
            if ev.event == "token":
                out.append(time.monotonic())
            if ev.event in ("done", "error"):
                return


def test_a_costly_body_does_not_stall_other_streams(cluster: Cluster) -> None:
    """The stream's longest gap between tokens while two costly bodies are refused stays under half the
    time those refusals took: checked on the event loop, the gap was at least that long (a guard
    against the stall, not a speed claim)."""
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="20", TOKENFAN_FAKE_TOKENS="400")
    sid = create_stream(api.url, "keep flowing", max_tokens=400)
    times: list[float] = []
    reader = threading.Thread(target=_token_times, args=(api.url, sid, times))
    reader.start()
    while len(times) < 5:  # flowing before the costly ones come
        assert reader.is_alive(), "the stream ended early"
        time.sleep(0.05)
    t0 = time.monotonic()
    with httpx.Client(timeout=120) as client:
        answers: list[httpx.Response] = []
        senders = [threading.Thread(target=lambda: answers.append(
            client.post(f"{api.url}/v1/chat/completions", json=_body(response_format=COSTLY)))) for _ in range(2)]
        for s in senders:
            s.start()
        for s in senders:
            s.join(120)
    took = time.monotonic() - t0
    during = [t for t in times if t0 <= t <= t0 + took]
    reader.join(60)
    assert [a.status_code for a in answers] == [400, 400], [a.text[:200] for a in answers]
    assert all(a.json()["error"]["param"] == "response_format.json_schema" for a in answers), answers[0].text
    assert took > 1.0, f"the costly body took only {took:.2f}s: make it costlier, or this test shows nothing"
    gaps = [b - a for a, b in zip([t0, *during], [*during, t0 + took], strict=True)]
    assert max(gaps) < took / 2, (max(gaps), took)


def test_costly_refusals_count_against_the_rate_limit(cluster: Cluster, r: redis.Redis) -> None:
    key, rec = apikeys.make_record("costly", admin=False, max_concurrent=8, rpm=2)
    r.hset(keys.api_keys(), rec.hash, rec.model_dump_json())
    api = cluster.api()
    cluster.worker()
    auth = {"Authorization": f"Bearer {key}"}
    # The rate counts in minute windows: start early in one, so the sequence below stays in it.
    wait_for(lambda: time.time() % 60 < 30, timeout=40, interval=0.2, what="the first half of a minute")
    minute = int(time.time() // 60)
    with httpx.Client(timeout=120, headers=auth) as client:
        cheap = [client.post(f"{api.url}/v1/streams", json=_body(temperature=5)) for _ in range(3)]
        assert [c.status_code for c in cheap] == [400] * 3  # a cheap refusal (a typo) costs nothing
        costly = [client.post(f"{api.url}/v1/streams", json=_body(response_format=COSTLY)) for _ in range(2)]
        assert [c.status_code for c in costly] == [400, 400], costly[0].text
        after = client.post(f"{api.url}/v1/streams", json=_body())
        assert after.status_code == 429 and after.json()["error"]["code"] == "rate_limit_exceeded", after.text
        again = client.post(f"{api.url}/v1/streams", json=_body(response_format=COSTLY))
        assert again.status_code == 429  # refused before its body is parsed at all
    assert int(time.time() // 60) == minute, "the minute ended inside the test"
