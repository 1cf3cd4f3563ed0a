"""The OpenAI-compatible surface: chat completions, legacy text completions and the model list.

A request starts a stream like any other (api/streams.py); `"stream": true` relays it as OpenAI's
chunks (api/formats.py, api/completions.py), `"stream": false` gathers its events into one answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tokenfan.api.bodies import CheckedBodyRoute
from tokenfan.api.completions import CompletionRequest, CompletionWriter, text_completion
from tokenfan.api.deps import Caller, edge_of
from tokenfan.api.edge import Edge
from tokenfan.api.errors import error_response
from tokenfan.api.formats import Calls, OpenAIWriter, completion_of
from tokenfan.api.openapi import COMMON_ERRORS, SSE_EVENT, errors_doc
from tokenfan.api.relay import ChunkSurface, relay, sse_response
from tokenfan.api.streams import Follower, cancel_stream, start_stream
from tokenfan.shared.errors import NotFound, Timeout, Unavailable, from_code
from tokenfan.shared.events import CancelReason, Done, Error, Token
from tokenfan.shared.schema import ChatRequest

router = APIRouter(route_class=CheckedBodyRoute)  # request bodies checked off the event loop

CHAT_DOC = {200: {"content": {"application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {"schema": SSE_EVENT}}},
            **errors_doc(400, 404, 413, 429, 504, 502, *COMMON_ERRORS)}


@router.post("/v1/chat/completions", response_model=None, responses=CHAT_DOC)
async def chat_completions(req: ChatRequest, request: Request, who: Caller) -> Response:
    t0 = time.time()
    edge = edge_of(request)
    started = await start_stream(edge, req, who)
    follower = Follower(edge, started.stream_id, 0, started.state, started.sub)
    if not req.stream:
        return await _collect(edge, follower, started.model, started.created, who.owner)
    writer = OpenAIWriter(started.stream_id, started.model, started.created, req.include_usage())
    return sse_response(edge, relay(edge, follower, ChunkSurface(writer), t0=t0), started.stream_id)


@router.post("/v1/completions", response_model=None, responses=CHAT_DOC)
async def completions(req: CompletionRequest, request: Request, who: Caller) -> Response:
    """OpenAI's legacy text route: the prompt as it is, no chat template (api/completions.py)."""
    t0 = time.time()
    edge = edge_of(request)
    chat = req.to_chat()
    started = await start_stream(edge, chat, who)
    follower = Follower(edge, started.stream_id, 0, started.state, started.sub)
    echo = req.text() if req.echo else ""
    if not req.stream:
        return await _collect(edge, follower, started.model, started.created, who.owner,
                              text_completion(echo, req.logprobs is not None))
    writer = CompletionWriter(started.stream_id, started.model, started.created, chat.include_usage(),
                              echo or None, req.logprobs is not None)
    return sse_response(edge, relay(edge, follower, ChunkSurface(writer), t0=t0), started.stream_id)


@router.get("/v1/models", responses=errors_doc(*COMMON_ERRORS))
async def list_models(request: Request, who: Caller) -> dict[str, Any]:
    names = await edge_of(request).models()
    return {"object": "list", "data": [_model_object(n) for n in names]}


@router.get("/v1/models/{model_id:path}", responses=errors_doc(404, *COMMON_ERRORS))
async def retrieve_model(model_id: str, request: Request, who: Caller) -> dict[str, Any]:
    """One model of the list (`client.models.retrieve`); an id may hold a slash (`org/name`)."""
    if model_id not in await edge_of(request).models():
        raise NotFound(f"The model '{model_id[:200]}' does not exist", code="model_not_found", param="model")
    return _model_object(model_id)


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tokenfan"}


Answer = Callable[[str, str, int, dict[int, str], Done, dict[int, list[Any]], dict[int, Calls]],
                  dict[str, Any]]


async def _collect(edge: Edge, follower: Follower, model: str, created: int, owner: str,
                   answer: Answer = completion_of) -> JSONResponse:
    """`"stream": false`: gather the events into one answer (a chat.completion, or `answer`'s shape)."""
    parts: dict[int, list[str]] = {0: []}  # per choice
    logprobs: dict[int, list[Any]] = {}
    calls: dict[int, Calls] = {}
    try:
        async with asyncio.timeout(edge.settings.request_timeout_s):
            async for batch in follower.batches():
                for e in batch or ():
                    if isinstance(e, Token):
                        _gather(e, parts, logprobs, calls)
                    elif isinstance(e, Done):
                        for c in e.choices or ():  # a choice that said nothing is one too
                            parts.setdefault(c.index, [])
                        texts = {i: "".join(p) for i, p in parts.items()}
                        return JSONResponse(answer(follower.sid, model, created, texts, e, logprobs, calls))
                    elif isinstance(e, Error):
                        return _error_event_response(e)
    except TimeoutError:
        await cancel_stream(edge, follower.sid, owner, CancelReason.TIMEOUT)
        return error_response(Timeout("the answer took longer than the request timeout"))
    finally:
        if not follower.finished:
            await follower.leave()
    raise Unavailable("the stream ended without an answer", code="stream_lost")


def _gather(e: Token, parts: dict[int, list[str]], logprobs: dict[int, list[Any]],
            calls: dict[int, Calls]) -> None:
    """One token event into its choice's text, logprobs and calls."""
    index = e.choice
    parts.setdefault(index, []).append(e.text)
    if e.tool_call is not None:
        calls.setdefault(index, Calls()).add(e.tool_call)
    if e.logprobs is not None:
        logprobs.setdefault(index, []).extend(e.logprobs)


def _error_event_response(e: Error) -> JSONResponse:
    return error_response(from_code(e.code, e.message))
