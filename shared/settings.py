"""Settings, read once at an entry point and passed in.

Every setting is a `TOKENFAN_*` environment variable (or a flag of the
`tokenfan` command, which sets the same field). `REDIS_URL` is accepted as
well as `TOKENFAN_REDIS_URL` because every Redis host sets it. Nothing
below the entry points reads the environment.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tokenfan.shared import defaults as d


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENFAN_", extra="ignore", populate_by_name=True)

    # Redis
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("TOKENFAN_REDIS_URL", "REDIS_URL"))
    redis_cluster: bool = False
    # RQ cannot run on Redis Cluster (multi-key transactions): with a cluster,
    # the queues live on this plain Redis; without one it defaults to redis_url.
    queue_redis_url: str | None = None

    # API
    host: str = d.API_HOST
    port: int = d.API_PORT
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    disclosure: str = d.DISCLOSURE
    heartbeat_s: float = d.HEARTBEAT_S
    queued_interval_s: float = d.QUEUED_INTERVAL_S
    request_timeout_s: float = d.REQUEST_TIMEOUT_S
    shutdown_grace_s: float = d.SHUTDOWN_GRACE_S
    subscriber_buffer: int = d.SUBSCRIBER_BUFFER

    # Access and admission
    api_keys_file: str | None = None
    api_keys: str | None = None
    metrics_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_queue: int = d.MAX_QUEUE

    # Caps on requests
    max_tokens_cap: int = d.MAX_TOKENS_CAP
    default_max_tokens: int = d.DEFAULT_MAX_TOKENS
    max_messages: int = d.MAX_MESSAGES
    max_prompt_chars: int = d.MAX_PROMPT_CHARS
    max_stop: int = d.MAX_STOP
    max_body_bytes: int = d.MAX_BODY_BYTES

    # Streams
    log_ttl_s: int = d.LOG_TTL_S
    log_active_ttl_s: int = d.LOG_ACTIVE_TTL_S
    log_maxlen: int = d.LOG_MAXLEN
    lease_ttl_s: float = d.LEASE_TTL_S
    keeper_interval_s: float = d.KEEPER_INTERVAL_S
    abandon_grace_s: float = d.ABANDON_GRACE_S
    failover: Literal["continue", "error"] = "continue"
    failover_wait_s: float = d.FAILOVER_WAIT_S
    max_attempts: int = d.MAX_ATTEMPTS
    job_timeout_s: int = d.JOB_TIMEOUT_S

    # Worker
    model: str = d.MODEL_NAME
    model_path: str | None = None
    engine: Literal["llama", "fake"] = "llama"
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1)
    n_gpu_layers: int = 0
    n_ctx: int = d.N_CTX
    worker_name: str | None = None
    metrics_port: int = d.WORKER_METRICS_PORT
    fake_rate: float = d.FAKE_RATE
    fake_tokens: int = d.FAKE_TOKENS
    fake_fail_after: int | None = None
    fake_prefill_s: float = 0.0

    @field_validator("models", "metrics_allow", mode="before")
    @classmethod
    def _split_models(cls, v: object) -> object:
        if isinstance(v, str):
            return [m.strip() for m in v.split(",") if m.strip()]
        return v

    def queue_url(self) -> str | None:
        return self.queue_redis_url or self.redis_url

    def served_models(self) -> list[str]:
        return self.models or [self.model]
