"""Enqueueing jobs: RQ, JSON serializer, one queue per model."""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from tokenfan.shared import keys
from tokenfan.shared.defaults import JOB_FAILURE_TTL_S, JOB_RESULT_TTL_S
from tokenfan.shared.schema import JobPayload

# The worker's entry for every job; named by string so the API never imports it.
JOB_FUNC = "tokenfan.worker.runner.run_job"


def job_id(payload: JobPayload) -> str:
    return stream_job_id(payload.stream_id, payload.attempt)


def stream_job_id(stream_id: str, attempt: int) -> str:
    """The RQ job id of one attempt at a stream."""
    return f"{stream_id}_{attempt}"


def queue(redis: Redis, model: str) -> Queue:
    return Queue(keys.queue_name(model), connection=redis, serializer=JSONSerializer)


def enqueue(redis: Redis, payload: JobPayload, *, timeout_s: int, at_front: bool = False) -> str:
    q = queue(redis, payload.model)
    job = q.enqueue_call(
        func=JOB_FUNC,
        args=(payload.dump(),),
        job_id=job_id(payload),
        timeout=timeout_s,
        result_ttl=JOB_RESULT_TTL_S,
        failure_ttl=JOB_FAILURE_TTL_S,
        at_front=at_front,
    )
    return str(job.id)
