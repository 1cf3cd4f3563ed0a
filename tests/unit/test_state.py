"""The stream-state record and its enums (`tokenfan.shared.state`), and the
error classes' HTTP statuses (`tokenfan.shared.errors`)."""

from __future__ import annotations

import dataclasses

import pytest

from tokenfan.shared import bus, errors, leases
from tokenfan.shared.state import AcquireResult, Field, JobOutcome, PublishResult, StreamState, StreamStatus


def test_every_record_field_has_one_hash_field_name() -> None:
    assert [f.name for f in dataclasses.fields(StreamState)] == [f.value for f in Field]


def test_a_record_survives_the_hash_as_redis_returns_it() -> None:
    state = StreamState(model="m", owner="k1", status=StreamStatus.RUNNING, worker="w1", created=12.5, ticket=7,
                        attempt=2, cancel_on_disconnect=True, request=b'{"x":1}')
    raw = {k.encode(): str(v).encode() if not isinstance(v, bytes) else v for k, v in state.to_hash().items()}
    assert StreamState.parse(raw) == state


def test_an_empty_hash_is_no_record_and_missing_fields_take_defaults() -> None:
    assert StreamState.parse({}) is None
    assert StreamState.parse({b"status": None}) is None  # HMGET of a missing hash
    assert StreamState.parse({b"status": b"finished"}) == StreamState(status=StreamStatus.FINISHED)


def test_statuses_go_to_redis_and_json_as_their_plain_value() -> None:
    assert str(StreamStatus.QUEUED) == "queued" and f"{StreamStatus.FINISHED}" == "finished"
    assert StreamState.parse_status(b"running") is StreamStatus.RUNNING
    assert StreamState.parse_status(None) is None


def test_acquire_results_say_whether_the_lease_was_claimed() -> None:
    assert {r for r in AcquireResult if r.claimed} == {AcquireResult.QUEUED, AcquireResult.RUNNING}
    assert JobOutcome.skipped(AcquireResult.TAKEN) is JobOutcome.SKIPPED_TAKEN
    assert JobOutcome.skipped(AcquireResult.FINISHED).value == "skipped-finished"


def test_the_scripts_are_formatted_from_the_state_names() -> None:
    for script in (bus.PUBLISH.lua, leases.ACQUIRE.lua, leases.RECLAIM.lua, leases.HANDBACK.lua):
        assert "$" not in script
    assert f"'{Field.STATUS}', '{StreamStatus.FINISHED}'" in bus.PUBLISH.lua
    assert f"return {int(PublishResult.FENCED)} end" in bus.PUBLISH.lua
    assert f"'{Field.STATUS}', '{StreamStatus.QUEUED}', '{Field.WORKER}', '', '{Field.ATTEMPT}'" in leases.HANDBACK.lua


@pytest.mark.parametrize(("code", "cls", "status"), [
    ("context_length_exceeded", errors.ContextLengthExceeded, 400),
    ("invalid_job", errors.InvalidJob, 500),
    ("worker_lost", errors.WorkerLost, 503),
    ("timeout", errors.Timeout, 504),
    ("engine_error", errors.EngineError, 502),
    ("something_new", errors.EngineError, 502),
])
def test_an_error_events_code_names_its_class_and_so_its_status(code: str, cls: type[errors.TokenfanError],
                                                                status: int) -> None:
    err = errors.from_code(code, "why")
    assert type(err) is cls and err.status == status and err.code == code and err.message == "why"


def test_every_error_code_belongs_to_one_class() -> None:
    seen: dict[str, type[errors.TokenfanError]] = {}
    todo: list[type[errors.TokenfanError]] = [errors.TokenfanError]
    while todo:
        cls = todo.pop()
        assert seen.setdefault(cls.code, cls) is cls, f"{cls.__name__} reuses {seen[cls.code].__name__}'s code"
        todo += cls.__subclasses__()
