"""A worker restarted under its own name (Kubernetes restarts a container in place under the pod's
name): a killed predecessor's RQ registration does not keep it out (issue 27, point 4)."""

from __future__ import annotations

import signal

import pytest

from tests.procs import (
    Cluster,
    Proc,
    assert_whole,
    create_stream,
    expected_text,
    logged,
    read_stream,
    token_text,
    wait_for,
)

FAST_LEASE = {"TOKENFAN_LEASE_TTL_S": "1.5", "TOKENFAN_KEEPER_INTERVAL_S": "0.25"}


def _kill(proc: Proc) -> None:
    proc.signal(signal.SIGKILL)
    wait_for(lambda: not proc.alive(), timeout=10, what="the killed worker to exit")


def _serves(api: str, name: str) -> None:
    """A new stream is answered in full by the worker `name`. No wall-clock bound beyond read_stream's
    30 s of silence: RQ kept the name out for 7 to 30 minutes before."""
    sid = create_stream(api, "back again", max_tokens=8)
    _, got = read_stream(api, sid, timeout=30)
    evs = logged(got)
    assert_whole(evs)
    assert evs[-1].event == "done", evs[-1].data
    assert [e.json()["worker"] for e in evs if e.event == "meta"] == [name]
    assert token_text(evs) == expected_text("back again", 8)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_worker_killed_comes_back_under_its_name(cluster: Cluster, busy: bool) -> None:
    cluster.env.update(FAST_LEASE)
    api = cluster.api()
    first = cluster.worker(name="w1", TOKENFAN_FAKE_RATE="20")
    sid = ""
    if busy:
        sid = create_stream(api.url, "killed mid-stream", max_tokens=200)
        read_stream(api.url, sid, stop_after=4, timeout=30)
    _kill(first)
    again = cluster.worker(name="w1", wait=False)
    _serves(api.url, "w1")
    assert again.alive(), again.log()
    assert "cleared its RQ registration" in again.log()
    if busy:  # the killed one's stream went the usual way: exactly one end
        _, got = read_stream(api.url, sid, timeout=30)
        assert_whole(logged(got))


def test_live_namesake_is_one_line_and_exit_2(cluster: Cluster) -> None:
    cluster.worker(name="w1")
    twin = cluster.worker(name="w1", wait=False)
    wait_for(lambda: not twin.alive(), timeout=30, what="the second w1 to stop")
    assert twin.popen.returncode == 2, twin.log()
    out = twin.log()
    assert "Traceback" not in out and "TOKENFAN_WORKER_NAME: a live worker named 'w1' already runs" in out, out
