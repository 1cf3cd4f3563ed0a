from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tokenfan.api.streams import new_stream_id
from tokenfan.shared import keys
from tokenfan.shared.errors import InvalidRequest
from tokenfan.shared.schema import ChatRequest, JobPayload, check_caps
from tokenfan.shared.settings import ApiSettings


def _slot_tag(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]


def test_every_stream_key_shares_one_cluster_hash_tag() -> None:
    sid = new_stream_id()
    all_keys = [keys.channel(sid), *keys.stream_keys(sid)]
    assert {_slot_tag(k) for k in all_keys} == {sid}
    assert all(k.startswith("tf:") for k in all_keys)
    assert len(set(all_keys)) == len(all_keys)


def test_queue_layout_is_rq_list_per_model() -> None:
    assert keys.queue_name("smollm2") == "tf:q:smollm2"
    assert keys.queue_list("smollm2") == "rq:queue:tf:q:smollm2"


def test_stream_ids_are_unguessable() -> None:
    ids = {new_stream_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 24 for i in ids)  # 18 random bytes = 144 bits


def _req(**kw: object) -> ChatRequest:
    base: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}]}
    base.update(kw)
    return ChatRequest.model_validate(base)


@pytest.mark.parametrize("bad", [
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": "   "}]},
    {"messages": [{"role": "user"}]},
    {"messages": "hi"},
    {"max_tokens": 0},
    {"max_tokens": -3},
    {"temperature": 5},
    {"n": 5},
    {"stop": [""]},
])
def test_bad_requests_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _req(**bad)


def test_content_parts_are_joined() -> None:
    req = _req(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.messages[0].text() == "ab"


def test_caps_name_the_cap() -> None:
    s = ApiSettings(max_tokens_cap=10, max_messages=2, max_prompt_chars=5, max_stop=1)
    with pytest.raises(InvalidRequest) as e:
        check_caps(_req(max_tokens=11), s)
    assert e.value.param == "max_tokens" and "10" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        check_caps(_req(messages=[{"role": "user", "content": "x"}] * 3), s)
    assert e.value.param == "messages"
    with pytest.raises(InvalidRequest) as e:
        check_caps(_req(messages=[{"role": "user", "content": "toolong"}]), s)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest) as e:
        check_caps(_req(stop=["a", "b"]), s)
    assert e.value.param == "stop"


def test_job_payload_is_plain_json_and_strict() -> None:
    s = ApiSettings()
    p = JobPayload.from_request(_req(max_tokens=7, stop="x"), stream_id=new_stream_id(), model="m", settings=s,
                                now=1.0)
    dumped = p.dump()
    assert dumped["max_tokens"] == 7 and dumped["stop"] == ["x"] and dumped["v"] == 1
    assert JobPayload.model_validate(dumped) == p
    with pytest.raises(ValidationError):
        JobPayload.model_validate({**dumped, "evil": "__import__('os')"})
    with pytest.raises(ValidationError):
        JobPayload.model_validate({**dumped, "stream_id": "../../etc"})


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "a\udbf9b"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
    {"messages": [{"role": "user", "content": "x", "name": "\ud800"}]},
    {"messages": [{"role": "user", "content": "x"}], "stop": "\ud800"},
    {"messages": [{"role": "user", "content": "x"}], "model": "\udfff"},
    {"messages": [{"role": "user", "content": "x"}], "seed": -(2**63) - 1},
    {"messages": [{"role": "user", "content": "x"}], "seed": 2**63},
])
def test_what_cannot_be_stored_is_rejected(body: dict) -> None:
    """Lone surrogates (JSON can spell them) and seeds past 64 bits: orjson cannot encode either."""
    with pytest.raises(ValidationError):
        ChatRequest.model_validate(body)


def test_paired_surrogates_and_64_bit_seeds_are_fine() -> None:
    # As the API parses a body: JSON's escaped surrogate pair is one character.
    body = json.loads('{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "seed": -9223372036854775808}')
    req = ChatRequest.model_validate(body)
    assert req.messages[0].text() == "\N{GRINNING FACE}"
    assert req.seed == -(2**63)
