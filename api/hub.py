"""One pub/sub connection per API process, shared by all its streams.

The connection is an `asyncio.Protocol` with a hiredis reader: every
message Redis pushes is parsed and appended to the buffers of that
channel's subscriptions in `data_received`, with no task, coroutine or
timeout per message (redis-py's `PubSub.get_message` loop cost 56 % of the
API's CPU at 30,000 events/s). A response waits on its own buffer. The hub
never waits for a slow client: a buffer over its limit is dropped and
marked, and that response catches up from the stream's log, so Redis never
sees a slow pub/sub reader (and never disconnects it for its output buffer).

A supervisor task connects (TLS, AUTH as the client's URL says), sends a
PING when the connection has been quiet for a while, and after a lost
connection reconnects with backoff and subscribes every channel again;
each channel's confirmation then marks its subscriptions to re-read the
log, so a message published while disconnected is not lost. With Sentinel
the address is the primary's as the Sentinels give it at each connect, and a
`+switch-master` drops the connection at once (shared/redisconn.py says why
waiting for the old primary to close it is not enough).

One module past 400 lines on purpose: the wire (`_Wire`), the buffers
(`Subscription`) and the supervisor (`Hub`) are one connection's state,
each calling into the others, and `ShardedHub` is one `Hub` per Cluster
shard; apart, each would reach into the others' internals.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.credentials import UsernamePasswordCredentialProvider

from tokenfan.shared import defaults as d
from tokenfan.shared.errors import Unavailable
from tokenfan.shared.redisconn import PrimaryWatch

log = logging.getLogger(__name__)

# The defaults (and their reasons) are in shared/defaults.py; bound here, where tests may tune them.
SUBSCRIBE_TIMEOUT_S = d.HUB_SUBSCRIBE_TIMEOUT_S
RECONNECT_BACKOFF_S = d.HUB_RECONNECT_BACKOFF_S
IDLE_PING_S = d.HUB_IDLE_PING_S
PING_TIMEOUT_S = d.HUB_PING_TIMEOUT_S
CONNECT_TIMEOUT_S = d.HUB_CONNECT_TIMEOUT_S

MESSAGE, SMESSAGE = b"message", b"smessage"
SUBSCRIBE_KINDS = (b"subscribe", b"ssubscribe")


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def pack(*args: str | bytes) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class Subscription:
    """One viewer's buffer. Waiting is a bare future plus a timer handle: per
    event this is the hottest code in the API, and `asyncio.wait_for` costs a
    task per wait (profiled: 7 % of the API at 30,000 events/s)."""

    __slots__ = ("buf", "channel", "gap", "key", "limit", "waiter")

    def __init__(self, channel: str, limit: int) -> None:
        self.channel = channel
        self.key = channel.encode()
        self.limit = limit
        self.buf: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.gap = False

    def push(self, raw: bytes) -> None:
        if len(self.buf) >= self.limit:
            self.buf.clear()
            self.gap = True
        else:
            self.buf.append(raw)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None:
            _release(self.waiter)

    def mark_gap(self) -> None:
        self.gap = True
        self.wake()

    async def get(self, timeout: float) -> tuple[list[bytes], bool] | None:  # noqa: ASYNC109 - a wait, not a deadline
        """What arrived (and whether something may be missing), or None after `timeout` or a bare wake-up."""
        if not self.buf and not self.gap:
            loop = asyncio.get_running_loop()
            waiter = self.waiter = loop.create_future()
            timer = loop.call_later(timeout, _release, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
            if not self.buf and not self.gap:
                return None
        items = list(self.buf)
        self.buf.clear()
        gap, self.gap = self.gap, False
        return items, gap


class _Wire(asyncio.Protocol):
    """The pub/sub socket: hiredis parses, pushes go straight to the hub, other replies (AUTH) to waiters.

    Once subscribed, everything Redis sends is an array (a push); before that, only AUTH is
    sent, and its reply is not one."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.replies: deque[asyncio.Future[Any]] = deque()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.heard = False  # something arrived since the supervisor last looked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        self.heard = True
        push = self.hub._push
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                log.error("Hub: unreadable reply from Redis (%s); reconnecting", exc)
                self.abort()
                return
            if reply is False:
                return
            if type(reply) is list:
                push(reply)
            elif self.replies:
                fut = self.replies.popleft()
                if not fut.done():
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for fut in self.replies:
            if not fut.done():
                fut.set_exception(redis.ConnectionError("the pub/sub connection closed"))
        self.replies.clear()
        if not self.lost.done():
            self.lost.set_result(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def call(self, *args: str | bytes) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies.append(fut)
        self.write(pack(*args))
        reply = await fut
        if isinstance(reply, hiredis.ReplyError):
            raise redis.ResponseError(str(reply))
        return reply

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Hub:
    def subscriptions(self) -> list[Subscription]:
        return [s for subs in self.subs.values() for s in subs]

    def __init__(self, client: aredis.Redis, *, sharded: bool = False, buffer: int = d.SUBSCRIBER_BUFFER,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self.client = client
        self.sharded = sharded
        self.buffer = buffer
        self.on_reconnect = on_reconnect
        self.subs: dict[bytes, set[Subscription]] = {}
        self.confirmed: dict[bytes, asyncio.Future[None]] = {}
        self.wire: _Wire | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sub_cmd = "SSUBSCRIBE" if sharded else "SUBSCRIBE"
        self._unsub_cmd = "SUNSUBSCRIBE" if sharded else "UNSUBSCRIBE"
        self._watching: PrimaryWatch | None = None
        self._wake = asyncio.Event()
        self._on_switch: Callable[[], None] | None = None

    async def start(self) -> None:
        """Connect before the first request: returns after the first attempt (or CONNECT_TIMEOUT_S);
        a failure is retried in the background."""
        watch = getattr(self.client.connection_pool, "connection_kwargs", {}).get("primary_watch")
        if watch is not None:  # Sentinel: a failover drops the connection at once (shared/redisconn.py)
            loop = asyncio.get_running_loop()

            def on_switch() -> None:  # called in the watch's thread
                loop.call_soon_threadsafe(self._switched)

            self._on_switch = on_switch
            watch.on_switch(on_switch)
            self._watching = watch
        self._task = asyncio.create_task(self._supervise(), name="tokenfan-hub")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), CONNECT_TIMEOUT_S)
        except TimeoutError:
            log.warning("Hub: no answer from Redis at start; still trying in the background")

    async def close(self) -> None:
        if self._watching is not None and self._on_switch is not None:
            self._watching.forget(self._on_switch)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.wire is not None:
            self.wire.abort()
            self.wire = None

    async def subscribe(self, channel: str) -> Subscription:
        sub = Subscription(channel, self.buffer)
        subs = self.subs.setdefault(sub.key, set())
        subs.add(sub)
        fut = self.confirmed.get(sub.key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self.confirmed[sub.key] = fut
            if self.wire is not None:  # else the supervisor subscribes it once connected
                self.wire.write(pack(self._sub_cmd, sub.key))
        try:
            await asyncio.wait_for(asyncio.shield(fut), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            self._drop(sub)
            raise Unavailable("Redis did not confirm the subscription in time", code="redis_unavailable") from None
        except BaseException:
            self._drop(sub)
            raise
        return sub

    def _drop(self, sub: Subscription) -> bool:
        """Forget a subscription; True when its channel has no subscriber left."""
        subs = self.subs.get(sub.key)
        if subs is None:
            return False
        subs.discard(sub)
        if subs:
            return False
        del self.subs[sub.key]
        fut = self.confirmed.pop(sub.key, None)
        if fut is not None and not fut.done():
            fut.cancel()
        return True

    async def unsubscribe(self, sub: Subscription) -> None:
        if self._drop(sub) and self.wire is not None:
            self.wire.write(pack(self._unsub_cmd, sub.key))

    # --- the connection ---------------------------------------------------

    async def _supervise(self) -> None:
        failures = 0
        while True:
            try:
                wire = await self._connect()
            except (OSError, redis.RedisError, TimeoutError) as exc:
                failures += 1
                self._lost(exc)
                if not self._ready.done():  # start() need not wait out a Redis that refused at once
                    self._ready.set_result(None)
                await self._pause(RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S)) - 1])
                continue
            failures = 0
            if not self._ready.done():
                self._ready.set_result(None)
            reason = await self._watch(wire)
            self.wire = None
            failures += 1
            self._lost(reason)
            await self._pause(RECONNECT_BACKOFF_S[0])

    async def _pause(self, seconds: float) -> None:
        """The backoff before a reconnect, cut short when Sentinel names a new primary."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    def _switched(self) -> None:
        """Sentinel announced a new primary: this connection is to the old one, which takes
        publishes no more (or soon will not); reconnecting asks the Sentinels where the new one is."""
        self._wake.set()
        if self.wire is not None:
            log.warning("Hub: the Redis primary changed; reconnecting the pub/sub connection")
            self.wire.abort()

    def _lost(self, exc: BaseException | None) -> None:
        log.warning("Hub: pub/sub connection failed (%s); reconnecting", exc or "closed by Redis")
        if self.on_reconnect:
            self.on_reconnect()

    async def _connect(self) -> _Wire:
        pool = self.client.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)  # only read for its settings: never connected
        loop = asyncio.get_running_loop()
        timeout = conn.socket_connect_timeout or CONNECT_TIMEOUT_S
        wire = _Wire(self)
        try:
            async with asyncio.timeout(timeout):
                await self._open(loop, wire, conn)
                if conn.credential_provider or conn.username or conn.password:
                    provider = conn.credential_provider or UsernamePasswordCredentialProvider(
                        conn.username, conn.password)
                    await wire.call("AUTH", *await provider.get_credentials_async())
                # Every channel a viewer is on, again: their confirmations mark the gap to re-read.
                if self.confirmed:
                    wire.write(pack(self._sub_cmd, *self.confirmed))
        except BaseException:
            wire.abort()
            raise
        self.wire = wire
        return wire

    async def _open(self, loop: asyncio.AbstractEventLoop, wire: _Wire, conn: Any) -> None:
        """The socket, to the address the client's pool would use: with Sentinel, the primary's
        address as the Sentinels give it now (so a reconnect after a failover finds the new one)."""
        if isinstance(conn, UnixDomainSocketConnection):
            await loop.create_unix_connection(lambda: wire, conn.path)
            return
        host, port = conn.host, conn.port
        if isinstance(self.client.connection_pool, SentinelConnectionPool):
            host, port = await self.client.connection_pool.get_master_address()
        ssl = conn.ssl_context.get() if isinstance(conn, SSLConnection) else None
        await loop.create_connection(lambda: wire, host, port, ssl=ssl)

    async def _watch(self, wire: _Wire) -> Exception | None:
        """Until the connection is lost; a quiet connection is PINGed and dropped if it stays quiet."""
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        pinged = False
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(wire.lost), IDLE_PING_S if not pinged else PING_TIMEOUT_S)
            except TimeoutError:
                pass
            if wire.heard:
                wire.heard = False
                quiet_since = loop.time()
                pinged = False
            elif pinged:
                log.warning("Hub: no answer from Redis to a PING in %.0f s; reconnecting", PING_TIMEOUT_S)
                wire.abort()
            elif loop.time() - quiet_since >= IDLE_PING_S:
                wire.write(pack("PING"))
                pinged = True

    def _push(self, msg: list[Any]) -> None:
        """A message, a (re)subscribe confirmation, or what needs nothing (unsubscribe, pong)."""
        kind = msg[0] if msg else None
        if kind == MESSAGE or kind == SMESSAGE:
            for sub in self.subs.get(msg[1], ()):
                sub.push(msg[2])
        elif kind in SUBSCRIBE_KINDS:
            fut = self.confirmed.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(None)
            elif fut is not None:
                for sub in self.subs.get(msg[1], ()):
                    sub.mark_gap()


class ShardedHub:
    """Redis Cluster: one `Hub` (one sharded pub/sub connection) per primary.

    A stream's channel hashes (by its `{ID}` tag) to one slot; SSUBSCRIBE must
    go to the primary that owns it. Each primary gets its own connection and
    reader task, so a slow shard never delays another.
    """

    def __init__(self, cluster: AsyncRedisCluster, url: str, *, buffer: int = d.SUBSCRIBER_BUFFER,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self.cluster = cluster
        self.conn_kwargs = parse_url(url)
        self.buffer = buffer
        self.on_reconnect = on_reconnect
        self.hubs: dict[str, Hub] = {}
        self.owner: dict[Subscription, Hub] = {}
        self._starting: dict[str, asyncio.Future[Hub]] = {}

    async def start(self) -> None:
        await self.cluster.initialize()

    async def close(self) -> None:
        starting = list(self._starting.values())
        for fut in starting:
            fut.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        for hub in self.hubs.values():
            await hub.close()
            await hub.client.aclose()
        self.hubs.clear()

    def subscriptions(self) -> list[Subscription]:
        return [s for hub in self.hubs.values() for s in hub.subscriptions()]

    async def _hub_for(self, channel: str) -> Hub:
        node = self.cluster.get_node_from_key(channel)
        hub = self.hubs.get(node.name)
        if hub is not None:
            return hub
        # Starting a hub awaits its first connect, so the first subscribes to a new primary may
        # overlap: they all wait for one start. (Each starting its own left all but the last
        # hub running unreachable: its connection and reader task leaked, never closed.)
        starting = self._starting.get(node.name)
        if starting is None:
            starting = asyncio.ensure_future(self._start_hub(node.name, node.host, node.port))
            self._starting[node.name] = starting
        # Shielded: one caller giving up (its client left) must not cancel the others' start.
        return await asyncio.shield(starting)

    async def _start_hub(self, name: str, host: str, port: int) -> Hub:
        client = aredis.Redis(**{**self.conn_kwargs, "host": host, "port": port})
        hub = Hub(client, sharded=True, buffer=self.buffer, on_reconnect=self.on_reconnect)
        try:
            await hub.start()
            self.hubs[name] = hub
            return hub
        except BaseException:
            await hub.close()
            await client.aclose()
            raise
        finally:
            self._starting.pop(name, None)

    async def subscribe(self, channel: str) -> Subscription:
        hub = await self._hub_for(channel)
        sub = await hub.subscribe(channel)
        self.owner[sub] = hub
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        hub = self.owner.pop(sub, None)
        if hub is not None:
            await hub.unsubscribe(sub)
