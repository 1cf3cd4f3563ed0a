"""A response's record and events in Redis: save, load (404 for another key's), read back."""

from __future__ import annotations

from dataclasses import dataclass

from tokenfan.api.edge import Edge
from tokenfan.api.responses.record import RESP_PREFIX, Record, View
from tokenfan.shared import events, keys, viewers
from tokenfan.shared.defaults import MAX_STREAM_ID_CHARS
from tokenfan.shared.errors import NotFound
from tokenfan.shared.events import Event
from tokenfan.shared.state import StreamState, StreamStatus


@dataclass(frozen=True, slots=True)
class Loaded:
    view: View
    state: StreamState
    archived: bool = False  # the stream's own keys expired: its events are the record's copy


async def read_events(edge: Edge, got: Loaded) -> list[Event]:
    """The response's events: the log's, or once the log expired the copy kept with the record."""
    if not got.archived:
        return await edge.bus.read_log(got.view.sid)
    raw = await edge.redis.xrange(keys.response_log(got.view.sid), "-", "+")
    return [events.decode(fields[b"e"]) for _id, fields in raw]


async def save(edge: Edge, view: View) -> None:
    """The record, and for a background response the viewer entry that keeps it running unwatched."""
    ttl = edge.settings.log_active_ttl_s
    pipe = edge.redis.pipeline(transaction=False)
    pipe.set(keys.response(view.sid), view.rec.model_dump_json(), ex=ttl)
    if view.rec.background:
        viewers.queue_background(pipe, view.sid, ttl)
    await pipe.execute()


def _not_found(rid: str) -> NotFound:
    return NotFound(f"no response with id '{rid}' (it never existed, expired, was deleted, or belongs to "
                    "another key)", code="response_not_found")


async def load(edge: Edge, rid: str, owner: str) -> Loaded:
    """The response's record and state, or 404 for one unknown, expired, deleted, unstored or another key's."""
    sid = rid.removeprefix(RESP_PREFIX)
    if not rid.startswith(RESP_PREFIX) or not sid or len(sid) > MAX_STREAM_ID_CHARS:
        raise _not_found(rid)
    pipe = edge.redis.pipeline(transaction=False)
    pipe.get(keys.response(sid))
    StreamState.queue_summary(pipe, sid)
    raw, summary = await pipe.execute()
    state = StreamState.parse_summary(summary)
    if raw is None:
        raise _not_found(rid)
    rec = Record.model_validate_json(raw)
    if state is None:  # the stream's keys expired before the record: it ended, its events are kept with it
        if not rec.owner or rec.owner != owner:
            raise _not_found(rid)
        return Loaded(View(sid, rec), StreamState(owner=owner, status=StreamStatus.FINISHED), archived=True)
    if state.owner != owner:
        raise _not_found(rid)
    return Loaded(View(sid, rec), state)
