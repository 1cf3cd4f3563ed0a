"""tokenfan's own surface: start a stream, follow it (native events, or OpenAI's chunks with
`format=openai`) from any API process, resume it with Last-Event-ID, cancel it (docs/protocol.md)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tokenfan.api.bodies import CheckedBodyRoute
from tokenfan.api.deps import Caller, edge_of
from tokenfan.api.formats import OpenAIWriter
from tokenfan.api.openapi import COMMON_ERRORS, SSE_DOC, errors_doc
from tokenfan.api.relay import ChunkSurface, NativeSurface, relay, sse_response
from tokenfan.api.streams import Follower, cancel_stream, load_state, parse_last_id, seq_bound, start_stream
from tokenfan.shared.errors import InvalidRequest
from tokenfan.shared.schema import ChatRequest
from tokenfan.shared.state import StreamState

router = APIRouter(route_class=CheckedBodyRoute)  # request bodies checked off the event loop

@router.post("/v1/streams", status_code=201, responses=errors_doc(400, 404, 413, 429, *COMMON_ERRORS))
async def create_stream(req: ChatRequest, request: Request, who: Caller) -> JSONResponse:
    edge = edge_of(request)
    started = await start_stream(edge, req, who)
    await edge.hub.unsubscribe(started.sub)
    url = f"/v1/streams/{started.stream_id}"
    return JSONResponse(
        {"id": started.stream_id, "url": url, "model": started.model, "status": started.state.status.value,
         "created": started.created},
        status_code=201, headers={"Location": url},
    )


@router.get("/v1/streams/{stream_id}", response_model=None,
            responses={200: SSE_DOC, 204: {"description": "the stream ended at or before Last-Event-ID"},
                       **errors_doc(400, 404, *COMMON_ERRORS)})
async def follow_stream(stream_id: str, request: Request, who: Caller, format: str = "native",
                        last_event_id: str | None = None) -> Response:
    edge = edge_of(request)
    if format not in ("native", "openai"):
        raise InvalidRequest("format must be 'native' or 'openai'", code="invalid_value", param="format")
    last = parse_last_id(request.headers.get("last-event-id"), last_event_id, seq_bound(edge.settings))
    state = await load_state(edge, stream_id, who.owner)
    if state.ended and last >= await edge.bus.last_seq(stream_id):
        return Response(status_code=204)
    if last:
        edge.metrics.resumes.inc()
    follower = Follower(edge, stream_id, last, state)
    surface = _surface(format, stream_id, state, request)
    return sse_response(edge, relay(edge, follower, surface, t0=time.time()), stream_id)


@router.delete("/v1/streams/{stream_id}", status_code=202, responses=errors_doc(404, *COMMON_ERRORS))
async def delete_stream(stream_id: str, request: Request, who: Caller) -> JSONResponse:
    status = await cancel_stream(edge_of(request), stream_id, who.owner)
    return JSONResponse({"id": stream_id, "status": status}, status_code=202)


def _surface(fmt: str, sid: str, state: StreamState, request: Request) -> NativeSurface | ChunkSurface:
    if fmt == "native":
        return NativeSurface()
    include_usage = request.query_params.get("include_usage", "") in ("1", "true")
    return ChunkSurface(OpenAIWriter(sid, state.model, int(state.created), include_usage))
