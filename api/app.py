"""The FastAPI application: routes, error mapping, lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenfan.api import discovery, ops, responses
from tokenfan.api.auth import DocsGate
from tokenfan.api.bodies import CheckedBodyRoute
from tokenfan.api.completions import CompletionRequest, CompletionWriter, text_completion
from tokenfan.api.edge import Edge
from tokenfan.api.deps import Caller, edge_of
from tokenfan.api.errors import add_handlers, error_response
from tokenfan.api.formats import Calls, OpenAIWriter, completion_of
from tokenfan.api.middleware import BodyLimit, RequestMetrics
from tokenfan.api.openapi import COMMON_ERRORS, SSE_DOC, SSE_EVENT, errors_doc, openapi_without_422
from tokenfan.api.relay import ChunkSurface, NativeSurface, relay, sse_response
from tokenfan.api.requestid import RequestIds
from tokenfan.api.streams import (
    Follower,
    cancel_stream,
    load_state,
    parse_last_id,
    seq_bound,
    start_stream,
)
from tokenfan.shared import events
from tokenfan.shared.errors import (
    EngineError,
    InvalidRequest,
    NotFound,
    Timeout,
    TokenfanError,
    Unavailable,
    from_code,
)
from tokenfan.shared.redisconn import redacted
from tokenfan.shared.schema import ChatRequest
from tokenfan.shared.settings import ApiSettings
from tokenfan.shared.state import StreamState

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


CHAT_DOC = {200: {"content": {"application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {"schema": SSE_EVENT}}},
            **errors_doc(400, 404, 413, 429, 504, 502, *COMMON_ERRORS)}


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        edge = await Edge.open(settings)
        app.state.edge = edge
        edge.tasks.append(asyncio.create_task(discovery.announce(edge), name="tokenfan-discovery"))
        edge.tasks.append(asyncio.create_task(ops.record(edge), name="tokenfan-ops-history"))
        if not await edge.auth.enabled():
            log.warning("API %s: NO API KEYS ARE CONFIGURED - this API is open to anyone who can reach it. "
                        "Add keys (tokenfan keys add) before exposing it beyond this machine.", edge.name)
        log.info("API %s: serving %s, Redis at %s", edge.name, ", ".join(settings.served_models()),
                 redacted(settings.redis_url))
        try:
            yield
        finally:
            await edge.close()

    app = FastAPI(title="tokenfan", version="0.1.0", lifespan=lifespan)
    app.router.route_class = CheckedBodyRoute  # request bodies checked off the event loop
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(DocsGate, public=settings.public_docs)
    app.add_middleware(RequestMetrics)
    app.add_middleware(RequestIds)
    add_handlers(app)
    _routes(app)
    ops.install(app)
    discovery.install(app)
    responses.install(app)
    app.openapi = openapi_without_422(app)  # type: ignore[method-assign]
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tokenfan"}


def _routes(app: FastAPI) -> None:  # noqa: C901 - one place that lists every route
    @app.post("/v1/chat/completions", response_model=None, responses=CHAT_DOC)
    async def chat_completions(req: ChatRequest, request: Request, who: Caller) -> Response:
        t0 = time.time()
        edge = edge_of(request)
        started = await start_stream(edge, req, who)
        follower = Follower(edge, started.stream_id, 0, started.state, started.sub)
        if not req.stream:
            return await _collect(edge, follower, started.model, started.created, who.owner)
        writer = OpenAIWriter(started.stream_id, started.model, started.created, req.include_usage())
        return sse_response(edge, relay(edge, follower, ChunkSurface(writer), t0=t0), started.stream_id)

    @app.post("/v1/completions", response_model=None, responses=CHAT_DOC)
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

    @app.post("/v1/streams", status_code=201, responses=errors_doc(400, 404, 413, 429, *COMMON_ERRORS))
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

    @app.get("/v1/streams/{stream_id}", response_model=None,
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

    @app.delete("/v1/streams/{stream_id}", status_code=202, responses=errors_doc(404, *COMMON_ERRORS))
    async def delete_stream(stream_id: str, request: Request, who: Caller) -> JSONResponse:
        status = await cancel_stream(edge_of(request), stream_id, who.owner)
        return JSONResponse({"id": stream_id, "status": status}, status_code=202)

    @app.get("/v1/models", responses=errors_doc(*COMMON_ERRORS))
    async def list_models(request: Request, who: Caller) -> dict[str, Any]:
        names = await edge_of(request).models()
        return {"object": "list", "data": [_model_object(n) for n in names]}

    @app.get("/v1/models/{model_id:path}", responses=errors_doc(404, *COMMON_ERRORS))
    async def retrieve_model(model_id: str, request: Request, who: Caller) -> dict[str, Any]:
        """One model of the list (`client.models.retrieve`); an id may hold a slash (`org/name`)."""
        if model_id not in await edge_of(request).models():
            raise NotFound(f"The model '{model_id[:200]}' does not exist", code="model_not_found", param="model")
        return _model_object(model_id)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None, responses={503: {"description": "not ready, with the reason"}})
    async def readyz(request: Request) -> JSONResponse:
        edge = edge_of(request)
        try:
            await edge.redis.ping()
        except redis.RedisError as exc:
            # The reason names no address (anyone may ask: probes carry no key); the admin key sees why.
            body = {"status": "unready", "reason": "Redis unreachable"}
            if await _admin_asks(edge, request):
                body["detail"] = str(exc)
            return JSONResponse(body, status_code=503)
        missing = [m for m in edge.settings.served_models() if not await edge.live_workers(m)]
        if missing:
            return JSONResponse({"status": "unready", "reason": f"no live worker for: {', '.join(missing)}"},
                                status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                                     **errors_doc(*COMMON_ERRORS)})
    async def metrics(request: Request) -> Response:
        edge = edge_of(request)
        if await edge.auth.enabled():
            await edge.auth.metrics_allowed(request)
        try:
            await ops.refresh_gauges(edge)
        except redis.RedisError as exc:
            log.debug("API %s: queue gauges not refreshed: %s", edge.name, exc)
        return Response(generate_latest(edge.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False, response_model=None)
    async def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            raise NotFound("the chat page is not installed")
        return FileResponse(page)


async def _admin_asks(edge: Edge, request: Request) -> bool:
    """Whether the request carries an admin key this process can check (Redis may be down)."""
    try:
        return (await edge.auth.admin(request)).admin
    except (TokenfanError, redis.RedisError):
        return False


def _surface(fmt: str, sid: str, state: StreamState, request: Request) -> NativeSurface | ChunkSurface:
    if fmt == "native":
        return NativeSurface()
    include_usage = request.query_params.get("include_usage", "") in ("1", "true")
    return ChunkSurface(OpenAIWriter(sid, state.model, int(state.created), include_usage))


Answer = Callable[[str, str, int, dict[int, str], events.Event, dict[int, list[Any]], dict[int, Calls]],
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
                    if e.type == events.TOKEN:
                        _gather(e, parts, logprobs, calls)
                    elif e.type == events.DONE:
                        for c in e.data.get("choices") or []:  # a choice that said nothing is one too
                            parts.setdefault(int(c.get("index", 0)), [])
                        texts = {i: "".join(p) for i, p in parts.items()}
                        return JSONResponse(answer(follower.sid, model, created, texts, e, logprobs, calls))
                    elif e.type == events.ERROR:
                        return _error_event_response(e)
    except TimeoutError:
        await cancel_stream(edge, follower.sid, owner, "timeout")
        return error_response(Timeout("the answer took longer than the request timeout"))
    finally:
        if not follower.finished:
            await follower.leave()
    raise Unavailable("the stream ended without an answer", code="stream_lost")


def _gather(e: events.Event, parts: dict[int, list[str]], logprobs: dict[int, list[Any]],
            calls: dict[int, Calls]) -> None:
    """One token event into its choice's text, logprobs and calls."""
    index = int(e.data.get("index", 0))
    parts.setdefault(index, []).append(e.data.get("text", ""))
    if "tool_call" in e.data:
        calls.setdefault(index, Calls()).add(e.data["tool_call"])
    if "logprobs" in e.data:
        logprobs.setdefault(index, []).extend(e.data["logprobs"])


def _error_event_response(e: events.Event) -> JSONResponse:
    return error_response(from_code(str(e.data.get("code", EngineError.code)), str(e.data.get("message", ""))))
