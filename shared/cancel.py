"""A stream's cancel flag, owned here.

`keys.cancel(id)` holds the reason a stream should stop (shared/events.py's
`CancelReason`: `client`, `disconnect`, `abandoned`, `timeout`), set once:
the first reason stays (SET NX), and the flag expires with the stream's
active log TTL. The API
sets it (a cancel request, the last viewer leaving a `cancel_on_disconnect`
stream), and so does the worker's keeper (no viewer for `abandon_grace_s`).
The publish script (shared/bus.py) answers CANCELLED while it is set and
expires it with the log at the terminal event; the worker reads the reason
into its `done` event.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from tokenfan.shared import keys
from tokenfan.shared.events import CancelReason


def request(redis: Redis, stream_id: str, reason: CancelReason, ttl_s: int) -> bool:
    """Ask the stream's worker to stop, for `reason` unless one was given already; whether it was ours."""
    return bool(redis.set(keys.cancel(stream_id), reason, nx=True, ex=ttl_s))


async def arequest(redis: AsyncRedis, stream_id: str, reason: CancelReason, ttl_s: int) -> bool:
    """`request`, through redis.asyncio."""
    return bool(await redis.set(keys.cancel(stream_id), reason, nx=True, ex=ttl_s))


def reason(redis: Redis, stream_id: str) -> CancelReason | None:
    """Why the stream was asked to stop (None when it was not)."""
    return parse_reason(redis.get(keys.cancel(stream_id)))


def queue_reason(pipe: Any, stream_id: str) -> None:
    """Queue a read of the reason on a pipeline; `parse_reason` reads the reply."""
    pipe.get(keys.cancel(stream_id))


def parse_reason(raw: bytes | str | None) -> CancelReason | None:
    """The reason a flag's value says; None when there is no flag (`CancelReason.of_flag` reads one
    this code does not know as a client's cancel)."""
    return None if raw is None else CancelReason.of_flag(raw)
