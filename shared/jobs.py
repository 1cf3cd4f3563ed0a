"""Enqueueing jobs: RQ, JSON serializer, one queue per model."""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from tokenfan.shared import keys
from tokenfan.shared.schema import JobPayload

# The worker's entry for every job; named by string so the API never imports it.
JOB_FUNC = "tokenfan.worker.runner.run_job"
# Results live in the stream's log; RQ keeps only a short trace of a job.
RESULT_TTL_S = 60
FAILURE_TTL_S = 3600


def job_id(payload: JobPayload) -> str:
    return f"{payload.stream_id}_{payload.attempt}"


def queue(redis: Redis, model: str) -> Queue:
    return Queue(keys.queue_name(model), connection=redis, serializer=JSONSerializer)


def enqueue(redis: Redis, payload: JobPayload, *, timeout_s: int, at_front: bool = False) -> str:
    q = queue(redis, payload.model)
    job = q.enqueue_call(
        func=JOB_FUNC,
        args=(payload.dump(),),
        job_id=job_id(payload),
        timeout=timeout_s,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        at_front=at_front,
    )
    return str(job.id)
