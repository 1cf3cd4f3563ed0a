"""Redis paused (SIGSTOP, as a frozen VM or a stalled failover would), not restarted (issue 27, point
3): the clients' retries make the pause one slow answer, so nothing looks like an outage, while every
lease lapses in Redis' own clock. Reapers must give the live workers their lease TTL to renew, as
after a restart: no stream ends early, none is taken over."""

from __future__ import annotations

import signal
import threading
import time

import redis

from tests.faults import follow
from tests.procs import SSE, Cluster, assert_whole, create_stream, expected_text, stream_status, token_text, wait_for
from tokenfan.ops.embedded import EmbeddedRedis
from tokenfan.shared import keys
from tokenfan.shared.state import StreamStatus

# A lease of 1.5 s renewed every 0.25 s; each pause is more than twice the lease.
FAST = {"TOKENFAN_LEASE_TTL_S": "1.5", "TOKENFAN_KEEPER_INTERVAL_S": "0.25", "TOKENFAN_SWEEP_INTERVAL_S": "2"}
PAUSE_S = 4.0
PAUSES = 3
STREAMS = 6
RATE = 15
# Enough tokens at RATE a second to outlast the pauses and what runs between them.
TOKENS = 500
# After a pause, the streams go on for this many events each before the next one: longer than the
# reapers' lease-TTL hold, so each pause meets reapers that reap again.
EVENTS_BETWEEN = 40


def _pause(server: EmbeddedRedis) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)  # the fault itself: Redis is stopped this long; no condition is waited for
    finally:
        server.proc.send_signal(signal.SIGCONT)


def _follow_all(apis: list[str], sids: list[str]) -> tuple[list[threading.Thread], dict[str, list[SSE]]]:
    got: dict[str, list[SSE]] = {}

    def run(i: int, sid: str) -> None:
        got[sid] = follow(apis[i % 2:] + apis[:i % 2], sid, timeout=180)

    threads = [threading.Thread(target=run, args=(i, sid)) for i, sid in enumerate(sids)]
    for t in threads:
        t.start()
    return threads, got


def test_redis_paused_longer_than_the_lease_ends_no_stream(own_redis: EmbeddedRedis, cluster: Cluster) -> None:
    cluster.redis_url = own_redis.url
    cluster.env.update(FAST)
    apis = [cluster.api().url, cluster.api().url]
    for _ in range(2):
        cluster.worker(TOKENFAN_SLOTS="3", TOKENFAN_FAKE_RATE=str(RATE), TOKENFAN_FAKE_TOKENS=str(TOKENS))
    prompts = {create_stream(apis[0], f"paused {i}", max_tokens=TOKENS): f"paused {i}" for i in range(STREAMS)}
    sids = list(prompts)
    threads, got = _follow_all(apis, sids)
    r = redis.Redis.from_url(own_redis.url)
    try:
        wait_for(lambda: all(stream_status(r, s) is StreamStatus.RUNNING for s in sids), timeout=30,
                 what="every stream running")
        for _ in range(PAUSES):
            before = {s: int(r.xlen(keys.log(s))) for s in sids}
            _pause(own_redis)
            wait_for(lambda b=before: all(int(r.xlen(keys.log(s))) >= b[s] + EVENTS_BETWEEN for s in sids),
                     timeout=60, what="every stream going on after the pause")
            assert all(stream_status(r, s) is StreamStatus.RUNNING for s in sids), [stream_status(r, s) for s in sids]
    finally:
        for t in threads:
            t.join(200)
        r.close()
    for sid in sids:
        evs = got[sid]
        assert_whole(evs)
        assert evs[-1].event == "done", (sid, evs[-1].data)
        metas = [e.json() for e in evs if e.event == "meta"]
        assert len(metas) == 1, (sid, metas)  # never taken over: its one worker all along
        assert token_text(evs) == expected_text(prompts[sid], TOKENS)
