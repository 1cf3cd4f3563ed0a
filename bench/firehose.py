"""Scenario 10's publisher: token-sized events on N channels, plain PUBLISH, packed by hand.

`bench/publisher.py` plays a worker (lease, log and fenced script per
event): its XADD and Lua cost Redis more CPU per event than the pub/sub
fan-out this scenario measures, and it needs streams made through an API.
Here only the subscriber side is under test, so this process sends bare
`PUBLISH` commands, packed once per channel and pipelined over one socket:
one process on the load CPU then outruns either subscriber flat out.

Each payload is what the worker publishes for a plain token (the dict of
`Token.encode`'s hot path: seq, type, ts, text); `ts` is taken when the
event is packed, just before its batch is sent, so the latency a
subscriber measures includes this side's batching, never hides it.

Stdin: the job (one JSON line: `redis_url`), then one line per phase
(`channels`, `rate` in events/s over all channels, 0 for flat out, and
`count`), or `quit`. Stdout: `ready`, then a `result` per phase.
"""

from __future__ import annotations

import socket
import sys
import time
from urllib.parse import urlparse

import hiredis
import orjson

from tokenfan.bench.client import emit

# Events per pipelined write at most: big enough that a syscall is rare per event, small enough
# that a fixed-rate phase sends its events in step with the clock.
MAX_BATCH = 256
# The longest a fixed-rate phase sleeps between batches: its pacing granularity.
PACE_S = 0.001
TEXT = " tok"


class Firehose:
    def __init__(self, redis_url: str) -> None:
        url = urlparse(redis_url)
        self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        self.seqs: dict[str, int] = {}
        self.heads: dict[str, bytes] = {}

    def _head(self, channel: str) -> bytes:
        head = self.heads.get(channel)
        if head is None:
            name = channel.encode()
            head = self.heads[channel] = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(name), name)
        return head

    def _send(self, channels: list[str]) -> int:
        """One pipelined batch, one event per channel named; returns the subscribers reached."""
        ts = time.time()
        parts = []
        for ch in channels:
            seq = self.seqs[ch] = self.seqs.get(ch, 0) + 1
            payload = orjson.dumps({"seq": seq, "type": "token", "ts": ts, "text": TEXT})
            parts.append(b"%s$%d\r\n%s\r\n" % (self._head(ch), len(payload), payload))
        self.sock.sendall(b"".join(parts))
        return self._replies(len(channels))

    def _replies(self, n: int) -> int:
        reached = 0
        while n:
            reply = self.reader.gets()
            if reply is False:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("Redis closed the publisher's connection")
                self.reader.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"Redis refused a PUBLISH: {reply}")
            reached += int(reply)
            n -= 1
        return reached

    def phase(self, channels: list[str], rate: float, count: int) -> dict[str, float | int]:
        """`count` events round-robin over `channels`, at `rate` events/s (0: as fast as Redis takes them)."""
        n = len(channels)
        t0 = time.time()
        sent = reached = 0
        while sent < count:
            due = count if rate <= 0 else min(count, int((time.time() - t0) * rate) + 1)
            if due <= sent:
                time.sleep(max(0.0, min(PACE_S, sent / rate - (time.time() - t0))))
                continue
            upto = min(due, sent + MAX_BATCH)
            reached += self._send([channels[j % n] for j in range(sent, upto)])
            sent = upto
        t1 = time.time()
        return {"sent": sent, "reached": reached, "t_go": t0, "t_end": t1,
                "achieved_per_s": round(sent / (t1 - t0), 1) if t1 > t0 else 0.0}


def main() -> int:
    job = orjson.loads(sys.stdin.readline())
    hose = Firehose(str(job["redis_url"]))
    emit({"event": "ready"})
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        cmd = orjson.loads(line)
        emit({"event": "result", **hose.phase(list(cmd["channels"]), float(cmd["rate"]), int(cmd["count"]))})
    hose.sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
