"""A streamed read of a response: the Responses API's surface on the relay (api/relay.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis

from tokenfan.api.responses.record import View
from tokenfan.api.responses.render import Renderer, frame, local_error
from tokenfan.api.streams import Follower
from tokenfan.shared.errors import TokenfanError
from tokenfan.shared.events import Event


class _Written:
    """One streamed read: the stream rendered from its start, what is above `after` written."""

    def __init__(self, view: View, after: int) -> None:
        self.renderer = Renderer(view)
        self.after = after
        self.sent = after  # the last sequence_number written (or the client's own)
        self.top = -1  # the last rendered

    def frames(self, batch: list[Event]) -> bytes:
        out = []
        for e in batch:
            for payload in self.renderer.render(e):
                self.top = payload["sequence_number"]
                if self.top > self.sent:
                    out.append(frame(payload))
                    self.sent = self.top
        return b"".join(out)


async def replay(view: View, logged: list[Event], after: int) -> AsyncIterator[bytes]:
    """The streamed read of a response kept past its log: its events rendered, what is above `after`."""
    data = _Written(view, after).frames(logged)
    if data:
        yield data


class ResponsesSurface:
    """The Responses API's events on the relay (api/relay.py): the stream rendered from its start, what
    is above `after` written; its own ends are `error` events numbered as the last event sent."""

    reconnects = False

    def __init__(self, view: View, after: int) -> None:
        self.view = view
        self.after = after
        self.w = _Written(view, after)

    def fresh(self, follower: Follower) -> bool:
        return self.after < 0

    def write(self, batch: list[Event], follower: Follower) -> bytes:
        data = self.w.frames(batch)
        if follower.finished and self.w.top < self.after:  # it ended before the event the client claims to have
            data += local_error(self.w.top, "invalid_starting_after",
                                f"the response ended at event {self.w.top}, before starting_after {self.after}")
        return data

    async def idle(self, follower: Follower) -> bytes:
        return b""

    def handoff(self, follower: Follower) -> bytes:
        return local_error(self.w.sent, "server_shutdown", "this API process is shutting down; resume with GET "
                           f"/v1/responses/{self.view.rid}?stream=true&starting_after={self.w.sent}")

    def failed(self, follower: Follower, exc: TokenfanError | redis.RedisError) -> bytes:
        code, message = ((exc.code, exc.message) if isinstance(exc, TokenfanError) else
                         ("redis_unavailable", "Redis is unreachable; resume with starting_after"))
        return local_error(self.w.sent, code, message)
