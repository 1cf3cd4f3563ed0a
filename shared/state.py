"""A stream's state record and the enums of its life, owned here.

Each stream has one small Redis hash (`keys.state(id)`): who asked for it,
which model serves it, where it is in its life, which worker holds it, and
the job payload a takeover needs. `StreamState` is the only code that
spells its field names or its status values (rq's `Job.save`/`refresh`
own the job hash the same way): the API creates the record through it,
every reader parses it through it, and the bus's Lua scripts, which are
the only code that changes a stream's status, are formatted from the
names defined here.

The enums are `StrEnum` (a `str, Enum` whose `str()` is its value, as rq's
`JobStatus`), so they go to Redis, to Prometheus labels and to JSON as
their plain value. `PublishResult` is an `IntEnum` because the publish
script returns an integer on the wire; `shared/bus.py` converts it once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from tokenfan.shared import keys


class StreamStatus(StrEnum):
    """Where a stream is in its life (the state hash's `status`)."""

    QUEUED = "queued"  # waiting for a worker (new, or handed back for another to continue)
    RUNNING = "running"  # a worker holds its lease
    FINISHED = "finished"  # its terminal event is in the log


class AcquireResult(StrEnum):
    """What the acquire script found when it tried to claim a stream's lease.

    QUEUED and RUNNING mean the claim succeeded (the value is the status the
    stream had before it); the others mean nothing was claimed.
    """

    QUEUED = StreamStatus.QUEUED.value
    RUNNING = StreamStatus.RUNNING.value  # its previous holder's lease had lapsed
    FINISHED = StreamStatus.FINISHED.value
    MISSING = "missing"  # no state record: never created, or expired
    TAKEN = "taken"  # another owner holds a live lease

    @property
    def claimed(self) -> bool:
        return self in (AcquireResult.QUEUED, AcquireResult.RUNNING)


class PublishResult(IntEnum):
    """What the publish script did with one event (its integer reply)."""

    FENCED = -1  # our lease is gone: nothing was written
    PUBLISHED = 0  # in the log (now, or already: a re-sent event is written once)
    CANCELLED = 1  # published, and a cancel is requested for the stream
    GAP = 2  # the log lacks events before this one (Redis lost them): nothing was written; re-send from its end


class JobOutcome(StrEnum):
    """How one job (one attempt at a stream) ended: RQ's result and a metric label."""

    DONE = "done"
    CANCELLED = "cancelled"
    ERROR = "error"
    HANDED_OVER = "handed_over"  # another worker or a reaper continues or ends the stream
    INVALID = "invalid"  # the payload did not validate; never run
    SKIPPED_FINISHED = "skipped-finished"
    SKIPPED_MISSING = "skipped-missing"
    SKIPPED_TAKEN = "skipped-taken"

    @classmethod
    def skipped(cls, result: AcquireResult) -> JobOutcome:
        """The outcome of a job whose stream could not be claimed."""
        return cls(f"skipped-{result.value}")


class Field(StrEnum):
    """The state hash's field names."""

    MODEL = "model"
    OWNER = "owner"
    STATUS = "status"
    WORKER = "worker"
    CREATED = "created"
    TICKET = "ticket"  # its place in the model's queue, for the queue-position estimate
    ATTEMPT = "attempt"  # takeovers so far
    CANCEL_ON_DISCONNECT = "cancel_on_disconnect"
    REQUEST = "request"  # the job payload (JSON), for a takeover
    LOST = "lost"  # workers that died or let its lease lapse while serving it (a hand-back is not one)


# Everything but the payload, which can be as large as the request body.
SUMMARY_FIELDS = tuple(f for f in Field if f is not Field.REQUEST)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(slots=True)
class StreamState:
    """One stream's state record (the hash at `keys.state(stream_id)`)."""

    model: str = ""
    owner: str = ""
    status: StreamStatus = StreamStatus.QUEUED
    worker: str = ""
    created: float = 0.0
    ticket: int = 0
    attempt: int = 0
    cancel_on_disconnect: bool = False
    request: bytes = b""
    lost: int = 0

    @classmethod
    def parse(cls, raw: Mapping[Any, Any]) -> StreamState | None:
        """From a hash as redis-py returns it (bytes or str, missing fields absent); None when empty."""
        got = {_text(k): v for k, v in raw.items() if v is not None}
        if not got:
            return None
        text = {k: _text(v) for k, v in got.items() if k != Field.REQUEST}
        request = got.get(Field.REQUEST, b"")
        return cls(
            model=text.get(Field.MODEL, ""),
            owner=text.get(Field.OWNER, ""),
            status=StreamStatus(text.get(Field.STATUS, StreamStatus.QUEUED)),
            worker=text.get(Field.WORKER, ""),
            created=float(text.get(Field.CREATED) or 0),
            ticket=int(text.get(Field.TICKET) or 0),
            attempt=int(text.get(Field.ATTEMPT) or 0),
            cancel_on_disconnect=text.get(Field.CANCEL_ON_DISCONNECT, "0") == "1",
            request=request.encode() if isinstance(request, str) else request,
            lost=int(text.get(Field.LOST) or 0),
        )

    def to_hash(self) -> dict[str, str | int | float | bytes]:
        return {
            Field.MODEL: self.model,
            Field.OWNER: self.owner,
            Field.STATUS: self.status.value,
            Field.WORKER: self.worker,
            Field.CREATED: self.created,
            Field.TICKET: self.ticket,
            Field.ATTEMPT: self.attempt,
            Field.CANCEL_ON_DISCONNECT: int(self.cancel_on_disconnect),
            Field.REQUEST: self.request,
            Field.LOST: self.lost,
        }

    def create(self, pipe: Any, stream_id: str, ttl_s: int) -> None:
        """Queue the record's write on a pipeline (sync or asyncio: both buffer the calls)."""
        pipe.hset(keys.state(stream_id), mapping=self.to_hash())
        pipe.expire(keys.state(stream_id), ttl_s)

    @staticmethod
    def count_loss(redis: Redis, stream_id: str) -> int:
        """One more worker lost the stream (a reaper claimed its lapsed lease); how many have now. Only
        for a record that exists: HINCRBY on a gone one would make a record without a TTL."""
        return int(redis.hincrby(keys.state(stream_id), Field.LOST, 1))

    @classmethod
    def load(cls, redis: Redis, stream_id: str, *, with_request: bool = True) -> StreamState | None:
        if with_request:
            return cls.parse(redis.hgetall(keys.state(stream_id)))
        return cls._from_fields(redis.hmget(keys.state(stream_id), SUMMARY_FIELDS))

    @classmethod
    async def aload(cls, redis: AsyncRedis, stream_id: str, *, with_request: bool = True) -> StreamState | None:
        if with_request:
            return cls.parse(await redis.hgetall(keys.state(stream_id)))
        return cls._from_fields(await redis.hmget(keys.state(stream_id), SUMMARY_FIELDS))

    @classmethod
    def _from_fields(cls, values: list[Any]) -> StreamState | None:
        return cls.parse(dict(zip(SUMMARY_FIELDS, values, strict=True)))

    @staticmethod
    def load_ticket(redis: Redis, stream_id: str) -> int:
        """The stream's queue ticket (0 when it has none)."""
        raw = redis.hget(keys.state(stream_id), Field.TICKET)
        return int(raw) if raw else 0

    @staticmethod
    def queue_summary(pipe: Any, stream_id: str) -> None:
        """Queue a read of the record without its payload on a pipeline; `parse_summary` reads the reply."""
        pipe.hmget(keys.state(stream_id), SUMMARY_FIELDS)

    @classmethod
    def parse_summary(cls, values: list[Any]) -> StreamState | None:
        return cls._from_fields(values)

    @staticmethod
    def queue_status(pipe: Any, stream_id: str) -> None:
        """Queue a read of the stream's status on a pipeline; `parse_status` reads the reply."""
        pipe.hget(keys.state(stream_id), Field.STATUS)

    @staticmethod
    def parse_status(raw: bytes | str | None) -> StreamStatus | None:
        """A status read by `queue_status`; None when the stream has no record."""
        return None if raw is None else StreamStatus(_text(raw))

    @property
    def ended(self) -> bool:
        return self.status is StreamStatus.FINISHED
