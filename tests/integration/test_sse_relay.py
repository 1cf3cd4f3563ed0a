"""How the relay's SSE responses end, across real processes: a client that stops reading is cut by
sse-starlette's send timeout while another viewer of the same stream goes on; a client that
leaves frees its viewer entry at once (removed, not left to expire); on SIGTERM sse-starlette's
own shutdown handling does not cut our drain short, and the ops feed ends cleanly."""

from __future__ import annotations

import re
import signal
import socket
import threading

import httpx
import orjson
import redis

from tests.procs import SSE, Cluster, create_stream, expected_text, sse_events, stream_status, stream_viewers, wait_for
from tokenfan.shared import keys
from tokenfan.shared.state import StreamStatus


class Reader(threading.Thread):
    """A healthy viewer: reads the stream to its end on its own thread."""

    def __init__(self, base: str, sid: str) -> None:
        super().__init__(daemon=True)
        self.base, self.sid = base, sid
        self.got: list[SSE] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", f"{self.base}/v1/streams/{self.sid}", timeout=30) as resp:
                for ev in sse_events(resp):
                    self.got.append(ev)
                    if ev.event in ("done", "error"):
                        return
        except BaseException as exc:  # reported by the test, not lost on the thread
            self.error = exc

    def tokens(self) -> int:
        return sum(e.event == "token" for e in self.got)


def test_a_client_that_stops_reading_is_cut_and_frees_its_viewer_while_another_goes_on(
        cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api(TOKENFAN_HEARTBEAT_S="0.5", TOKENFAN_SEND_TIMEOUT_S="1",
                      TOKENFAN_MAX_PROMPT_CHARS="9000000", TOKENFAN_MAX_BODY_BYTES="10000000")
    cluster.worker(TOKENFAN_FAKE_RATE="200", TOKENFAN_FAKE_TOKENS="2000", TOKENFAN_N_CTX="5000000")
    # The answer starts with the prompt's words: 400 tokens of 20 kB, 8 MB in two seconds, more than
    # the socket buffers between the API and a client that reads nothing can hold (Linux lets a
    # loopback send buffer grow to 4 MB by default); then eight seconds of filler.
    prompt = " ".join(f"w{i}" + "x" * 20_000 for i in range(400))
    sid = create_stream(api.url, prompt, max_tokens=2000)

    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", api.port))
    healthy = Reader(api.url, sid)
    try:
        stuck.sendall(f"GET /v1/streams/{sid} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        healthy.start()
        wait_for(lambda: len(stream_viewers(r, sid)) == 2, what="both viewers attached")
        wait_for(lambda: "took in nothing" in api.log(), timeout=60, what=f"the send timeout\n{api.log()}")
        wait_for(lambda: len(stream_viewers(r, sid)) == 1, what="the stuck viewer's entry removed")
        assert stream_status(r, sid) is StreamStatus.RUNNING
        seen = healthy.tokens()
        wait_for(lambda: healthy.tokens() > seen + 5, what="the healthy viewer still served")
    finally:
        stuck.close()
        httpx.delete(f"{api.url}/v1/streams/{sid}", timeout=10)
        healthy.join(30)
    assert healthy.error is None, healthy.error
    assert healthy.got[-1].event == "done" and healthy.got[-1].json()["finish_reason"] == "cancelled"
    tokens = [e for e in healthy.got if e.event == "token"]
    assert [int(e.id) for e in tokens] == list(range(3, 3 + len(tokens)))  # nothing skipped for the healthy one


def test_a_client_that_leaves_removes_its_viewer_entry(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="20")
    sid = create_stream(api.url, "leave early", max_tokens=200)  # ten seconds of tokens
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=30) as resp:
        events = sse_events(resp)
        while next(events).event != "token":
            pass
        (viewer,) = stream_viewers(r, sid)
    # Removed by the relay's clean-up: an entry left to expire would still be in the set.
    wait_for(lambda: r.zscore(keys.viewers(sid), viewer) is None, what="the viewer entry removed")
    assert stream_status(r, sid) is StreamStatus.RUNNING
    httpx.delete(f"{api.url}/v1/streams/{sid}", timeout=10)


def _content(frames: list[SSE]) -> str:
    chunks = [orjson.loads(f.data) for f in frames if f.data != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))


def test_sigterm_lets_an_openai_stream_run_then_names_where_to_resume(cluster: Cluster) -> None:
    # sse-starlette would cancel every response half a second after SIGTERM; the drain must win:
    # the stream runs on for the grace, then ends with an error naming the resume URL, and [DONE].
    a = cluster.api(TOKENFAN_SHUTDOWN_GRACE_S="3")
    b = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="20")
    content = "drain an openai stream"
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 60, "stream": True}
    frames: list[SSE] = []
    with httpx.stream("POST", f"{a.url}/v1/chat/completions", json=body, timeout=30) as resp:
        sid = resp.headers["x-tokenfan-stream-id"]
        for ev in sse_events(resp):  # an abrupt close (a cancelled response) would raise here
            frames.append(ev)
            if len(frames) == 3:
                a.signal(signal.SIGTERM)
    assert frames[-1].data == "[DONE]"
    err = orjson.loads(frames[-2].data)["error"]
    assert err["code"] == "server_shutdown" and f"/v1/streams/{sid}?format=openai" in err["message"]
    found = re.search(r"Last-Event-ID: (\d+)", err["message"])
    assert found is not None
    with httpx.stream("GET", f"{b.url}/v1/streams/{sid}", params={"format": "openai"},
                      headers={"Last-Event-ID": found.group(1)}, timeout=30) as resp:
        rest = list(sse_events(resp))
    assert rest[-1].data == "[DONE]"
    assert _content(frames[:-2]) + _content(rest) == expected_text(content, 60)


def test_sigterm_ends_the_ops_feed_cleanly(cluster: Cluster) -> None:
    api = cluster.api(TOKENFAN_SHUTDOWN_GRACE_S="30")
    got: list[SSE] = []
    with httpx.stream("GET", f"{api.url}/v1/ops/events", timeout=30) as resp:
        # The feed ends on sse-starlette's shutdown event, completing the response: the loop
        # ends without an error (a response cut off would raise RemoteProtocolError).
        for ev in sse_events(resp):
            got.append(ev)
            if len(got) == 1:
                api.signal(signal.SIGTERM)
    assert got and {e.event for e in got} == {"snapshot"}
    # nothing else held the process: it is gone long before its 30 s grace
    wait_for(lambda: not api.alive(), timeout=20, what="the API to exit")
