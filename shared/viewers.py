"""A stream's viewer set, owned here.

`keys.viewers(id)` is a sorted set of who is watching the stream, member ->
expiry (ms). Each API follower holds one entry under a random id and keeps
it fresh (the API refreshes all of a process's entries in one round trip);
the worker's keeper counts the entries not yet expired, and a stream with
none for `abandon_grace_s` is cancelled as abandoned (shared/cancel.py).
Two members are not viewers:

- `PLACEHOLDER`, written with the stream, covers the wait for a first
  viewer; the first viewer to leave takes it away with its own entry;
- `BACKGROUND`, a background response's (api/responses/): nobody watches
  it, and it must run on, so it holds an entry as long as the log lives.

The publish script (shared/bus.py) expires the set with the log at the
terminal event.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from tokenfan.shared import keys
from tokenfan.shared.defaults import VIEWER_TTL_S

PLACEHOLDER = "created"
BACKGROUND = "background"


def expiry_ms(ttl_s: float = VIEWER_TTL_S) -> int:
    """The score of an entry written now that lasts `ttl_s`."""
    return int((time.time() + ttl_s) * 1000)


def queue_create(pipe: Any, stream_id: str, ttl_s: int) -> None:
    """Queue a new stream's set on a pipeline: the placeholder, the set expiring in `ttl_s`."""
    pipe.zadd(keys.viewers(stream_id), {PLACEHOLDER: expiry_ms()})
    pipe.expire(keys.viewers(stream_id), ttl_s)


def queue_background(pipe: Any, stream_id: str, ttl_s: int) -> None:
    """Queue a background response's entry, lasting `ttl_s`, on a pipeline."""
    pipe.zadd(keys.viewers(stream_id), {BACKGROUND: expiry_ms(ttl_s)})


def queue_touch(pipe: Any, stream_id: str, viewer: str, expiry: int) -> None:
    """Queue a viewer's entry, fresh until `expiry` (ms), on a pipeline."""
    pipe.zadd(keys.viewers(stream_id), {viewer: expiry})


async def atouch(redis: AsyncRedis, stream_id: str, viewer: str) -> None:
    """A viewer's entry, fresh for VIEWER_TTL_S."""
    await redis.zadd(keys.viewers(stream_id), {viewer: expiry_ms()})


async def aleave(redis: AsyncRedis, stream_id: str, viewer: str) -> None:
    """A viewer left: its entry goes, and the placeholder with it."""
    await redis.zrem(keys.viewers(stream_id), viewer, PLACEHOLDER)


async def acount(redis: AsyncRedis, stream_id: str) -> int:
    """How many entries have not expired."""
    return int(await redis.zcount(keys.viewers(stream_id), int(time.time() * 1000), "+inf"))


def queue_count(pipe: Any, stream_id: str, now: float) -> None:
    """Queue `acount` as of `now` (epoch s) on a pipeline; the reply is the count."""
    pipe.zcount(keys.viewers(stream_id), int(now * 1000), "+inf")
