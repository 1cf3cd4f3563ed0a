"""Scenario 10's subscriber: one process, one pub/sub connection, one asyncio task per channel.

Two sides, each the way an API process would use it, on uvloop as the API
runs:

- `hub`: tokenfan's `api.hub.Hub`, one `Subscription` per channel, each
  read by its own task with `Subscription.get(timeout)`, as the relay's
  follower reads it (`api/streams.py`).
- `redis-py`: redis-py's own asyncio `PubSub` (hiredis parsing, as the hub
  has), every channel subscribed on its one connection, one reader task
  handing each message to its channel's `asyncio.Queue`, and one task per
  channel taking everything queued at each wake-up (the follower takes a
  batch too). The reader is `pubsub.listen()` or a `get_message(timeout=…)`
  loop (`read` in the job); the scenario uses the faster of the two.

Both tasks do the same per event: decode its JSON, as the relay does, and
note its latency (receipt minus the publisher's `ts`) when asked.

Stdin: the job (one JSON line: `side`, `redis_url`, `channels`, `read`),
then one line per phase (`expect` events, `latency`: whether to keep each
latency), or `quit`. Stdout: `ready`, then per phase `armed` (counting
from zero, CPU clock read) and `result` (once `expect` events arrived, or
the channels fell quiet for `QUIET_S` short of it).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import redis.asyncio as aredis

from tokenfan.api.hub import Hub, Subscription
from tokenfan.bench.client import emit
from tokenfan.bench.stats import rate, summary
from tokenfan.shared import defaults as d

SIDES = ("hub", "redis-py")
READS = ("listen", "get_message")
# The reader's timeout in `get_message` mode: redis-py's own `PubSub.run` polls at 1 s.
READ_TIMEOUT_S = 1.0
# A hub task's wait before an idle tick: the relay's heartbeat order of magnitude, so no tick
# fires while events flow (a tick is a timer per wait either way: the hub's own cost).
IDLE_TICK_S = 5.0
# Silence that ends a phase short of its count (a side that lost events): far above any gap
# between batches at the rates measured.
QUIET_S = 2.0
# Channels per SUBSCRIBE command on the redis-py side (1,000 names in one command is fine too).
SUBSCRIBE_CHUNK = 500


class Tally:
    """One phase's count, first and last receipt and, when asked, every event's latency."""

    def __init__(self) -> None:
        self.reset(0, False)

    def reset(self, expect: int, latency: bool) -> None:
        self.expect = expect
        self.latency = latency
        self.received = 0
        self.gaps = 0
        self.lags: list[float] = []
        self.first = self.last = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def take(self, raws: list[bytes], gap: bool) -> None:
        now = time.time()
        if not self.received:
            self.first = now
        self.last = now
        self.gaps += gap
        loads, lags = orjson.loads, self.lags
        for raw in raws:
            ts = loads(raw)["ts"]
            if self.latency:
                lags.append(now - ts)
        self.received += len(raws)
        if self.received >= self.expect and not self.done.done():
            self.done.set_result(None)

    async def settle(self) -> None:
        """Until the count is in, or nothing arrived for `QUIET_S` after something did."""
        while True:
            heard = self.received
            try:
                await asyncio.wait_for(asyncio.shield(self.done), QUIET_S)
                return
            except TimeoutError:
                if heard and self.received == heard:
                    return

    def result(self, cpu_s: float) -> dict[str, Any]:
        span = self.last - self.first
        return {"expect": self.expect, "received": self.received, "lost": max(0, self.expect - self.received),
                "gaps": self.gaps, "seconds": round(span, 4), "per_s": rate(self.received, span),
                "cpu_s": round(cpu_s, 4),
                "cpu_ms_per_1000": round(1e6 * cpu_s / self.received, 3) if self.received else 0.0,
                "lag_ms": summary(self.lags, scale=1000.0, digits=3)}


async def _follow_hub(sub: Subscription, tally: Tally) -> None:
    while True:
        got = await sub.get(IDLE_TICK_S)
        if got is not None:
            tally.take(*got)


async def _follow_queue(queue: asyncio.Queue[bytes], tally: Tally) -> None:
    while True:
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        tally.take(batch, False)


Tasks = list[asyncio.Task[None]]
Closer = Callable[[], Coroutine[Any, Any, None]]


async def hub_side(url: str, channels: list[str], tally: Tally) -> tuple[Tasks, Closer, str]:
    client = aredis.Redis.from_url(url)
    hub = Hub(client, buffer=d.SUBSCRIBER_BUFFER)
    await hub.start()
    subs = await asyncio.gather(*(hub.subscribe(ch) for ch in channels))
    tasks = [asyncio.create_task(_follow_hub(sub, tally)) for sub in subs]

    async def close() -> None:
        await hub.close()
        await client.aclose()

    return tasks, close, "hiredis (api.hub._Wire)"


async def redis_py_side(url: str, channels: list[str], tally: Tally, read: str) -> tuple[Tasks, Closer, str]:
    client = aredis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    for start in range(0, len(channels), SUBSCRIBE_CHUNK):
        await pubsub.subscribe(*channels[start:start + SUBSCRIBE_CHUNK])
    queues: dict[bytes, asyncio.Queue[bytes]] = {ch.encode(): asyncio.Queue() for ch in channels}
    reader = _listen(pubsub, queues) if read == "listen" else _poll(pubsub, queues)
    tasks = [asyncio.create_task(reader)]
    tasks += [asyncio.create_task(_follow_queue(q, tally)) for q in queues.values()]
    assert pubsub.connection is not None
    parser = type(pubsub.connection._parser).__name__  # which parser redis-py picked: hiredis's, we expect

    async def close() -> None:
        await pubsub.aclose()
        await client.aclose()

    return tasks, close, parser


async def _listen(pubsub: Any, queues: dict[bytes, asyncio.Queue[bytes]]) -> None:
    async for msg in pubsub.listen():
        if msg["type"] == "message":
            queues[msg["channel"]].put_nowait(msg["data"])


async def _poll(pubsub: Any, queues: dict[bytes, asyncio.Queue[bytes]]) -> None:
    while True:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_TIMEOUT_S)
        if msg is not None and msg["type"] == "message":
            queues[msg["channel"]].put_nowait(msg["data"])


async def serve(job: dict[str, Any]) -> None:
    tally = Tally()
    url, channels = str(job["redis_url"]), [str(c) for c in job["channels"]]
    if job["side"] == "hub":
        tasks, close, parser = await hub_side(url, channels, tally)
    else:
        tasks, close, parser = await redis_py_side(url, channels, tally, str(job.get("read", "listen")))
    emit({"event": "ready", "side": job["side"], "channels": len(channels), "parser": parser})
    while (line := await asyncio.to_thread(sys.stdin.readline)) and line.strip() != "quit":
        cmd = orjson.loads(line)
        tally.reset(int(cmd["expect"]), bool(cmd["latency"]))
        cpu0 = time.process_time()
        emit({"event": "armed"})
        await tally.settle()
        emit({"event": "result", **tally.result(time.process_time() - cpu0)})
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await close()


def main() -> int:
    job = orjson.loads(sys.stdin.readline())
    import uvloop

    uvloop.run(serve(job))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
