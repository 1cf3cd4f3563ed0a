"""Function tools on /v1/responses with the official SDKs, on the fake engine (issue 26): the calls as
`function_call` output items with the events OpenAI streams for them, tool_choice, the response object
streamed, returned and retrieved alike. The fake engine writes its call in the text form a model does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import redis

from tests import nodesdk
from tests.integration.test_responses import _add_key
from tests.procs import Cluster, wait_for
from tokenfan.shared import keys, structured
from tokenfan.worker.engines import fake_logprobs, fake_tokens

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 2},
                                            "days": {"type": "integer", "minimum": 1}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "name": "get_weather", "description": "The forecast", "parameters": WEATHER},
    {"type": "function", "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}},
]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]


@pytest.fixture
def api(cluster: Cluster) -> Any:
    proc = cluster.api()
    cluster.worker()
    return proc


@pytest.fixture
def client(api: Any) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()


def _squeeze(types: list[str]) -> list[str]:
    """Event types with runs of one type (the deltas) written once."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def test_a_required_call_streams_as_a_function_call_item(client: openai.OpenAI) -> None:
    evs = list(client.responses.create(model="smollm2", input="what now", tools=TOOLS, tool_choice="required",
                                       max_output_tokens=64, stream=True))
    types = [e.type for e in evs]
    assert _squeeze(types) == ["response.created", "response.in_progress", "keepalive", *CALL_EVENTS,
                               "response.completed"], types
    assert types.count("response.function_call_arguments.delta") > 3  # piece by piece
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    added, done = evs[types.index("response.output_item.added")], evs[types.index("response.output_item.done")]
    assert added.item.type == "function_call" and added.item.name == "get_weather" and added.item.arguments == ""
    assert added.item.call_id.startswith("call_") and added.item.status == "in_progress"
    args = "".join(e.delta for e in evs if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == structured.example(WEATHER)
    jsonschema.validate(json.loads(args), WEATHER)
    assert evs[types.index("response.function_call_arguments.done")].arguments == args
    assert done.item.arguments == args and done.item.status == "completed" and done.item.id == added.item.id
    final = evs[-1].response
    assert final.status == "completed" and [o.type for o in final.output] == ["function_call"]
    assert final.output[0].to_dict() == done.item.to_dict() and final.output_text == ""
    assert final.tool_choice == "required" and [t.name for t in final.tools] == ["get_weather", "get_time"]
    # stored: retrieved as the stream ended, and read again as events
    assert client.responses.retrieve(final.id).output[0].to_dict() == done.item.to_dict()
    again = list(client.responses.retrieve(final.id, stream=True))
    assert [e.to_dict() for e in again] == [e.to_dict() for e in evs]


def test_auto_calls_a_named_tool_and_answers_text_otherwise(client: openai.OpenAI) -> None:
    called = client.responses.create(model="smollm2", input="use get_time please", tools=TOOLS, max_output_tokens=64)
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_time" and json.loads(call.arguments) == {"zone": "UTC"}
    assert called.status == "completed" and called.tool_choice == "auto" and called.parallel_tool_calls is True
    text = client.responses.create(model="smollm2", input="just talk", tools=TOOLS, max_output_tokens=5)
    assert [o.type for o in text.output] == ["message"]
    assert text.output_text == "".join(fake_tokens([{"role": "user", "content": "just talk"}], 5))
    none = client.responses.create(model="smollm2", input="use get_time please", tools=TOOLS, tool_choice="none",
                                   max_output_tokens=5)
    assert [o.type for o in none.output] == ["message"]
    named = client.responses.create(model="smollm2", input="what now", tools=TOOLS, parallel_tool_calls=False,
                                    tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=64)
    assert [(o.type, o.name) for o in named.output] == [("function_call", "get_time")]  # type: ignore[union-attr]
    assert named.parallel_tool_calls is False


def test_the_sdks_stream_helpers_rebuild_a_call(client: openai.OpenAI, api: Any) -> None:
    with client.responses.stream(model="smollm2", input="use get_weather now", tools=TOOLS,  # type: ignore[arg-type]
                                 max_output_tokens=64) as helper:
        final = helper.get_final_response()
    (call,) = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == structured.example(WEATHER)
    got = nodesdk.run("sdk_streams.cjs", api.url, "use get_weather now", "64", "responses_tools")["responses_tools"]
    assert got["output"] == [final.output[0].to_dict() | {"id": got["output"][0]["id"],
                                                         "call_id": got["output"][0]["call_id"]}]
    assert json.loads(got["arguments"]) == structured.example(WEATHER)


def test_a_tool_round_trip_goes_on_with_the_calls_output(client: openai.OpenAI) -> None:
    ask: list[Any] = [{"role": "user", "content": "use get_time please"}]
    first = client.responses.create(model="smollm2", input=ask, tools=TOOLS, max_output_tokens=64)
    (call,) = first.output
    assert call.type == "function_call"
    # as the cookbook does it: the output items go back as they are, then the call's output
    follow = [*ask, *first.output, {"type": "function_call_output", "call_id": call.call_id, "output": "it is noon"}]
    second = client.responses.create(model="smollm2", input=follow, tools=TOOLS, max_output_tokens=5)
    assert [o.type for o in second.output] == ["message"]
    assert second.output_text == "".join(fake_tokens([{"role": "tool", "content": "it is noon"}], 5))


def test_an_output_for_no_call_is_a_400_naming_it(client: openai.OpenAI) -> None:
    stray = [{"role": "user", "content": "hello"},
             {"type": "function_call_output", "call_id": "call_nobody", "output": "orphan"}]
    with pytest.raises(openai.BadRequestError) as got:
        client.responses.create(model="smollm2", input=stray, tools=TOOLS)
    err = got.value.body
    assert isinstance(err, dict) and err["param"] == "input.1.call_id" and "call_nobody" in err["message"]


def test_previous_response_id_goes_on_across_two_apis(cluster: Cluster, r: redis.Redis) -> None:
    a, b = cluster.api(), cluster.api()
    cluster.worker()
    ca, cb = (openai.OpenAI(base_url=f"{p.url}/v1", api_key="unused", max_retries=0, timeout=30) for p in (a, b))
    first = ca.responses.create(model="smollm2", input="use get_time please", tools=TOOLS, max_output_tokens=64)
    (call,) = first.output
    # on the other replica: only the call's output, the rest is the stored response's
    second = cb.responses.create(model="smollm2", previous_response_id=first.id, tools=TOOLS, max_output_tokens=5,
                                 input=[{"type": "function_call_output", "call_id": call.call_id,  # type: ignore[union-attr]
                                         "output": "it is noon"}])
    assert second.previous_response_id == first.id
    assert second.output_text == "".join(fake_tokens([{"role": "tool", "content": "it is noon"}], 5))
    # and on again, text only: the whole conversation is the prompt (longer than the question alone)
    third = ca.responses.create(model="smollm2", previous_response_id=second.id, input="and tomorrow?",
                                max_output_tokens=3)
    alone = ca.responses.create(model="smollm2", input="and tomorrow?", max_output_tokens=3)
    assert third.output_text == alone.output_text
    assert third.usage is not None and alone.usage is not None
    assert third.usage.input_tokens > alone.usage.input_tokens
    # what each was given
    items = cb.responses.input_items.list(second.id)
    assert [(i.type, i.call_id) for i in items.data] == [("function_call_output", call.call_id)]  # type: ignore[union-attr]
    (asked,) = ca.responses.input_items.list(first.id).data
    assert asked.type == "message" and asked.content[0].text == "use get_time please"  # type: ignore[union-attr]


def test_previous_response_id_of_another_key_unstored_or_unknown_is_a_404(cluster: Cluster, r: redis.Redis) -> None:
    alice, bob = _add_key(r, "alice"), _add_key(r, "bob")
    api = cluster.api()
    cluster.worker()
    mine, theirs = (openai.OpenAI(base_url=f"{api.url}/v1", api_key=k, max_retries=0, timeout=30)
                    for k in (alice, bob))
    kept = mine.responses.create(model="smollm2", input="hello", max_output_tokens=3)
    unstored = mine.responses.create(model="smollm2", input="hello", max_output_tokens=3, store=False)
    for client, rid in ((theirs, kept.id), (mine, unstored.id), (mine, "resp_" + "x" * 24)):
        with pytest.raises(openai.NotFoundError) as got:
            client.responses.create(model="smollm2", input="go on", previous_response_id=rid)
        assert isinstance(got.value.body, dict) and got.value.body["param"] == "previous_response_id"
    assert mine.responses.create(model="smollm2", input="go on", previous_response_id=kept.id,
                                 max_output_tokens=3).status == "incomplete"


def test_top_logprobs_on_every_delta_and_the_whole_text(client: openai.OpenAI) -> None:
    toks = fake_tokens([{"role": "user", "content": "scored"}], 4)
    want = [fake_logprobs(t, i, 2) for i, t in enumerate(toks)]
    evs = list(client.responses.create(model="smollm2", input="scored", max_output_tokens=4, top_logprobs=2,
                                       stream=True))
    deltas = [e for e in evs if e.type == "response.output_text.delta"]
    assert [[lp.to_dict() for lp in d.logprobs] for d in deltas] == [[w] for w in want]
    done = next(e for e in evs if e.type == "response.output_text.done")
    assert [lp.to_dict() for lp in done.logprobs] == want
    final = evs[-1].response
    assert final.top_logprobs == 2
    assert [lp.to_dict() for lp in final.output[0].content[0].logprobs] == want  # type: ignore[union-attr]
    # not streamed, and asked for by `include` alone (the chosen tokens, no alternatives)
    got = client.responses.create(model="smollm2", input="scored", max_output_tokens=4,
                                  include=["message.output_text.logprobs"])
    part = got.output[0].content[0]  # type: ignore[union-attr]
    assert [lp.token for lp in part.logprobs] == toks and all(not lp.top_logprobs for lp in part.logprobs)
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="smollm2", input="scored", top_logprobs=21)
    assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "top_logprobs"


def test_a_stored_response_outlives_its_log_for_the_response_ttl(cluster: Cluster, r: redis.Redis) -> None:
    """A log TTL of 1 s, a response TTL of 12 s: once the stream's keys are gone, another API process
    still retrieves, replays and lists the response, and goes on from it (its call answered), until
    the response TTL; then it is OpenAI's 404."""
    short = {"TOKENFAN_LOG_TTL_S": "1", "TOKENFAN_RESPONSE_TTL_S": "12"}
    a, b = cluster.api(**short), cluster.api(**short)
    cluster.worker(TOKENFAN_LOG_TTL_S="1")
    ca, cb = (openai.OpenAI(base_url=f"{p.url}/v1", api_key="unused", max_retries=0, timeout=30) for p in (a, b))
    first = ca.responses.create(model="smollm2", input="use get_time please", tools=TOOLS, max_output_tokens=64)
    (call,) = first.output
    assert call.type == "function_call"
    sid = first.id.removeprefix("resp_")
    assert 1000 < r.pttl(keys.response(sid)) <= 12000 and 1000 < r.pttl(keys.response_log(sid)) <= 12000
    assert 0 < r.pttl(keys.log(sid)) <= 1000
    wait_for(lambda: not r.exists(keys.log(sid), keys.state(sid)), timeout=10, what="the stream's keys to expire")
    # past the log, on the other replica: the same response, its events, its input, a next turn
    kept = cb.responses.retrieve(first.id)
    assert kept.to_dict() == first.to_dict()
    replay = list(cb.responses.retrieve(first.id, stream=True))
    assert replay[-1].type == "response.completed" and replay[-1].response.to_dict() == first.to_dict()
    assert [e.sequence_number for e in replay] == list(range(len(replay)))
    tail = list(cb.responses.retrieve(first.id, stream=True, starting_after=replay[-3].sequence_number))
    assert [e.to_dict() for e in tail] == [e.to_dict() for e in replay[-2:]]
    (asked,) = cb.responses.input_items.list(first.id).data
    assert asked.type == "message" and asked.content[0].text == "use get_time please"  # type: ignore[union-attr]
    second = cb.responses.create(model="smollm2", previous_response_id=first.id, tools=TOOLS, max_output_tokens=5,
                                 input=[{"type": "function_call_output", "call_id": call.call_id, "output": "noon"}])
    assert second.output_text == "".join(fake_tokens([{"role": "tool", "content": "noon"}], 5))
    # past the response TTL: gone, for every route and as a previous response
    url = f"{a.url}/v1/responses/{first.id}"
    wait_for(lambda: httpx.get(url, timeout=5).status_code == 404, timeout=30, what="the response to expire")
    assert httpx.get(url, timeout=5).json()["error"]["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError) as gone:
        ca.responses.create(model="smollm2", input="go on", previous_response_id=first.id)
    assert isinstance(gone.value.body, dict) and gone.value.body["param"] == "previous_response_id"
    assert not r.exists(keys.response(sid), keys.response_log(sid))


def test_previous_response_id_needs_no_input(client: openai.OpenAI) -> None:
    first = client.responses.create(model="smollm2", input="tell me more", max_output_tokens=3)
    again = client.responses.create(model="smollm2", previous_response_id=first.id, max_output_tokens=4)
    # the stored conversation goes on as it is: its last user message is still the one the engine answers
    assert again.status == "incomplete" and again.previous_response_id == first.id
    assert again.output_text == "".join(fake_tokens([{"role": "user", "content": "tell me more"}], 4))
    assert again.usage is not None and first.usage is not None
    assert again.usage.input_tokens > first.usage.input_tokens  # first's answer is in the prompt
    assert client.responses.input_items.list(again.id).data == []
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="smollm2", max_output_tokens=4)  # type: ignore[call-overload]
    assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "input"
    assert "previous_response_id" in bad.value.body["message"]
