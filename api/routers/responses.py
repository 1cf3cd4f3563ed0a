"""OpenAI's Responses API (`/v1/responses`): its routes; what they do is api/responses/service.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenfan.api.bodies import CheckedBodyRoute
from tokenfan.api.deps import Caller, edge_of
from tokenfan.api.openapi import EVENTS, OBJECT, responses_doc
from tokenfan.api.responses.request import ResponsesRequest
from tokenfan.api.responses.service import (
    INPUT_ITEMS_LIMIT,
    SN_PER_EVENT,
    cancel,
    create,
    delete,
    input_items,
    parse_after,
    retrieve,
)
from tokenfan.api.streams import seq_bound
from tokenfan.shared.errors import InvalidRequest

router = APIRouter(route_class=CheckedBodyRoute)  # request bodies checked off the event loop


def _flag(name: str, raw: str | None) -> bool:
    if raw is None or raw in ("false", "0", ""):
        return False
    if raw in ("true", "1"):
        return True
    raise InvalidRequest(f"{name} must be true or false", code="invalid_value", param=name)


@router.post("/v1/responses", response_model=None,
             responses=responses_doc({**OBJECT, **EVENTS}, 400, 404, 413, 429, 504))
async def create_response(req: ResponsesRequest, request: Request, who: Caller) -> Response:
    return await create(edge_of(request), req, who)


@router.get("/v1/responses/{response_id}", response_model=None,
            responses=responses_doc({**OBJECT, **EVENTS}, 400, 404))
async def retrieve_response(response_id: str, request: Request, who: Caller, stream: str | None = None,
                            starting_after: str | None = None) -> Response:
    edge = edge_of(request)
    streamed = _flag("stream", stream)
    after = parse_after(starting_after, request.headers.get("last-event-id"),
                        (seq_bound(edge.settings) + 1) * SN_PER_EVENT)
    return await retrieve(edge, response_id, who.owner, streamed, after)


@router.get("/v1/responses/{response_id}/input_items", responses=responses_doc(OBJECT, 400, 404))
async def list_input_items(response_id: str, request: Request, who: Caller, order: str = "desc",
                           limit: int = INPUT_ITEMS_LIMIT, after: str | None = None) -> dict[str, Any]:
    return await input_items(edge_of(request), response_id, who.owner, order, limit, after)


@router.post("/v1/responses/{response_id}/cancel", responses=responses_doc(OBJECT, 400, 404))
async def cancel_response(response_id: str, request: Request, who: Caller) -> dict[str, Any]:
    return await cancel(edge_of(request), response_id, who.owner)


@router.delete("/v1/responses/{response_id}", responses=responses_doc(OBJECT, 404))
async def delete_response(response_id: str, request: Request, who: Caller) -> dict[str, Any]:
    return await delete(edge_of(request), response_id, who.owner)
