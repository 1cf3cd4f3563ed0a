"""The API's shared pub/sub connection (`tokenfan.api.hub`) against a real Redis.

The hub parses Redis's pushes itself (an asyncio.Protocol with hiredis), so
these tests cover what redis-py's PubSub used to: delivery and order per
channel, subscribe and unsubscribe, AUTH, reconnecting after a restart (and
marking every subscription to re-read the log), dropping a connection
that stops answering, and failing a subscribe cleanly while Redis is down.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import redis
import redis.asyncio as aredis

from tokenfan.api import hub as hubmod
from tokenfan.api.hub import Hub, Subscription
from tokenfan.ops.embedded import EmbeddedRedis
from tokenfan.shared import keys
from tokenfan.shared.errors import Unavailable

A, B = keys.channel("test-a"), keys.channel("test-b")


async def until(check: Callable[[], object], within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def drain(sub: Subscription, n: int, within: float = 5.0) -> tuple[list[bytes], bool]:
    """Collect n messages (or a gap) from one subscription."""
    got: list[bytes] = []
    gap = False
    deadline = time.monotonic() + within
    while len(got) < n and not gap:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        res = await sub.get(left)
        if res is not None:
            got.extend(res[0])
            gap = gap or res[1]
    return got, gap


async def subscribe_once_up(hub: Hub, channel: str, within: float) -> Subscription:
    """Subscribe, retrying while the hub answers Unavailable (it reconnects by itself)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await hub.subscribe(channel)
        except Unavailable:
            if time.monotonic() > deadline:
                raise


@asynccontextmanager
async def hub_on(url: str, **kw: object) -> AsyncIterator[tuple[Hub, aredis.Redis]]:
    """A started hub and a client to publish with, both closed afterwards."""
    client = aredis.Redis.from_url(url)
    hub = Hub(client, **kw)  # type: ignore[arg-type]
    try:
        await hub.start()
        yield hub, client
    finally:
        await hub.close()
        await client.aclose()


@pytest.fixture
def servers() -> Iterator[Callable[..., EmbeddedRedis]]:
    """Start Redis servers of the test's own (again on a port, to restart one); all stopped at the end."""
    started: list[EmbeddedRedis] = []

    def start(port: int | None = None) -> EmbeddedRedis:
        started.append(EmbeddedRedis(port=port).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


async def test_delivery_order_and_unsubscribe(redis_url: str) -> None:
    async with hub_on(redis_url) as (hub, client):
        a1 = await hub.subscribe(A)
        a2 = await hub.subscribe(A)
        b = await hub.subscribe(B)
        for i in range(50):
            await client.publish(A, f"a{i}")
        await client.publish(B, "b0")
        want = [f"a{i}".encode() for i in range(50)]
        assert (await drain(a1, 50)) == (want, False)
        assert (await drain(a2, 50)) == (want, False)
        assert (await drain(b, 1)) == ([b"b0"], False)
        assert len(hub.subscriptions()) == 3

        await hub.unsubscribe(a1)
        await hub.unsubscribe(a2)
        # Redis itself no longer counts this connection on the channel.
        deadline = time.monotonic() + 5
        while dict(await client.pubsub_numsub(A))[A.encode()]:
            assert time.monotonic() < deadline, "Redis still counts the hub on the channel"
            await asyncio.sleep(0.02)
        assert dict(await client.pubsub_numsub(B))[B.encode()] == 1
        assert await a1.get(0.05) is None


async def test_a_full_buffer_becomes_a_gap(redis_url: str) -> None:
    async with hub_on(redis_url, buffer=4) as (hub, client):
        sub = await hub.subscribe(keys.channel("test-slow"))
        for i in range(10):
            await client.publish(keys.channel("test-slow"), str(i))
        await until(lambda: sub.gap, what="the overflow mark")
        items, gap = await drain(sub, 10, within=1)
        assert gap is True
        assert len(items) < 10  # what overflowed is dropped: the viewer re-reads the log instead


async def test_reconnects_after_restart_and_marks_gaps(servers: Callable[..., EmbeddedRedis]) -> None:
    server = servers()
    reconnects: list[float] = []
    async with hub_on(server.url, on_reconnect=lambda: reconnects.append(time.monotonic())) as (hub, client):
        sub = await hub.subscribe(keys.channel("test-r"))
        await client.publish(keys.channel("test-r"), "before")
        assert (await drain(sub, 1)) == ([b"before"], False)

        server.stop()
        await until(lambda: reconnects, what="the hub to notice the lost connection")
        server = servers(port=server.port)
        # Once re-subscribed, the subscription is told it may have missed something...
        await until(lambda: sub.gap, within=15, what="the re-subscribe to mark a gap")
        res = await sub.get(1)
        assert res is not None and res[1] is True
        # ...and what is published from then on arrives again.
        fresh = aredis.Redis.from_url(server.url)
        try:
            assert await fresh.publish(keys.channel("test-r"), "after") == 1
            assert (await drain(sub, 1)) == ([b"after"], False)
        finally:
            await fresh.aclose()


async def test_subscribe_while_redis_is_down_is_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                            servers: Callable[..., EmbeddedRedis]) -> None:
    monkeypatch.setattr(hubmod, "SUBSCRIBE_TIMEOUT_S", 0.5)
    # A refused connection does not hold the API's start-up for the whole connect timeout: made longer
    # than the test's own timeout, a start-up that waited it out fails the test (no clock bound here).
    monkeypatch.setattr(hubmod, "CONNECT_TIMEOUT_S", 3600.0)
    down = servers()
    port = down.port
    down.stop()  # a port where nothing answers
    async with hub_on(f"redis://127.0.0.1:{port}/0") as (hub, client):
        with pytest.raises(Unavailable):
            await hub.subscribe(keys.channel("test-down"))
        assert hub.subscriptions() == []
        # Redis comes up: the same hub connects by itself and serves.
        servers(port=port)
        sub = await subscribe_once_up(hub, keys.channel("test-down"), within=10)
        await client.publish(keys.channel("test-down"), "x")
        assert (await drain(sub, 1)) == ([b"x"], False)


async def test_auth_with_acl_user_and_a_wrong_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hubmod, "SUBSCRIBE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(hubmod, "CONNECT_TIMEOUT_S", 1.0)
    with EmbeddedRedis() as server:
        url = f"redis://hubber:s3cret@127.0.0.1:{server.port}/0"
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser("hubber", enabled=True, passwords=["+s3cret"], keys=["*"], channels=["*"],
                          commands=["+@all"])
        admin.close()
        with redis.Redis.from_url(url) as as_hubber:
            as_hubber.acl_setuser("default", enabled=False)  # only the ACL user can connect now
        async with hub_on(url) as (hub, client):
            sub = await hub.subscribe(keys.channel("test-auth"))
            await client.publish(keys.channel("test-auth"), "ok")
            assert (await drain(sub, 1)) == ([b"ok"], False)

        async with hub_on(url.replace("s3cret", "wrong")) as (bad, _):
            with pytest.raises(Unavailable):
                await bad.subscribe(keys.channel("test-auth"))
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url.replace("s3cret", "wrong")).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(server.url).ping()


async def test_a_redis_that_stops_answering_is_dropped(monkeypatch: pytest.MonkeyPatch,
                                                       servers: Callable[..., EmbeddedRedis]) -> None:
    monkeypatch.setattr(hubmod, "IDLE_PING_S", 0.3)
    monkeypatch.setattr(hubmod, "PING_TIMEOUT_S", 0.3)
    server = servers()
    assert server.proc is not None
    reconnects: list[float] = []
    async with hub_on(server.url, on_reconnect=lambda: reconnects.append(time.monotonic())) as (hub, client):
        sub = await hub.subscribe(keys.channel("test-frozen"))
        os.kill(server.proc.pid, signal.SIGSTOP)  # the socket stays open; nothing answers
        try:
            await until(lambda: reconnects, within=10, what="the PING timeout to drop the connection")
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        await until(lambda: sub.gap, within=10, what="the re-subscribe after the frozen Redis woke up")
        res = await sub.get(1)
        assert res is not None and res[1] is True
        await client.publish(keys.channel("test-frozen"), "alive")
        assert (await drain(sub, 1)) == ([b"alive"], False)
