"""Redis dying mid-stream (issue 16), against real processes: two API processes, two workers (fake
engine), a redis-server with an append-only file as compose.yaml runs it, SIGKILLed and started
again on its port. Every stream a client follows ends with exactly one terminal event, or goes on:
with persistence, `done` and exactly the text it would have had; without, one retryable `error`.
A stream left `running` with no lease and no lease index entry is found all the same."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import redis
from rq.job import Job

from tests.faults import PersistentRedis, follow
from tests.procs import (
    SSE,
    Cluster,
    assert_whole,
    create_stream,
    expected_text,
    stream_status,
    stream_viewers,
    token_text,
    wait_for,
)
from tokenfan.shared import defaults as d
from tokenfan.shared import events, keys
from tokenfan.shared.bus import BusConfig, SyncBus
from tokenfan.shared.reaper import reap_one, sweep
from tokenfan.shared.schema import JobMessage, JobPayload
from tokenfan.shared.settings import CommonSettings
from tokenfan.shared.state import AcquireResult, PublishResult, StreamState, StreamStatus

# Short leases and a quick keeper so a lapse is seconds, not the default's minutes of test.
FAST = {"TOKENFAN_LEASE_TTL_S": "2", "TOKENFAN_KEEPER_INTERVAL_S": "0.25", "TOKENFAN_SWEEP_INTERVAL_S": "2"}


@pytest.fixture
def aof_redis() -> Iterator[PersistentRedis]:
    server = PersistentRedis().start()
    yield server
    server.stop()




def _logged(r: redis.Redis, sid: str) -> int:
    return int(r.xlen(keys.log(sid)))


class Clients:
    """One following client per stream, each in its own thread, reading across both API processes."""

    def __init__(self, apis: list[str], sids: list[str], switch_every: int = 0) -> None:
        self.got: dict[str, list[SSE]] = {}
        self.errors: dict[str, BaseException] = {}
        self.threads = [threading.Thread(target=self._run, args=(apis[i % 2:] + apis[:i % 2], sid, switch_every))
                        for i, sid in enumerate(sids)]
        for t in self.threads:
            t.start()

    def _run(self, apis: list[str], sid: str, switch_every: int) -> None:
        try:
            self.got[sid] = follow(apis, sid, timeout=120, switch_every=switch_every)
        except BaseException as exc:  # reported by join()
            self.errors[sid] = exc

    def join(self) -> dict[str, list[SSE]]:
        for t in self.threads:
            t.join(150)
        assert not self.errors, self.errors
        return self.got


def _start(cluster: Cluster, server: PersistentRedis, **worker_env: str) -> list[str]:
    cluster.redis_url = server.url
    cluster.env.update(FAST)
    apis = [cluster.api().url, cluster.api().url]
    for _ in range(2):
        cluster.worker(TOKENFAN_SLOTS="2", TOKENFAN_FAKE_RATE="15", **worker_env)
    return apis


def _streams(api: str, n: int, tokens: int, tag: str) -> dict[str, str]:
    return {create_stream(api, f"{tag} {i}", max_tokens=tokens): f"{tag} {i}" for i in range(n)}


@pytest.mark.parametrize(("outage_s", "n", "tokens", "api", "switch_every"), [
    (3.0, 4, 60, 0, 15),  # the reproduction: SIGKILL mid-stream, back 3 s later from the AOF
    (10.0, 3, 50, 1, 0),  # down past every lease: the workers take their streams back (or others do)
], ids=["3s", "10s"])
def test_redis_killed_and_restarted_from_its_aof_every_stream_completes_exactly(
        aof_redis: PersistentRedis, cluster: Cluster, outage_s: float, n: int, tokens: int, api: int,
        switch_every: int) -> None:
    apis = _start(cluster, aof_redis)
    sids = _streams(apis[api], n, tokens, f"down {outage_s:g}s")
    clients = Clients(apis, list(sids), switch_every=switch_every)
    r = redis.Redis.from_url(aof_redis.url)
    # Every client following before Redis goes (its viewer entry says so): one that came during the
    # outage would meet it first and read only an error, which is another test's case.
    wait_for(lambda: all(_logged(r, s) >= 6 and stream_viewers(r, s) for s in sids), timeout=30,
             what="every stream generating and followed")
    r.close()
    aof_redis.kill()
    threading.Event().wait(outage_s)  # the outage itself: Redis stays down this long (the fault, not a condition)
    aof_redis.restart()
    got = clients.join()
    for sid, content in sids.items():
        assert_whole(got[sid])
        assert got[sid][-1].event == "done", got[sid][-1].data
        assert token_text(got[sid]) == expected_text(content, tokens)


def test_redis_back_without_its_last_writes_every_stream_is_still_exact(aof_redis: PersistentRedis,
                                                                        cluster: Cluster) -> None:
    """An AOF lacking the last writes (the restart loses what clients already saw): the workers see
    the gap in the log and send those events again; the text is exact, nothing doubled."""
    apis = _start(cluster, aof_redis)
    sids = _streams(apis[0], 4, 60, "rolled back")
    clients = Clients(apis, list(sids), switch_every=10)
    r = redis.Redis.from_url(aof_redis.url)
    wait_for(lambda: all(_logged(r, s) >= 8 for s in sids), timeout=30, what="every stream generating")
    at_snapshot = {s: _logged(r, s) for s in sids}
    snap = aof_redis.snapshot()
    # what the AOF will lack: several more events of every stream, seen by the clients meanwhile
    wait_for(lambda: all(_logged(r, s) >= at_snapshot[s] + 6 for s in sids), timeout=30, what="more events")
    r.close()
    aof_redis.kill()
    aof_redis.restore(snap)
    aof_redis.restart()
    got = clients.join()
    for sid, content in sids.items():
        assert_whole(got[sid])
        assert got[sid][-1].event == "done", got[sid][-1].data
        assert token_text(got[sid]) == expected_text(content, 60)
    # the restart did lose events the clients had seen, and the workers sent them again
    workers = "".join(p.log() for p in cluster.procs if p.kind == "worker")
    assert "Redis lost events" in workers and "sending them again" in workers


def test_redis_back_empty_every_stream_ends_with_one_retryable_error(cluster: Cluster) -> None:
    server = PersistentRedis(appendonly=False).start()
    try:
        apis = _start(cluster, server)
        sids = _streams(apis[0], 3, 200, "empty")
        clients = Clients(apis, list(sids))
        r = redis.Redis.from_url(server.url)
        # Every client following before Redis loses everything (the API's viewer entry says so): one that
        # came after the wipe would find no stream at all, which is another test's case.
        wait_for(lambda: all(_logged(r, s) >= 5 and stream_viewers(r, s) for s in sids), timeout=30,
                 what="every stream generating and followed")
        r.close()
        server.kill()
        server.wipe()
        server.restart()
        got = clients.join()
        for sid in sids:
            evs = got[sid]
            assert evs[-1].event == "error" and evs[-1].json()["retryable"] is True, [e.event for e in evs][-3:]
            assert sum(e.event in ("done", "error") for e in evs) == 1
            seqs = [int(e.id) for e in evs[:-1]]
            assert seqs == list(range(1, len(seqs) + 1))
    finally:
        cluster.stop_all()  # before their Redis
        server.stop()


@pytest.mark.parametrize("followed", [True, False], ids=["followed", "unfollowed"])
def test_running_stream_without_lease_or_index_entry_is_found(aof_redis: PersistentRedis, cluster: Cluster,
                                                              followed: bool) -> None:
    """The lease index lost (here: deleted) and the stream's worker dead: the follower notices the
    stream has nobody on it, or the sweep finds it from the stream records; it goes on elsewhere."""
    cluster.redis_url = aof_redis.url
    # followed: no sweep in the test's time (its lock, once taken, lasts the interval), so the follower it is
    cluster.env.update({**FAST, "TOKENFAN_SWEEP_INTERVAL_S": "600" if followed else "2"})
    apis = [cluster.api().url]
    doomed = cluster.worker(TOKENFAN_FAKE_RATE="5")  # 8 s of stream: still running when the spare is up
    sid = create_stream(apis[0], "index lost", max_tokens=40)
    r = redis.Redis.from_url(aof_redis.url)
    try:
        wait_for(lambda: _logged(r, sid) >= 6, timeout=30, what="the stream generating")
        clients = Clients(apis, [sid]) if followed else None
        cluster.worker(TOKENFAN_FAKE_RATE="50")
        doomed.signal(signal.SIGKILL)
        r.delete(keys.LEASES)
        assert stream_status(r, sid) is StreamStatus.RUNNING and r.zscore(keys.LEASES, sid) is None
        if clients is None:  # nobody follows: only the sweep can find it
            wait_for(lambda: stream_status(r, sid) is StreamStatus.FINISHED, timeout=60, what="the stream to end")
            evs = follow(apis, sid, timeout=10)
        else:
            evs = clients.join()[sid]
    finally:
        r.close()
    assert_whole(evs)
    assert evs[-1].event == "done" and token_text(evs) == expected_text("index lost", 40)


def test_queued_stream_whose_job_was_lost_is_enqueued_again(aof_redis: PersistentRedis, cluster: Cluster) -> None:
    """A restart that kept a new stream's record but not its job (written a few ms later): the
    follower sees a queued stream with no job behind it and enqueues it again."""
    cluster.redis_url = aof_redis.url
    cluster.env.update({**FAST, "TOKENFAN_SWEEP_INTERVAL_S": "600"})  # the follower, not the sweep
    api = cluster.api().url
    sid = create_stream(api, "job lost", max_tokens=12)
    r = redis.Redis.from_url(aof_redis.url)
    try:
        job = f"{sid}_0"
        assert r.lrem(keys.queue_list("smollm2"), 0, job) == 1 and r.delete(Job.key_for(job)) == 1
        clients = Clients([api], [sid])
        cluster.worker()
        evs = clients.join()[sid]
        assert stream_status(r, sid) is StreamStatus.FINISHED
    finally:
        r.close()
    assert_whole(evs)
    assert evs[-1].event == "done" and token_text(evs) == expected_text("job lost", 12)
    assert "had lost its job" in "".join(p.log() for p in cluster.procs if p.kind == "api")


# --- the scripts and the reaper rules the above relies on, on a real Redis -------------------------

SID = "restartstream0000001"


@pytest.fixture
def bus(r: redis.Redis, redis_url: str) -> Iterator[SyncBus]:
    client = redis.Redis.from_url(redis_url)
    yield SyncBus(client, BusConfig(d.LOG_MAXLEN, d.LOG_ACTIVE_TTL_S, d.LOG_TTL_S))
    client.close()


def _running(bus: SyncBus, worker: str = "w1") -> None:
    payload = JobPayload(stream_id=SID, model="m", messages=[JobMessage(role="user", content="hi")], max_tokens=5,
                         enqueued_at=time.time())
    StreamState(model="m", owner="k", request=orjson.dumps(payload.dump())).create(bus.redis, SID, 3600)
    assert bus.leases.claim(SID, worker, 5.0)[0] is AcquireResult.QUEUED


def _tok(seq: int) -> events.Token:
    return events.Token(seq, f"t{seq}")


def test_a_re_sent_event_is_written_once_and_a_hole_is_refused(bus: SyncBus) -> None:
    _running(bus)
    assert [bus.publish(SID, "w1", _tok(n)) for n in (1, 2, 2, 1)] == [PublishResult.PUBLISHED] * 4
    assert bus.publish(SID, "w1", _tok(4)) is PublishResult.GAP
    assert [e.seq for e in bus.read_log(SID)] == [1, 2] and bus.last_seq(SID) == 2
    assert bus.publish(SID, "w1", _tok(3)) is PublishResult.PUBLISHED


def test_reclaim_takes_back_only_a_stream_nobody_else_took_on(bus: SyncBus) -> None:
    _running(bus)
    for n in (1, 2, 3):
        bus.publish(SID, "w1", _tok(n))
    bus.redis.delete(keys.lease(SID))  # lapsed while Redis was away
    assert bus.leases.reclaim(SID, "w1", 5.0, "w1", 0, 0, 2) == (AcquireResult.TAKEN, 3)  # the log has more than ours
    assert bus.leases.reclaim(SID, "w2", 5.0, "w2", 0, 0, 9) == (AcquireResult.TAKEN, 3)  # not w2's stream
    assert bus.leases.reclaim(SID, "w1", 5.0, "w1", 0, 0, 9) == (AcquireResult.RUNNING, 3)  # ours: re-send from 4
    assert bus.publish(SID, "w1", _tok(4)) is PublishResult.PUBLISHED
    assert bus.leases.reclaim(SID, "w2", 5.0, "w2", 0, 0, 9)[0] is AcquireResult.TAKEN  # w1 holds it again


def test_a_stream_handed_over_a_moment_ago_is_not_ended_by_a_second_reaper(bus: SyncBus) -> None:
    settings = CommonSettings(lease_ttl_s=5.0, failover_wait_s=15.0)
    _running(bus)
    bus.redis.hset(keys.worker("w2"), mapping={"model": "m"})  # a live worker to continue it
    bus.redis.zadd(keys.workers("m"), {"w2": int(time.time() * 1000)})
    bus.redis.delete(keys.lease(SID))
    seen = bus.state(SID)  # what a second reaper read before the first acted
    assert reap_one(bus, settings, "reaper-a", SID) is True
    assert stream_status(bus.redis, SID) is StreamStatus.QUEUED  # handed over, its deadline ahead
    assert reap_one(bus, settings, "reaper-b", SID) is False
    covered = bus.leases.cover(SID, 5.0, int(time.time() * 1000))
    assert bus.leases.take_over(covered, "reaper-b", 5.0, seen=seen)[0] is AcquireResult.TAKEN  # it changed since
    assert stream_status(bus.redis, SID) is StreamStatus.QUEUED and bus.last_seq(SID) == 0


def test_the_sweep_puts_a_running_stream_without_lease_or_entry_back(bus: SyncBus) -> None:
    settings = CommonSettings(sweep_interval_s=60.0)
    _running(bus)
    bus.redis.delete(keys.lease(SID), keys.LEASES)
    assert sweep(bus, settings, "me") == 1 and bus.redis.zscore(keys.LEASES, SID) is not None
    bus.redis.delete(keys.LEASES)
    assert sweep(bus, settings, "other") == 0  # one sweep per interval, fleet-wide
