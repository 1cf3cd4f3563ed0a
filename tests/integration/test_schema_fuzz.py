"""Schemathesis over the API's own OpenAPI schema: zero 5xx, zero schema violations."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.procs import Cluster

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 40


def test_no_5xx_and_no_schema_violation_over_every_operation(cluster: Cluster) -> None:
    api = cluster.api(TOKENFAN_FAKE_TOKENS="4", TOKENFAN_MAX_TOKENS_CAP="64")
    cluster.worker(TOKENFAN_FAKE_RATE="0", TOKENFAN_FAKE_TOKENS="4")
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "POST /v1/streams", "GET /v1/streams/{stream_id}",
        "DELETE /v1/streams/{stream_id}", "GET /v1/models", "GET /v1/models/{model_id}", "GET /readyz", "GET /metrics",
        "POST /v1/responses", "GET /v1/responses/{response_id}", "POST /v1/responses/{response_id}/cancel",
        "DELETE /v1/responses/{response_id}", "POST /v1/completions",
    }
    seen: set[tuple[str, str, int]] = set()
    calls = sum(_fuzz(op, api.url, seen) for op in operations)
    assert calls >= len(operations) * 5
    # the fuzzing reached both sides of the main routes: accepted and refused
    assert ("POST", "/v1/streams", 201) in seen and ("POST", "/v1/streams", 400) in seen, sorted(seen)
    assert ("POST", "/v1/chat/completions", 200) in seen and ("POST", "/v1/chat/completions", 400) in seen
    assert ("POST", "/v1/responses", 200) in seen and ("POST", "/v1/responses", 400) in seen
    assert ("POST", "/v1/completions", 200) in seen and ("POST", "/v1/completions", 400) in seen


def _fuzz(op: schemathesis.APIOperation, base_url: str, seen: set[tuple[str, str, int]]) -> int:
    """One operation's fuzzing run (a function of its own, so `op` is bound per run); returns the calls made."""
    calls: list[int] = []

    @given(case=op.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        calls.append(1)
        resp = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=20)
        seen.add((op.method.upper(), op.path, resp.status_code))

    run()
    return len(calls)
