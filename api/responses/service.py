"""What each Responses route does: create, retrieve (whole or streamed), list input items, cancel,
delete; and the parse of `starting_after`."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse, Response

from tokenfan.api.auth import Principal
from tokenfan.api.edge import Edge
from tokenfan.api.relay import relay, sse_response
from tokenfan.api.responses.convert import choice_echo, responses_param, to_chat
from tokenfan.api.responses.items import ITEM, TextFormat, chat_messages
from tokenfan.api.responses.record import Record, View
from tokenfan.api.responses.render import Renderer, fold, response_object
from tokenfan.api.responses.request import ResponsesRequest
from tokenfan.api.responses.store import load, read_events, save
from tokenfan.api.responses.stream import ResponsesSurface, replay
from tokenfan.api.streams import Follower, cancel_stream, start_stream
from tokenfan.shared import keys
from tokenfan.shared.errors import InvalidRequest, NotFound, Timeout
from tokenfan.shared.events import CancelReason, Event
from tokenfan.shared.state import StreamState, StreamStatus

log = logging.getLogger(__name__)

# A cancel answers with the response as it ended; a worker ends it within two tokens, a queued one at once.
CANCEL_WAIT_S = 5.0
# The most events one log event renders to (a call's first piece after a message: the message's three
# done events, the call's added and its first delta; closing a call first is two more): a bound on
# what a `starting_after` can be, checked before the log is read.
SN_PER_EVENT = 8
# GET /v1/responses/{id}/input_items: OpenAI's page size bounds and default.
INPUT_ITEMS_LIMIT = 20
INPUT_ITEMS_MAX = 100


def parse_after(query: str | None, header: str | None, bound: int) -> int:
    """`starting_after` (or the Last-Event-ID header): -1 when neither is given, else a sequence_number."""
    raw, param = (query, "starting_after") if query is not None else (header, "Last-Event-ID")
    if raw is None or raw == "":
        return -1
    if raw.startswith("-") and raw[1:].isascii() and raw[1:].isdigit():
        raise InvalidRequest(f"{param} must not be negative", code="invalid_starting_after", param=param)
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidRequest(f"{param} must be an event's sequence_number (digits 0-9)",
                             code="invalid_starting_after", param=param)
    if len(raw) > len(str(bound)) or int(raw) > bound:
        raise _past_end(param, bound)
    return int(raw)


def _past_end(param: str, last: int) -> InvalidRequest:
    return InvalidRequest(f"{param} is past the response's last event ({last})", code="invalid_starting_after",
                          param=param)


async def previous_conversation(edge: Edge, rid: str, owner: str) -> list[dict[str, Any]]:
    """A finished stored response's conversation and output, as the chat messages a next turn goes on
    from: 404 for one unknown, expired, unstored or another key's; 400 while it still runs."""
    try:
        got = await load(edge, rid, owner)
    except NotFound as exc:
        exc.param = "previous_response_id"
        raise
    now = fold(got.view, got.state, await read_events(edge, got))
    if now["status"] in ("queued", "in_progress"):
        raise InvalidRequest(f"the previous response '{rid}' is still {now['status']}; go on from it once it "
                             "ended", code="invalid_value", param="previous_response_id")
    items = [ITEM.validate_python(o) for o in now["output"]]
    return got.view.rec.conversation + chat_messages(items, {c["id"] for m in got.view.rec.conversation
                                                             for c in m.get("tool_calls") or ()})


async def create(edge: Edge, req: ResponsesRequest, who: Principal) -> Response:
    t0 = time.time()
    prefix = [] if req.previous_response_id is None else await previous_conversation(
        edge, req.previous_response_id, who.owner)
    conversation = req.history(prefix)
    chat = to_chat(req, conversation)
    try:
        started = await start_stream(edge, chat, who)
    except InvalidRequest as exc:
        exc.param = responses_param(exc.param)
        raise
    fmt = req.text.format if req.text and req.text.format else TextFormat(type="text")
    rec = Record(ttl_s=edge.settings.response_ttl_s, owner=who.owner, model=started.model,
                 created_at=started.state.created, background=req.background,
                 store=req.store, instructions=req.instructions, metadata=req.metadata or {},
                 max_output_tokens=req.max_output_tokens, temperature=chat.temperature, top_p=chat.top_p,
                 text_format=fmt.echo(), user=req.user, tool_choice=choice_echo(req),
                 tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
                 parallel_tool_calls=chat.parallel_tool_calls, previous_response_id=req.previous_response_id,
                 top_logprobs=req.top_logprobs,
                 conversation=conversation, input_items=req.input_items(started.stream_id))
    view = View(started.stream_id, rec)
    try:
        if req.store:
            await save(edge, view)
    except BaseException:
        await edge.hub.unsubscribe(started.sub)
        raise
    follower = Follower(edge, view.sid, 0, started.state, started.sub)
    if req.stream:
        return sse_response(edge, relay(edge, follower, ResponsesSurface(view, -1), t0=t0), view.sid)
    if req.background:
        await edge.hub.unsubscribe(started.sub)
        return JSONResponse(response_object(view, "queued", []))
    return JSONResponse(await collect(edge, view, follower, who.owner))


async def collect(edge: Edge, view: View, follower: Follower, owner: str) -> dict[str, Any]:
    """`stream: false`: the response object once it ended."""
    logged: list[Event] = []
    try:
        async with asyncio.timeout(edge.settings.request_timeout_s), aclosing(follower.batches()) as batches:
            async for batch in batches:
                logged += batch or ()
    except TimeoutError:
        await cancel_stream(edge, view.sid, owner, CancelReason.TIMEOUT)
        raise Timeout("the response took longer than the request timeout") from None
    finally:
        if not follower.finished:
            await follower.leave()
    return fold(view, StreamState(status=StreamStatus.FINISHED), logged)


async def retrieve(edge: Edge, rid: str, owner: str, stream: bool, after: int) -> Response:
    got = await load(edge, rid, owner)
    if not stream:
        return JSONResponse(fold(got.view, got.state, await read_events(edge, got)))
    logged = await read_events(edge, got) if got.state.ended else []
    if got.state.ended:
        rendered = Renderer(got.view)
        for e in logged:
            rendered.render(e)
        last = rendered.sn
        if after > last:
            raise _past_end("starting_after", last)
    if after >= 0:
        edge.metrics.resumes.inc()
    if got.archived:  # nothing live to follow: the kept events are the whole response
        return sse_response(edge, replay(got.view, logged, after), got.view.sid)
    follower = Follower(edge, got.view.sid, 0, got.state)
    return sse_response(edge, relay(edge, follower, ResponsesSurface(got.view, after), t0=time.time()),
                        got.view.sid)


async def input_items(edge: Edge, rid: str, owner: str, order: str, limit: int, after: str | None
                      ) -> dict[str, Any]:
    """`GET /v1/responses/{id}/input_items`: the items the response was given, a page of them."""
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'", code="invalid_value", param="order")
    if not 1 <= limit <= INPUT_ITEMS_MAX:
        raise InvalidRequest(f"limit must be from 1 to {INPUT_ITEMS_MAX}", code="invalid_value", param="limit")
    items = (await load(edge, rid, owner)).view.rec.input_items
    items = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise InvalidRequest(f"after: no input item '{after[:128]}' in this response", code="invalid_value",
                                 param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


async def cancel(edge: Edge, rid: str, owner: str) -> dict[str, Any]:
    got = await load(edge, rid, owner)
    if not got.view.rec.background:
        raise InvalidRequest("only responses created with background=true can be cancelled",
                             code="not_background")
    if got.state.ended:
        now = fold(got.view, got.state, await read_events(edge, got))
        if now["status"] == "cancelled":  # a second cancel answers as the first did
            return now
        raise InvalidRequest(f"the response is already {now['status']}; only a queued or in-progress response "
                             "can be cancelled", code="response_already_finished")
    await cancel_stream(edge, got.view.sid, owner, CancelReason.CLIENT)
    follower = Follower(edge, got.view.sid, 0, got.state)
    logged: list[Event] = []
    try:
        async with asyncio.timeout(CANCEL_WAIT_S), aclosing(follower.batches()) as batches:
            async for batch in batches:
                logged += batch or ()
    except TimeoutError:
        log.warning("API %s: response %s not ended %gs after its cancel", edge.name, rid, CANCEL_WAIT_S)
    finally:
        if not follower.finished:
            await follower.leave()
    state = StreamState(status=StreamStatus.FINISHED if follower.finished else StreamStatus.RUNNING)
    return fold(got.view, state, logged)


async def delete(edge: Edge, rid: str, owner: str) -> dict[str, Any]:
    """Forget the response; a running one is cancelled first, and its stream's keys expire when it ends."""
    got = await load(edge, rid, owner)
    sid = got.view.sid
    if not got.state.ended:
        await cancel_stream(edge, sid, owner, CancelReason.CLIENT)
    pipe = edge.redis.pipeline(transaction=False)
    pipe.delete(keys.response(sid), keys.response_log(sid))
    if got.state.ended:  # nobody writes to it any more
        pipe.delete(*keys.stream_keys(sid))
    await pipe.execute()
    return {"id": rid, "object": "response", "deleted": True}
