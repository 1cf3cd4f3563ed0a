"""The third-party internals tokenfan relies on, one test per library (issue 28).

pyproject.toml pins each of these libraries to the releases the suite ran;
these tests say, naming the name, which private (or undocumented) name an
upgrade removed or changed, before the code that uses it fails in a way
that does not say why. Keep each list in step with the comment beside the
library's pin in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any


def params(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def check(where: str, owner: object, name: str, *, args: list[str] | None = None, coroutine: bool | None = None,
          arity: int | None = None) -> None:
    """`owner.name` exists; with `args` its parameters are exactly these; with `arity` it takes this many
    (`self` included); `coroutine` says whether it must be async."""
    fn = getattr(owner, name, None)
    assert fn is not None, f"{where}: {name} is gone (used by tokenfan; see pyproject.toml's pin)"
    if args is not None:
        assert params(fn) == args, f"{where}: {name}{inspect.signature(fn)} no longer takes {args}"
    if arity is not None:
        assert len(params(fn)) == arity, f"{where}: {name}{inspect.signature(fn)} no longer takes {arity} arguments"
    if coroutine is not None:
        now = "sync" if coroutine else "async"
        assert inspect.iscoroutinefunction(fn) == coroutine, f"{where}: {name} is {now} now"


async def _nothing() -> AsyncIterator[bytes]:
    yield b""


def test_sse_starlette_internals_api_sse_uses() -> None:
    """api/sse.py: `SSEResponse` replaces `EventSourceResponse`'s loop and keeps its state flags."""
    from sse_starlette import EventSourceResponse, _utils

    from tokenfan.api.sse import SSEResponse

    where = "sse-starlette (api/sse.py)"
    check(where, _utils, "collapse_excgroups", args=[])
    check(where, EventSourceResponse, "_listen_for_exit_signal", args=[], coroutine=True)
    check(where, EventSourceResponse, "_stream_response", args=["self", "send"], coroutine=True)
    check(where, EventSourceResponse, "_send_with_timeout", args=["self", "send", "message"], coroutine=True)

    async def make() -> SSEResponse:
        import anyio
        stop = anyio.Event()
        resp = SSEResponse(_nothing(), ping_s=7.0, send_timeout_s=3.0, grace_s=2.0, shutdown_event=stop)
        # What our subclass reads and writes of the library's state, with the values it passed in.
        expected = {"_ping_interval": 7.0, "_shutdown_grace_period": 2.0, "_shutdown_event": stop,
                    "_response_started": False, "_response_complete": False, "_client_disconnected": False,
                    "_send_interrupted": False, "active": True, "send_timeout": 3.0}
        for name, value in expected.items():
            assert hasattr(resp, name), f"{where}: EventSourceResponse no longer sets {name}"
            assert getattr(resp, name) == value, f"{where}: {name} is {getattr(resp, name)!r}, not {value!r}"
        for name in ("_send_lock", "_cleanup_timeout", "client_close_handler_callable"):
            assert hasattr(resp, name), f"{where}: EventSourceResponse no longer sets {name}"
        assert hasattr(resp._send_lock, "__aenter__"), f"{where}: _send_lock is no longer an async lock"
        return resp

    asyncio.run(make())


def test_rq_internals_the_scheduler_uses() -> None:
    """worker/scheduler.py drives a SimpleWorker by hand and ends each job as `perform_job` does."""
    from rq import SimpleWorker

    where = "rq (worker/scheduler.py)"
    check(where, SimpleWorker, "_finalize_success", arity=5)
    assert params(SimpleWorker._finalize_success)[1:4] == ["job", "queue", "execution"], (
        f"rq (worker/scheduler.py): _finalize_success{inspect.signature(SimpleWorker._finalize_success)} "
        "no longer takes (job, queue, execution, result)")
    check(where, SimpleWorker, "prepare_execution", arity=2)
    check(where, SimpleWorker, "prepare_job_execution", args=["self", "job", "remove_from_intermediate_queue"])


def test_uvicorn_internals_the_guarded_protocol_uses() -> None:
    """ops/protocol.py subclasses uvicorn's httptools protocol and reads its request cycle."""
    from uvicorn.protocols.http import httptools_impl

    where = "uvicorn (ops/protocol.py)"
    for name in ("HttpToolsProtocol", "RequestResponseCycle"):
        assert hasattr(httptools_impl, name), f"{where}: uvicorn.protocols.http.httptools_impl.{name} is gone"
    proto = httptools_impl.HttpToolsProtocol
    for name, args in {"on_message_begin": ["self"], "on_url": ["self", "url"], "on_header": ["self", "name", "value"],
                       "on_headers_complete": ["self"], "on_body": ["self", "body"],
                       "on_message_complete": ["self"], "connection_made": ["self", "transport"],
                       "connection_lost": ["self", "exc"], "data_received": ["self", "data"]}.items():
        check(where, proto, name, args=args)
    init = inspect.getsource(proto)
    for attr in ("self.parser", "self.transport", "self.client", "self.loop", "self.cycle"):
        assert f"{attr} " in init or f"{attr}:" in init, f"{where}: HttpToolsProtocol no longer sets {attr}"
    cycle = inspect.getsource(httptools_impl.RequestResponseCycle)
    for attr in ("send", "message_event", "response_started", "response_complete", "disconnected",
                 "chunked_encoding", "expected_content_length"):
        assert f"self.{attr}" in cycle or f"def {attr}" in cycle, (
            f"{where}: RequestResponseCycle no longer has {attr}")


def test_redis_internals_the_sentinel_connections_use() -> None:
    """shared/redisconn.py's Sentinel connections override redis-py's reconnect and read its socket."""
    import redis.asyncio.sentinel as asentinel
    import redis.sentinel as sentinel

    where = "redis-py (shared/redisconn.py)"
    check(where, sentinel.SentinelManagedConnection, "_connect_retry", args=["self"], coroutine=False)
    check(where, asentinel.SentinelManagedConnection, "_connect_retry", args=["self"], coroutine=True)
    for cls in (sentinel.SentinelManagedConnection, asentinel.SentinelManagedConnection):
        check(where, cls, "send_packed_command", args=["self", "command", "check_health"])
    conn = sentinel.SentinelManagedConnection(connection_pool=None)
    assert hasattr(conn, "_sock"), f"{where}: redis.connection.Connection no longer has _sock"
    assert conn._sock is None, f"{where}: a new connection's _sock is {conn._sock!r}, not None"

