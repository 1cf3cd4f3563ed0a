"""Schemathesis over the API's own OpenAPI schema: zero 5xx, zero schema violations.

Each main route also runs two explicit cases, one it accepts and one it refuses, first in its
fuzzing run and under the same checks, each with the status it must get: that both sides are
reached is then certain, not up to the draw. Drawn at random, a body the schema allows is mostly
one the route refuses on a check the schema cannot say (a prompt of spaces only, max_tokens past
TOKENFAN_MAX_TOKENS_CAP, best_of other than n, an input that is required unless
previous_response_id is given): POST /v1/completions got 1 to 12 200s in 40 draws over 60 seeded
runs (a 200 about one draw in eight), so now and then a run drew none and the test failed.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from hypothesis import HealthCheck, example, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.procs import Cluster

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 40
_CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
# (method, path) -> explicit cases: (a body, the status it must get)
EXPLICIT: dict[tuple[str, str], list[tuple[dict[str, Any], int]]] = {
    ("POST", "/v1/streams"): [(_CHAT, 201), ({**_CHAT, "messages": []}, 400)],
    ("POST", "/v1/chat/completions"): [(_CHAT, 200), ({**_CHAT, "max_tokens": 0}, 400)],
    ("POST", "/v1/responses"): [({"model": "smollm2", "input": "hello", "max_output_tokens": 4}, 200),
                                ({"model": "smollm2", "max_output_tokens": 4}, 400)],
    ("POST", "/v1/completions"): [({"model": "smollm2", "prompt": "hello", "max_tokens": 4}, 200),
                                  ({"model": "smollm2", "prompt": "   ", "max_tokens": 4}, 400)],
}


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
    """One operation's fuzzing run (a function of its own, so `op` is bound per run), its explicit cases
    first; returns the calls made."""
    calls: list[int] = []
    explicit = EXPLICIT.get((op.method.upper(), op.path), [])
    expected = {_key(body): status for body, status in explicit}

    def run(case: schemathesis.Case) -> None:
        calls.append(1)
        resp = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=20)
        seen.add((op.method.upper(), op.path, resp.status_code))
        want = expected.get(_key(case.body))
        assert want is None or resp.status_code == want, (case.body, resp.status_code, resp.text[:300])

    for body, _ in explicit:
        run = example(case=op.Case(body=body, media_type="application/json"))(run)
    settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
        given(case=op.as_strategy())(run))()
    assert len(calls) > len(explicit)  # the explicit cases ran, and drawn ones after them
    return len(calls)


def _key(body: Any) -> str:
    return json.dumps(body, sort_keys=True, default=str)
