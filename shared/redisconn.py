"""Redis clients, made once at an entry point.

Clients keep bytes (`decode_responses=False`): RQ requires it, and events
are bytes end to end. Every client retries a failed command with backoff,
so a Redis restart or a Sentinel failover is a pause, not a crash.

`REDIS_URL` names one Redis (`redis://`, `rediss://`, `unix://`, as
redis-py reads them) or a primary that Redis Sentinel monitors:

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?option=value...]
    rediss+sentinel://...   the same over TLS, to the Redis servers and the Sentinels alike

the form of the redis-sentinel-url package, kombu and others: the comma-separated
hosts are Sentinels (port 26379 when none is given), `service` is the name
they monitor (`sentinel monitor <service> ...`), the user and password are
the Redis servers' own. The Sentinels' own credentials, when they have any,
are the options `sentinel_username` and `sentinel_password`; every other
option is redis-py's (`socket_timeout`, `ssl_ca_certs`, ...) for the
servers.

Failing over, as redis-py alone would do it, leaves a gap: every connection
asks the Sentinels for the primary when it connects, but one that stays open
goes on writing to the old primary until Sentinel demotes it, 8 to 10 s after
the switch (measured with Redis 7.0: Sentinel waits out 4 hello periods before
it reconfigures the old primary), and all of that is lost when the old
primary resyncs from the new one. So, as Jedis' and Lettuce's Sentinel
clients do, each process listens to every Sentinel's `+switch-master`
(`PrimaryWatch`, one per Sentinel set, threads of its own): on a switch, every
connection of ours to that service is dropped before its next command (it
raises ConnectionError, which the clients retry, reconnecting), and the hub's
pub/sub connection is dropped at once. A connection that reconnects after a
switch takes a Sentinel's answer only if it names the primary announced, else
asks them all and believes the highest config epoch (the newest failover),
so a Sentinel that has not heard of the switch yet cannot send it back to the
old primary. What is still lost and when is in docs/faults.md.

One module past 400 lines on purpose: every client the processes make and the
Sentinel handling they share, including the redis-py internals it overrides (this
module is redis-py's adapter; tests/unit/test_library_internals.py checks them).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel as sentinel
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.retry import Retry

from tokenfan.shared.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)

# A restart of Redis takes a second or two; ride it out before failing.
RETRIES = 6
BACKOFF_CAP_S = 2.0
BACKOFF_BASE_S = 0.05
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0
# Connections an API process keeps to Redis (not per client: the pub/sub is one more).
POOL_SIZE = 128
# A request waits this long for a free pooled connection before failing.
POOL_WAIT_S = 10.0

# Sentinel: the port Sentinel listens on unless told otherwise (Redis' own default).
SENTINEL_PORT = 26379
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
# A Sentinel that does not answer is skipped for the next one in the URL: one retry
# only (a pooled connection the Sentinel closed), never the servers' long backoff.
SENTINEL_RETRIES = 1
# The options a Sentinel URL takes for the Sentinels themselves; the rest go to the servers.
SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
REDIS_URL_SETTING = "TOKENFAN_REDIS_URL (or REDIS_URL)"
URL_FORMS = "redis://host:port/db, rediss://..., unix:///path or redis+sentinel://host:26379[,host:26379...]/service[/db]"
# The channel on which every Sentinel announces a failover: "<service> <old ip> <old port> <new ip> <new port>".
SWITCH_CHANNEL = "+switch-master"
# A listener PINGs its Sentinel when it heard nothing for this long, and reconnects when the
# PING is not answered within the same time again (a Sentinel host that vanished sends no RST).
LISTEN_PING_S = 5.0
# After a lost Sentinel connection, a listener tries again this much later.
RELISTEN_S = 1.0
# Each Sentinel announces a switch when it learns of it (hello messages, every 2 s): the same new
# primary named again within this is the same switch. Past it, a new one (after one we missed).
SWITCH_SAME_S = 10.0


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a `redis+sentinel://` URL says: where the Sentinels are, the service they
    monitor, and the connection options for the Redis servers and for the Sentinels."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    server: dict[str, Any] = field(default_factory=dict)
    sentinel: dict[str, Any] = field(default_factory=dict)


def is_sentinel(url: str | None) -> bool:
    return bool(url) and str(url).partition("://")[0].lower() in SENTINEL_SCHEMES


def require_url(url: str | None, setting: str = REDIS_URL_SETTING) -> str:
    """The URL, checked: no URL is Unavailable; one that cannot work is a one-line ConfigError."""
    if not url:
        raise Unavailable("no Redis URL: set REDIS_URL (or TOKENFAN_REDIS_URL)", code="redis_not_configured")
    problem = url_problem(url)
    if problem:
        raise ConfigError(f"{setting}: {problem} (got {redacted(url)})", param="redis_url")
    return url


def url_problem(url: str) -> str:
    """Why a Redis URL cannot work ("" when it can), in words that never repeat the URL (its password)."""
    try:
        if is_sentinel(url):
            sentinel_target(url)
        else:
            parse_url(url)  # redis-py's reasons: the scheme, a port that is not a number, an option
    except ValueError as exc:
        return f"{_scrub(str(exc), url).rstrip('.')}; expected {URL_FORMS}"
    return ""


def _scrub(message: str, url: str) -> str:
    """A parser's message without any piece of the URL's password: one with a '/' or '#' not
    percent-encoded is cut at it, and redis-py names the piece ("... integer value as 'pa'")."""
    creds = url.partition("://")[2].partition("?")[0].rpartition("@")[0]
    password = creds.partition(":")[2] if ":" in creds else creds
    for piece in re.split(r"[/:?#@]", password):
        if len(piece) >= 3 or (piece and f"'{piece}'" in message):
            message = message.replace(piece, "***")
    return message


def sentinel_target(url: str) -> SentinelTarget:
    """Parse a `redis+sentinel://` URL (the module docstring gives its form); ValueError says what is wrong."""
    scheme, _, rest = url.partition("://")
    tls = SENTINEL_SCHEMES.get(scheme.lower())
    if tls is None:
        raise ValueError("not a Sentinel URL")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    creds, _, hosts = netloc.rpartition("@")
    sentinels = tuple(_host_port(h) for h in hosts.split(","))
    parts = path.strip("/").split("/") if path.strip("/") else []
    if not parts or len(parts) > 2:
        raise ValueError("a Sentinel URL needs the monitored service's name as its path: /service or /service/db")
    service, db = unquote(parts[0]), parts[1] if len(parts) > 1 else ""
    if db and not db.isdigit():
        raise ValueError(f"the database must be a number, not {db!r}")
    options = parse_qsl(query, keep_blank_values=False)
    own = {k: v for k, v in options if k in SENTINEL_OPTIONS}
    plain = f"{'rediss' if tls else 'redis'}://{creds + '@' if creds else ''}sentinel-target/{db}"
    server = parse_url(f"{plain}?{urlencode([(k, v) for k, v in options if k not in SENTINEL_OPTIONS])}")
    for key in ("host", "port", "connection_class"):  # the Sentinels say where; the pool picks the class
        server.pop(key, None)
    sentinel_options: dict[str, Any] = {k.removeprefix("sentinel_"): v for k, v in own.items()}
    if tls:
        server["ssl"] = True
        sentinel_options.update({"ssl": True, **{k: v for k, v in server.items() if k.startswith("ssl_")}})
    return SentinelTarget(sentinels, service, server, sentinel_options)


def _host_port(item: str) -> tuple[str, int]:
    host, port = item, ""
    if item.startswith("["):  # [IPv6]:port
        host, _, tail = item[1:].partition("]")
        port = tail.removeprefix(":")
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not host:
        raise ValueError("a Sentinel URL lists its Sentinels as host:port, comma-separated, and one has no host")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{port!r} is not a port")
    return unquote(host), int(port) if port else SENTINEL_PORT


def _common() -> dict[str, object]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": 30,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


def _sentinel_kwargs(target: SentinelTarget, retry: Any) -> dict[str, Any]:
    return {"socket_timeout": CONNECT_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S, "retry": retry,
            **target.sentinel}


def sync_client(url: str | None, *, socket_timeout: float | None = SOCKET_TIMEOUT_S,
                cluster: bool = False) -> redis.Redis:
    url = require_url(url)
    if cluster:
        _no_cluster_sentinel(url)
        return RedisCluster.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=CONNECT_TIMEOUT_S,
        )
    retry = Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES)
    if is_sentinel(url):
        target = sentinel_target(url)
        manager = _Sentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, Retry(NoBackoff(),
                                                                                            SENTINEL_RETRIES)))
        manager.watch = primary_watch(target)
        options = {"retry": retry, "socket_timeout": socket_timeout, **_common(), **target.server,
                   "connection_class": _WatchedSSL if target.server.get("ssl") else _Watched,
                   "primary_watch": manager.watch}
        return manager.master_for(target.service, redis_class=redis.Redis, **options)
    return redis.Redis.from_url(url, retry=retry, socket_timeout=socket_timeout, **_common())


def last_tries(*clients: redis.Redis | RedisCluster) -> None:
    """From now on, each client tries a command once: no riding out a Redis restart (RETRIES with
    backoff, about 5 s a command while Redis refuses connections). For a process that is stopping:
    what it still writes (deregistrations, RQ's bookkeeping) expires on its own if lost, and
    retrying it would spend the stop's grace, or outlast it, while Redis is down."""
    for client in clients:
        client.set_retry(Retry(NoBackoff(), 0))


def _no_cluster_sentinel(url: str) -> None:
    if is_sentinel(url):
        raise ConfigError("TOKENFAN_REDIS_CLUSTER: a Sentinel URL names one primary, not a Redis Cluster; "
                          "turn one of them off", param="redis_cluster")


def async_client(url: str | None, *, max_connections: int = POOL_SIZE, cluster: bool = False) -> aredis.Redis:
    from redis.asyncio.retry import Retry as AsyncRetry

    url = require_url(url)
    if cluster:
        _no_cluster_sentinel(url)
        return AsyncRedisCluster.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
            max_connections=max_connections,
        )
    retry = AsyncRetry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES)
    # A blocking pool: a burst of requests waits for a connection instead of
    # failing with MaxConnectionsError (seen in the benchmark at 1,000 streams).
    options = {"retry": retry, "socket_timeout": SOCKET_TIMEOUT_S, "max_connections": max_connections,
               "timeout": POOL_WAIT_S, **_common()}
    if is_sentinel(url):
        target = sentinel_target(url)
        manager = _AsyncSentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(
            target, AsyncRetry(NoBackoff(), SENTINEL_RETRIES)))
        manager.watch = primary_watch(target)
        options.update({**target.server, "primary_watch": manager.watch,
                        "connection_class": _AsyncWatchedSSL if target.server.get("ssl") else _AsyncWatched})
        return manager.master_for(target.service, redis_class=aredis.Redis,
                                  connection_pool_class=BlockingSentinelPool, **options)
    return aredis.Redis(connection_pool=aredis.BlockingConnectionPool.from_url(url, **options))


# --- Sentinel: a failover heard as it happens (the module docstring says why) ---------------


class PrimaryWatch:
    """One Sentinel set's `+switch-master`, heard by a daemon thread per Sentinel for the life of
    the process. `epoch` counts the switches (connections compare it before each command);
    `on_switch` callbacks run in a listener thread on each switch."""

    def __init__(self, target: SentinelTarget) -> None:
        self.target = target
        self.epoch = 0
        self.primary: tuple[str, int] | None = None
        self._heard_at = 0.0
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> PrimaryWatch:
        with self._lock:
            if self._threads:
                return self
            self._threads = [threading.Thread(target=self._listen, args=addr, daemon=True,
                                              name=f"tokenfan-sentinel-{addr[0]}:{addr[1]}")
                             for addr in self.target.sentinels]
        for t in self._threads:
            t.start()
        return self

    def on_switch(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(fn)

    def forget(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if fn in self._callbacks:
                self._callbacks.remove(fn)

    def heard(self, data: bytes | str) -> bool:
        """One `+switch-master` message; True when it names a new primary of our service."""
        parts = (data.decode() if isinstance(data, bytes) else data).split()
        if len(parts) != 5 or parts[0] != self.target.service or not parts[4].isdigit():
            return False
        new = (parts[3], int(parts[4]))
        now = time.monotonic()
        with self._lock:
            if new == self.primary and now - self._heard_at < SWITCH_SAME_S:
                return False
            self.primary, self._heard_at = new, now
            self.epoch += 1
            callbacks = list(self._callbacks)
        log.warning("Sentinel: %s failed over to %s:%d; dropping our connections to the old primary",
                    self.target.service, *new)
        for fn in callbacks:
            try:
                fn()
            except Exception:  # one listener's failure must not keep the others from hearing
                log.exception("Sentinel: a failover callback failed")
        return True

    def _listen(self, host: str, port: int) -> None:
        while True:
            try:
                self._listen_once(host, port)
            except (redis.RedisError, OSError) as exc:
                log.debug("Sentinel %s:%d: listener lost (%s); again in %.0f s", host, port, exc, RELISTEN_S)
            time.sleep(RELISTEN_S)

    def _listen_once(self, host: str, port: int) -> None:
        client = redis.Redis(host=host, port=port, socket_connect_timeout=CONNECT_TIMEOUT_S,
                             socket_timeout=2 * LISTEN_PING_S, retry=Retry(NoBackoff(), 0),
                             **{k: v for k, v in self.target.sentinel.items() if k != "retry"})
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(SWITCH_CHANNEL)
            heard_at, pinged = time.monotonic(), False
            while True:
                msg = pubsub.get_message(timeout=LISTEN_PING_S)
                now = time.monotonic()
                if msg is not None:
                    heard_at, pinged = now, False
                    if msg.get("type") == "message":
                        self.heard(msg["data"])
                elif pinged and now - heard_at >= 2 * LISTEN_PING_S:
                    raise redis.TimeoutError("no answer to a PING")
                elif not pinged and now - heard_at >= LISTEN_PING_S:
                    pubsub.ping()
                    pinged = True
        finally:
            pubsub.close()
            client.close()


# One watch per Sentinel set and service in a process, however many clients use it: a cache,
# like a connection pool's, filled on first use and never changed otherwise.
_WATCHES: dict[tuple[tuple[tuple[str, int], ...], str], PrimaryWatch] = {}
_WATCHES_LOCK = threading.Lock()


def primary_watch(target: SentinelTarget) -> PrimaryWatch:
    with _WATCHES_LOCK:
        watch = _WATCHES.setdefault((target.sentinels, target.service), PrimaryWatch(target))
    return watch.start()


def _newest(found: list[tuple[int, dict[str, Any]]], sentinels: list[Any], service: str, errors: list[str],
            error: type[Exception]) -> tuple[str, int]:
    """Of the Sentinels' answers, the one of the latest failover (highest config epoch); its
    Sentinel is asked first next time (as redis-py does with the first that answers)."""
    if not found:
        raise error(f"No master found for {service!r}" + (f": {', '.join(errors)}" if errors else ""))
    i, best = max(found, key=lambda item: int(item[1].get("config-epoch", 0)))
    sentinels[0], sentinels[i] = sentinels[i], sentinels[0]
    return str(best["ip"]), int(best["port"])


def _enough(state: dict[str, Any], heard: tuple[str, int] | None) -> bool:
    """Whether an answer can be taken without asking the other Sentinels: nothing was heard of a
    failover (redis-py's rule: the first answer), or it names the primary the last switch named.
    Otherwise every Sentinel is asked, so one that missed the switch cannot send us back."""
    return heard is None or (str(state["ip"]), int(state["port"])) == heard


class _Sentinel(sentinel.Sentinel):  # type: ignore[misc]
    """redis-py's Sentinel, made to believe the newest answer (`_enough`, `_newest`)."""

    watch: PrimaryWatch | None = None

    def discover_master(self, service_name: str) -> tuple[str, int]:
        heard = self.watch.primary if self.watch else None
        found: list[tuple[int, dict[str, Any]]] = []
        errors: list[str] = []
        for i, s in enumerate(self.sentinels):
            try:
                state = s.sentinel_masters().get(service_name)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                errors.append(str(exc))
                continue
            if state and self.check_master_state(state, service_name):
                found.append((i, state))
                if _enough(state, heard):
                    break
        return _newest(found, self.sentinels, service_name, errors, sentinel.MasterNotFoundError)


class _AsyncSentinel(asentinel.Sentinel):  # type: ignore[misc]
    """The same for redis.asyncio."""

    watch: PrimaryWatch | None = None

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        heard = self.watch.primary if self.watch else None
        found: list[tuple[int, dict[str, Any]]] = []
        errors: list[str] = []
        for i, s in enumerate(self.sentinels):
            try:
                state = (await s.sentinel_masters()).get(service_name)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                errors.append(str(exc))
                continue
            if state and self.check_master_state(state, service_name):
                found.append((i, state))
                if _enough(state, heard):
                    break
        return _newest(found, self.sentinels, service_name, errors, asentinel.MasterNotFoundError)


_SWITCHED = "the primary changed (Sentinel +switch-master); reconnecting"


class _Watched(sentinel.SentinelManagedConnection):  # type: ignore[misc]
    """A connection to the primary that, after a switch it has not seen, closes before its next
    command and raises ConnectionError (the client's retry reconnects to the new primary; a
    WATCH in flight fails as redis-py fails it on any lost connection, never silently). Every
    reconnect asks the Sentinels: redis-py's retry reconnects a connection to the address it had,
    so a command retried after the primary moved would go back to the old one."""

    def __init__(self, **kwargs: Any) -> None:
        self.watch: PrimaryWatch = kwargs.pop("primary_watch")
        self.seen = self.watch.epoch
        super().__init__(**kwargs)

    def _connect_retry(self) -> None:  # asks the Sentinels, then connects: what it finds is this epoch's
        if self._sock is None:
            self.seen = self.watch.epoch
        super()._connect_retry()

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._sock is not None and self.seen != self.watch.epoch:
            self.disconnect()
            raise redis.ConnectionError(_SWITCHED)
        if self._sock is None:  # through the Sentinels: redis-py's own reconnect reuses the old address
            self.connect()
        super().send_packed_command(command, check_health)


class _WatchedSSL(_Watched, SSLConnection):  # type: ignore[misc]
    pass


class _AsyncWatched(asentinel.SentinelManagedConnection):  # type: ignore[misc]
    """`_Watched` for redis.asyncio."""

    def __init__(self, **kwargs: Any) -> None:
        self.watch: PrimaryWatch = kwargs.pop("primary_watch")
        self.seen = self.watch.epoch
        super().__init__(**kwargs)

    async def _connect_retry(self) -> None:
        if not self.is_connected:
            self.seen = self.watch.epoch
        await super()._connect_retry()

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self.is_connected and self.seen != self.watch.epoch:
            await self.disconnect()
            raise redis.ConnectionError(_SWITCHED)
        if not self.is_connected:
            await self.connect()
        await super().send_packed_command(command, check_health)


class _AsyncWatchedSSL(_AsyncWatched, AsyncSSLConnection):  # type: ignore[misc]
    pass


class BlockingSentinelPool(asentinel.SentinelConnectionPool, aredis.BlockingConnectionPool):  # type: ignore[misc]
    """Sentinel's pool that waits for a free connection like the plain client's (see `async_client`)."""


def redacted(url: str | None) -> str:
    """The URL without its password, for logs (and without the Sentinels' password option)."""
    if not url:
        return ""
    if "sentinel_password=" in url:
        head, _, query = url.partition("?")
        url = head + "?" + "&".join("sentinel_password=***" if kv.startswith("sentinel_password=") else kv
                                    for kv in query.split("&"))
    if "@" not in url.partition("?")[0]:
        return url
    scheme, rest = url.split("://", 1)
    netloc_and_path, q, query = rest.partition("?")
    creds, host = netloc_and_path.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}{q}{query}" if user else f"{scheme}://***@{host}{q}{query}"
