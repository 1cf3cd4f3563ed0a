"""Who is calling: API keys in, a `Principal` out.

With no key configured anywhere the API is open (everyone is the anonymous
admin) and says so loudly at startup. Once any key exists (file, variable or
`tokenfan keys add`), every route but `/healthz`, `/readyz` and the static
pages needs a bearer key: 401 without or with an unknown key, 403 with a
revoked one. Keys in Redis are cached per process for `AUTH_CACHE_S`, so a
revocation takes effect within that time on every API replica.

The API's own description (`/docs`, `/redoc`, `/openapi.json`) is FastAPI's,
routed before any dependency of ours runs, so `DocsGate` guards it: once
keys exist it needs one too, unless `public_docs` opens it. It lists routes
and shapes, nothing of anyone's; closed is still what an operator who made
keys expects, and a browser cannot send a bearer key to /docs, so an
operator who wants the page opens it with the setting.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aredis
from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenfan.api.middleware import error_json, send_json
from tokenfan.shared import apikeys, keys
from tokenfan.shared.apikeys import KeyRecord
from tokenfan.shared.defaults import AUTH_CACHE_S, REDIS_RETRY_S
from tokenfan.shared.errors import Forbidden, TokenfanError, Unauthorized
from tokenfan.shared.settings import ApiSettings

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    owner: str
    tenant: str
    admin: bool
    record: KeyRecord | None = None


OPEN = Principal(ANONYMOUS, ANONYMOUS, admin=True)
# FastAPI's own routes describing the API (its default URLs, which create_app keeps).
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class Authenticator:
    def __init__(self, redis: aredis.Redis, settings: ApiSettings) -> None:
        self.redis = redis
        self.static = apikeys.load_static(settings.api_keys_file, settings.api_keys)
        self.allow = [ipaddress.ip_network(n, strict=False) for n in settings.metrics_allow]
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._enabled: tuple[float, bool] = (0.0, False)

    async def enabled(self) -> bool:
        if self.static:
            return True
        at, value = self._enabled
        if time.monotonic() - at > AUTH_CACHE_S:
            value = bool(await self.redis.hlen(keys.api_keys()))
            self._enabled = (time.monotonic(), value)
        return value

    async def _lookup(self, digest: str) -> KeyRecord | None:
        if digest in self.static:
            return self.static[digest]
        hit = self._cache.get(digest)
        if hit and time.monotonic() - hit[0] < AUTH_CACHE_S:
            return hit[1]
        raw = await self.redis.hget(keys.api_keys(), digest)
        rec = KeyRecord.model_validate_json(raw) if raw else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (time.monotonic(), rec)
        return rec

    async def principal(self, request: Request) -> Principal:
        if not await self.enabled():
            return OPEN
        token = _bearer(request)
        if not token:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'", code="missing_api_key")
        rec = await self._lookup(apikeys.hash_key(token))
        if rec is None:
            raise Unauthorized("the API key is not valid", code="invalid_api_key")
        if rec.revoked:
            raise Forbidden("this API key has been revoked", code="api_key_revoked")
        return Principal(rec.owner, rec.tenant, rec.admin, rec)

    async def admin(self, request: Request) -> Principal:
        who = await self.principal(request)
        if not who.admin:
            raise Forbidden("this needs an admin key", code="admin_required")
        return who

    async def metrics_allowed(self, request: Request) -> None:
        """`/metrics`: open without keys; else an allowed network or an admin key."""
        client = request.client.host if request.client else ""
        try:
            ip = ipaddress.ip_address(client)
            if any(ip in net for net in self.allow):
                return
        except ValueError:
            pass
        await self.admin(request)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip()


class DocsGate:
    """`/docs`, `/redoc` and `/openapi.json` ask for a key as every protected route does (unless public)."""

    def __init__(self, app: ASGIApp, public: bool) -> None:
        self.app = app
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.public or scope["type"] != "http" or scope["path"] not in DOCS_PATHS:
            await self.app(scope, receive, send)
            return
        auth: Authenticator = scope["app"].state.edge.auth
        try:
            await auth.principal(Request(scope))
        except TokenfanError as exc:
            await send_json(send, exc.status, error_json(exc.message, exc.code, exc.type))
            return
        except redis.RedisError:
            await send_json(send, 503, error_json("Redis is unreachable; try again shortly", "redis_unavailable",
                                                  "server_error"), retry_after=REDIS_RETRY_S)
            return
        await self.app(scope, receive, send)
