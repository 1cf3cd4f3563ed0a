"""Every Redis key and channel name tokenfan uses.

A stream's id is written inside braces (`tf:stream:{ID}:log`): that is a
Redis Cluster hash tag, so all of one stream's keys and its channel hash to
one slot and a Lua script may touch them together.
"""

from __future__ import annotations

PREFIX = "tf"
LEASES = f"{PREFIX}:leases"
# Held (SET NX PX) by the one process that rebuilds the lease index from the stream records this interval.
SWEEP = f"{PREFIX}:sweep"
RQ_QUEUE_PREFIX = "rq:queue:"


def stream_tag(stream_id: str) -> str:
    return f"{PREFIX}:stream:{{{stream_id}}}"


def channel(stream_id: str) -> str:
    return stream_tag(stream_id)


def log(stream_id: str) -> str:
    return f"{stream_tag(stream_id)}:log"


def state(stream_id: str) -> str:
    return f"{stream_tag(stream_id)}:state"


def lease(stream_id: str) -> str:
    return f"{stream_tag(stream_id)}:lease"


def cancel(stream_id: str) -> str:
    return f"{stream_tag(stream_id)}:cancel"


def viewers(stream_id: str) -> str:
    return f"{stream_tag(stream_id)}:viewers"


def response(stream_id: str) -> str:
    """The record of a Responses API response (api/responses/record.py): what it was asked with."""
    return f"{stream_tag(stream_id)}:response"


def response_log(stream_id: str) -> str:
    """A stored response's events, copied from the log when it ends: they outlive the log with the record."""
    return f"{stream_tag(stream_id)}:response:log"


def stream_id_of(key: str) -> str:
    """The stream id inside one of its keys (`tf:stream:{ID}:state` -> ID)."""
    return key[key.index("{") + 1:key.rindex("}")]


def stream_keys(stream_id: str) -> list[str]:
    """Every key of one stream (for expiry and clean-up)."""
    return [log(stream_id), state(stream_id), lease(stream_id), cancel(stream_id), viewers(stream_id),
            response(stream_id), response_log(stream_id)]


def queue_name(model: str) -> str:
    """The RQ queue name of a model; RQ stores it under `rq:queue:<name>`."""
    return f"{PREFIX}:q:{model}"


def queue_list(model: str) -> str:
    return RQ_QUEUE_PREFIX + queue_name(model)


def queue_ticket(model: str) -> str:
    return f"{queue_name(model)}:ticket"


def queue_served(model: str) -> str:
    return f"{queue_name(model)}:served"


def workers(model: str) -> str:
    return f"{PREFIX}:workers:{model}"


def worker(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def api_processes() -> str:
    """API processes for Prometheus' service discovery: name -> JSON {host, port, seen}."""
    return f"{PREFIX}:apis"


def errors() -> str:
    """A short capped list of recent stream errors, for the ops page."""
    return f"{PREFIX}:errors"


def ops_history() -> str:
    """List of the ops charts' samples, newest first (one API process takes them for the fleet)."""
    return f"{PREFIX}:ops:history"


def ops_sampler() -> str:
    """Which API process takes the ops samples now (its name, with a TTL of a few intervals)."""
    return f"{PREFIX}:ops:sampler"


def active() -> str:
    """Sorted set of streams not yet finished (id -> created ms), for the ops page."""
    return f"{PREFIX}:active"


def api_keys() -> str:
    """Hash of API key records managed by `tokenfan keys` (sha256 -> JSON)."""
    return f"{PREFIX}:keys"


def tenant_streams(owner: str) -> str:
    """Sorted set of a key's unfinished streams (id -> created ms), for its concurrency limit."""
    return f"{PREFIX}:owner:{owner}:streams"


def rate_window(owner: str, minute: int) -> str:
    return f"{PREFIX}:owner:{owner}:rpm:{minute}"
