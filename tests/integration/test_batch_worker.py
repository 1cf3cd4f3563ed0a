"""One worker, several slots busy, across real processes (fake engine): RQ's view of the jobs, cancel,
SIGKILL and SIGTERM with several streams generating at once."""

from __future__ import annotations

import signal

import httpx
import redis
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.procs import (
    SSE,
    Cluster,
    assert_whole,
    create_stream,
    expected_text,
    logged,
    read_stream,
    stream_status,
    token_text,
    wait_for,
)
from tokenfan.shared import keys
from tokenfan.shared.jobs import queue
from tokenfan.shared.state import StreamStatus

FAST_LEASE = {"TOKENFAN_LEASE_TTL_S": "1.5", "TOKENFAN_KEEPER_INTERVAL_S": "0.25"}




def _tokens_logged(r: redis.Redis, sid: str) -> int:
    return int(r.xlen(keys.log(sid))) - 2  # meta and disclosure come first


def _streams(api: str, n: int, tokens: int, tag: str) -> dict[str, str]:
    return {create_stream(api, f"{tag} {i}", max_tokens=tokens): f"{tag} {i}" for i in range(n)}


def _read_all(api: str, sids: dict[str, str]) -> dict[str, list[SSE]]:
    return {sid: logged(read_stream(api, sid, timeout=60)[1]) for sid in sids}


def test_one_worker_generates_several_streams_at_once_and_rq_sees_each_job(cluster: Cluster,
                                                                          r: redis.Redis) -> None:
    api = cluster.api()
    w = cluster.worker(TOKENFAN_SLOTS="3", TOKENFAN_FAKE_RATE="8")  # 3 s a stream: time to look at the queue
    sids = _streams(api.url, 5, 24, "batch")
    q = queue(r, "smollm2")
    started = StartedJobRegistry(queue=q)
    # three slots: three jobs started, two still waiting in the queue (its depth = waiting streams)
    wait_for(lambda: started.count == 3 and q.count == 2, timeout=20, what="3 started, 2 queued")
    statuses = [stream_status(r, s) for s in sids]
    assert statuses.count(StreamStatus.RUNNING) == 3 and statuses.count(StreamStatus.QUEUED) == 2
    got = _read_all(api.url, sids)
    for sid, content in sids.items():
        evs = got[sid]
        assert_whole(evs)
        assert evs[-1].event == "done" and token_text(evs) == expected_text(content, 24)
        assert evs[0].json()["worker"] == w.name
    first = list(sids)[:3]  # they overlapped: each began before the others ended
    spans = [(got[s][2].json()["ts"], got[s][-1].json()["ts"]) for s in first]
    assert max(a for a, _ in spans) < min(b for _, b in spans)
    finished = FinishedJobRegistry(queue=q)
    wait_for(lambda: finished.count == 5 and started.count == 0, what="RQ to mark all five jobs finished")
    for sid in sids:
        job = Job.fetch(f"{sid}_0", connection=r, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FINISHED and job.return_value() == {"outcome": "done"}


def test_cancelling_one_of_several_streams_leaves_the_others_whole(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_SLOTS="3", TOKENFAN_FAKE_RATE="20")
    sids = _streams(api.url, 3, 40, "keep")
    victim = list(sids)[1]
    wait_for(lambda: _tokens_logged(r, victim) >= 5, what="five tokens of the stream to cancel")
    assert httpx.delete(f"{api.url}/v1/streams/{victim}").status_code == 202
    at_cancel = _tokens_logged(r, victim)
    got = _read_all(api.url, sids)
    for sid, content in sids.items():
        evs = got[sid]
        assert_whole(evs)
        if sid == victim:
            done = evs[-1].json()
            assert done["finish_reason"] == "cancelled" and done["cancel_reason"] == "client"
            assert len([e for e in evs if e.event == "token"]) <= at_cancel + 3  # seen within a step or two
        else:
            assert evs[-1].json()["finish_reason"] == "length" and token_text(evs) == expected_text(content, 40)


def test_sigkill_with_several_slots_busy_every_stream_continues_on_another(cluster: Cluster,
                                                                          r: redis.Redis) -> None:
    cluster.env.update(FAST_LEASE)
    api = cluster.api()
    first = cluster.worker(TOKENFAN_SLOTS="3", TOKENFAN_FAKE_RATE="20")
    sids = _streams(api.url, 3, 30, "survive")
    wait_for(lambda: all(_tokens_logged(r, s) >= 3 for s in sids), what="three tokens of each stream")
    first.signal(signal.SIGKILL)
    # started after the kill, as a supervisor would: the handed-over streams wait for it
    second = cluster.worker(TOKENFAN_SLOTS="3", TOKENFAN_FAKE_RATE="50")
    got = _read_all(api.url, sids)
    for sid, content in sids.items():
        evs = got[sid]
        assert_whole(evs)
        assert evs[-1].event == "done", evs[-1].data
        metas = [e.json() for e in evs if e.event == "meta"]
        assert len(metas) == 2 and metas[1]["resumed"] is True and metas[1]["worker"] == second.name, metas
        assert token_text(evs) == expected_text(content, 30)  # one continuous answer


def test_sigterm_with_several_slots_busy_finishes_them_all_and_takes_no_new_job(cluster: Cluster,
                                                                               r: redis.Redis) -> None:
    api = cluster.api()
    w = cluster.worker(TOKENFAN_SLOTS="3", TOKENFAN_FAKE_RATE="40")
    sids = _streams(api.url, 3, 40, "deploy")
    wait_for(lambda: all(_tokens_logged(r, s) >= 2 for s in sids), what="every slot generating")
    w.signal(signal.SIGTERM)
    late = create_stream(api.url, "after deploy", max_tokens=3)
    got = _read_all(api.url, sids)
    for sid, content in sids.items():
        assert_whole(got[sid])
        assert got[sid][-1].event == "done" and token_text(got[sid]) == expected_text(content, 40)
    wait_for(lambda: not w.alive(), timeout=15, what="the worker to exit")
    assert stream_status(r, late) is StreamStatus.QUEUED  # it took no new job
    cluster.worker()
    assert logged(read_stream(api.url, late)[1])[-1].event == "done"


def test_sigterm_hands_every_busy_slot_back_after_the_grace_period(cluster: Cluster) -> None:
    cluster.env.update(FAST_LEASE)
    api = cluster.api()
    w = cluster.worker(TOKENFAN_SLOTS="3", TOKENFAN_FAKE_RATE="10", TOKENFAN_SHUTDOWN_GRACE_S="1")
    sids = _streams(api.url, 3, 60, "hand back")
    r = redis.Redis.from_url(cluster.redis_url)
    try:
        wait_for(lambda: all(_tokens_logged(r, s) >= 2 for s in sids), what="every slot generating")
    finally:
        r.close()
    w.signal(signal.SIGTERM)
    wait_for(lambda: not w.alive(), timeout=15, what="the worker to hand back and exit")
    second = cluster.worker(TOKENFAN_SLOTS="3", TOKENFAN_FAKE_RATE="100")
    got = _read_all(api.url, sids)
    for sid, content in sids.items():
        evs = got[sid]
        assert_whole(evs)
        assert evs[-1].event == "done"
        metas = [e.json() for e in evs if e.event == "meta"]
        assert metas[-1]["resumed"] is True and metas[-1]["worker"] == second.name
        assert token_text(evs) == expected_text(content, 60)
