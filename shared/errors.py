"""tokenfan's exceptions.

    TokenfanError                  base; `code` is stable and machine-readable
    ├── InvalidRequest (400)       bad input; `param` names the field
    │   └── ContextLengthExceeded  the prompt does not fit the model's context
    ├── NotFound (404)             unknown stream, model or route (or another key's stream)
    ├── MethodNotAllowed (405)     a known route called with the wrong method
    ├── Unauthorized (401)         no API key, or an unknown one
    ├── Forbidden (403)            a revoked key, or not an admin key
    ├── RateLimited (429)          over a key's limits (with retry_after)
    ├── Unavailable (503)          Redis down, no worker, shutting down
    │   ├── Overloaded             the model's queue is full (with retry_after)
    │   └── WorkerLost             the stream's worker stopped and none took it over
    ├── Timeout (504)              the answer took longer than the request timeout
    ├── EngineError (502)          the model failed while generating
    ├── InvalidJob (500)           a job payload that does not validate
    └── ConfigError                a setting that cannot work; `param` names it

Raised inside; mapped to HTTP status and OpenAI-shaped JSON only at the
API's edge, and to `error` events only in the worker. The HTTP status of
an error is its class's and nothing else's: an `error` event that ends a
non-streaming request becomes the class its `code` names (`from_code`).
The body cap's 413 (`payload_too_large`) has no class: api/middleware.py
writes it before any route runs.
"""

from __future__ import annotations


class TokenfanError(Exception):
    status = 500
    code = "internal_error"
    type = "server_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds; sent as Retry-After when set
        if code is not None:
            self.code = code


class InvalidRequest(TokenfanError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class NotFound(TokenfanError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


class Unavailable(TokenfanError):
    status = 503
    code = "unavailable"
    type = "server_error"
    retryable = True


class EngineError(TokenfanError):
    status = 502
    code = "engine_error"
    retryable = True


class InvalidJob(TokenfanError):
    """500, not 400: the API validated the request before enqueueing it, so a job the
    worker refuses is our fault (an API and a worker that disagree), not the caller's."""

    code = "invalid_job"


class MethodNotAllowed(TokenfanError):
    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"


class Timeout(TokenfanError):
    status = 504
    code = "timeout"
    retryable = True


class WorkerLost(Unavailable):
    code = "worker_lost"


class Unauthorized(TokenfanError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class Forbidden(TokenfanError):
    status = 403
    code = "forbidden"
    type = "permission_error"


class RateLimited(TokenfanError):
    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"
    retryable = True


class Overloaded(Unavailable):
    code = "queue_full"


class ConfigError(TokenfanError):
    """A setting whose value cannot work: the command prints one line and exits 2."""

    code = "config_error"


def _by_code(cls: type[TokenfanError]) -> dict[str, type[TokenfanError]]:
    found = {cls.code: cls}
    for sub in cls.__subclasses__():
        found.update(_by_code(sub))
    return found


def from_code(code: str, message: str) -> TokenfanError:
    """The error an `error` event's `code` stands for; an engine error when no class has that code."""
    cls = _by_code(TokenfanError).get(code, EngineError)
    return cls(message, code=code)
