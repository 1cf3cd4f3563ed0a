"""The benchmark's publisher: plays the worker's role for many streams at once.

A real worker serves one stream at a time, so a thousand concurrent
streams would take a thousand worker processes on a two-core machine.
This process does what those workers would do to Redis, through the same
code: it takes each stream's lease with `Leases.claim` (the stream was
created through the API, its RQ job removed by the bench), then writes
every event with the worker's own publish script (`PUBLISH`, the keys
and arguments of `SyncBus.publish`): `meta` and `disclosure`, tokens at a
fixed rate per stream, then `done`.

Events due at the same moment for different streams go out in one
pipelined round trip (as many workers publishing at once would reach Redis
together). Each event's `ts` is taken when it is encoded, just before its
batch is sent, as the worker's is; the time a batch takes to build (well
under a millisecond) is charged to the relay, never hidden from it.

Stdin: the job (one JSON line), then `go`. Stdout: `ready`, then `result`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from tokenfan.bench.client import emit
from tokenfan.shared import defaults as d
from tokenfan.shared.bus import PUBLISH, BusConfig, SyncBus, _publish_args
from tokenfan.shared.events import Disclosure, Done, Event, FinishReason, Meta, Timings, Token, Usage
from tokenfan.shared.redisconn import sync_client

# Events per pipelined round trip at most (flat-out mode and catching up).
MAX_BATCH = 256
# Leases are held far longer than any run, so none lapses mid-measurement.
LEASE_TTL_S = 3600.0
# The bench's owner name in leases and `meta`.
OWNER = "bench-publisher"

# One event of a stream, given its seq.
Make = Callable[[int], Event]
TOKEN: Make = partial(Token, text=" tok")


class Publisher:
    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.sids: list[str] = list(job["sids"])
        self.rate = float(job["rate"])
        self.tokens = int(job["tokens"])
        self.owner = f"{OWNER}-{job.get('index', 0)}"
        self.bus = SyncBus(sync_client(job["redis_url"]),
                           BusConfig(d.LOG_MAXLEN, d.LOG_ACTIVE_TTL_S, d.LOG_TTL_S))
        self.sha = self.bus.redis.script_load(PUBLISH.lua)
        self.seqs = dict.fromkeys(self.sids, 0)
        self.fenced = 0
        self.published = 0

    def prepare(self) -> int:
        """Take every lease and publish `meta` and `disclosure`; returns how many streams are ours."""
        mine = []
        for sid in self.sids:
            status, seq = self.bus.leases.claim(sid, self.owner, LEASE_TTL_S)
            if status.claimed:
                mine.append(sid)
                self.seqs[sid] = seq
        self.sids = mine
        created = time.time()
        self._send([(sid, partial(Meta, stream_id=sid, model=d.MODEL_NAME, worker=self.owner, created=created,
                                  resumed=False)) for sid in mine])
        self._send([(sid, partial(Disclosure, text=d.DISCLOSURE)) for sid in mine])
        return len(mine)

    def _send(self, batch: list[tuple[str, Make]]) -> None:
        for start in range(0, len(batch), MAX_BATCH):
            pipe = self.bus.redis.pipeline(transaction=False)
            for sid, make in batch[start:start + MAX_BATCH]:
                self.seqs[sid] += 1
                ks, args = _publish_args(sid, self.owner, make(self.seqs[sid]), self.bus.cfg)
                pipe.evalsha(self.sha, len(ks), *ks, *args)
            results = pipe.execute()
            self.fenced += sum(1 for r in results if r == -1)
            self.published += len(results)

    def tokens_phase(self) -> tuple[float, float]:
        """Every stream's tokens at `rate` per stream (0: as fast as Redis takes them)."""
        n = len(self.sids)
        total = n * self.tokens
        per_s = self.rate * n
        t0 = time.time()
        sent = 0
        while sent < total:
            due = total if per_s <= 0 else min(total, int((time.time() - t0) * per_s) + 1)
            if due <= sent:
                time.sleep(max(0.0, min(0.001, sent / per_s - (time.time() - t0))))
                continue
            upto = min(due, sent + MAX_BATCH)
            self._send([(self.sids[j % n], TOKEN) for j in range(sent, upto)])
            sent = upto
        return t0, time.time()

    def finish(self) -> None:
        done = partial(Done, finish_reason=FinishReason.LENGTH, usage=Usage(8, self.tokens),
                       timings=Timings(tokens_per_s=self.rate, worker=self.owner))
        self._send([(sid, done) for sid in self.sids])


def main() -> int:
    pub = Publisher(orjson.loads(sys.stdin.readline()))
    emit({"event": "ready", "streams": pub.prepare()})
    while (line := sys.stdin.readline()) and line.strip() != "go":
        pass
    t_go, t_end = pub.tokens_phase()
    pub.finish()
    tokens = len(pub.sids) * pub.tokens
    emit({"event": "result", "streams": len(pub.sids), "tokens": tokens, "published": pub.published,
          "fenced": pub.fenced, "t_go": t_go, "t_end": t_end,
          "achieved_per_s": round(tokens / (t_end - t_go), 1) if t_end > t_go else 0.0})
    pub.bus.redis.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
