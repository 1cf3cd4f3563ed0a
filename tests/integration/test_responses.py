"""The Responses API with the official openai SDK as the client: real API and worker processes, the fake engine."""

from __future__ import annotations

import json
import random
import signal
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import redis

from tests import nodesdk
from tests.procs import Cluster, parse_sse, stream_status, wait_for
from tokenfan.shared import apikeys, keys
from tokenfan.shared.state import StreamStatus
from tokenfan.worker.engines import fake_tokens

ENDS = ("response.completed", "response.incomplete", "response.failed")
OPENING = ["response.created", "response.in_progress", "keepalive", "response.output_item.added",
           "response.content_part.added"]  # keepalive: the log's disclosure
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def _client(api: Any, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0, timeout=30)


def _expected(content: str, n: int) -> str:
    return "".join(fake_tokens([{"role": "user", "content": content}], n))


def _sid(rid: str) -> str:
    return rid.removeprefix("resp_")


def _take(stream: Any, k: int) -> list[Any]:
    """Up to `k` events of an SDK stream (fewer when it ends), then the connection is dropped."""
    got: list[Any] = []
    for ev in stream:
        got.append(ev)
        if len(got) >= k or ev.type in ENDS:
            break
    stream.close()
    return got


def _deltas(evs: list[Any]) -> str:
    return "".join(e.delta for e in evs if e.type == "response.output_text.delta")


def _add_key(r: redis.Redis, tenant: str) -> str:
    key, rec = apikeys.make_record(tenant, admin=False, max_concurrent=8, rpm=600)
    r.hset(keys.api_keys(), rec.hash, rec.model_dump_json())
    return key


def test_streamed_events_names_order_and_numbers(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_TOKENS="8")
    client = _client(api)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "an earlier question"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "an answer"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "tell me"}, {"type": "input_text",
                                                                                    "text": " about fans"}]}]
    evs = list(client.responses.create(model="smollm2", input=items, instructions="Be brief.", stream=True,
                                       max_output_tokens=20, metadata={"ticket": "42"}))
    n = 8  # the fake engine's answer length: under max_output_tokens, so it stops on its own
    types = [e.type for e in evs]
    assert types == [*OPENING, *["response.output_text.delta"] * n, *CLOSING, "response.completed"], types
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    text = _deltas(evs)
    assert text == _expected("tell me about fans", n)
    rid = evs[0].response.id
    assert rid.startswith("resp_") and {e.response.id for e in evs if hasattr(e, "response")} == {rid}
    item_id = evs[3].item.id
    assert item_id.startswith("msg_") and {e.item_id for e in evs if hasattr(e, "item_id")} == {item_id}
    done = {e.type: e for e in evs}
    assert done["response.output_text.done"].text == text and done["response.content_part.done"].part.text == text
    assert done["response.output_item.done"].item.status == "completed"
    final = done["response.completed"].response
    assert final.status == "completed" and final.output_text == text and final.instructions == "Be brief."
    assert final.metadata == {"ticket": "42"} and final.max_output_tokens == 20 and final.model == "smollm2"
    assert final.usage is not None and final.usage.output_tokens == n and final.usage.input_tokens > 0
    assert evs[0].response.status == "in_progress" and evs[0].response.output == []
    # the same, stored: retrieved as one object
    got = client.responses.retrieve(rid)
    assert got.status == "completed" and got.output_text == text and got.output[0].id == item_id
    assert got.usage is not None and got.usage.total_tokens == final.usage.total_tokens
    # the SDK's own accumulating helper takes the events as they are
    with client.responses.stream(model="smollm2", input="helper", max_output_tokens=20) as helper:
        final = helper.get_final_response()
    assert final.status == "completed" and final.output_text == _expected("helper", n)


def test_sse_ids_are_sequence_numbers_and_last_event_id_resumes(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    body = {"input": "sse ids", "max_output_tokens": 5, "stream": True}
    resp = httpx.post(f"{api.url}/v1/responses", json=body, timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(resp.content)
    payloads = [f.json() for f in frames]
    assert [f.id for f in frames] == [str(p["sequence_number"]) for p in payloads]
    assert [f.event for f in frames] == [p["type"] for p in payloads]
    assert payloads[-1]["type"] == "response.incomplete"  # max_output_tokens reached
    assert payloads[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    rid = payloads[0]["response"]["id"]
    rest = httpx.get(f"{api.url}/v1/responses/{rid}", params={"stream": "true"}, headers={"Last-Event-ID": "6"},
                     timeout=30)
    assert [f.json() for f in parse_sse(rest.content)] == payloads[7:]


def test_resume_at_many_points_across_two_apis_exactly_once(cluster: Cluster) -> None:
    a, b = cluster.api(), cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="60")
    clients = [_client(a), _client(b)]
    rng = random.Random(13)
    n = 30
    fulls = []
    for round_ in range(4):
        content = f"resume round {round_}"
        got = _take(clients[0].responses.create(input=content, max_output_tokens=n, stream=True, background=True),
                    rng.randint(1, 6))
        rid = got[0].response.id
        hop = 1
        while got[-1].type not in ENDS:
            more = clients[hop % 2].responses.retrieve(rid, stream=True, starting_after=got[-1].sequence_number)
            got += _take(more, rng.randint(1, 8))
            hop += 1
        assert hop > 3  # it really was read in pieces, on both APIs
        assert [e.sequence_number for e in got] == list(range(len(got))), "a gap or a repeat"
        assert [e.type for e in got][:5] == OPENING and sum(e.type in ENDS for e in got) == 1
        assert _deltas(got) == _expected(content, n)
        assert got[-1].response.output_text == _expected(content, n)
        fulls.append((rid, got))
    # finished: from every point, on the other API, the rest is exactly what the first read got after it
    rid, full = fulls[0]
    for cut in range(len(full)):
        rest = list(clients[1].responses.retrieve(rid, stream=True, starting_after=cut))
        assert [e.to_dict() for e in rest] == [e.to_dict() for e in full[cut + 1:]], cut
    assert [e.to_dict() for e in clients[1].responses.retrieve(rid, stream=True)] == [e.to_dict() for e in full]


def test_worker_takeover_keeps_the_numbers_and_the_text(cluster: Cluster) -> None:
    cluster.env.update({"TOKENFAN_LEASE_TTL_S": "1.5", "TOKENFAN_KEEPER_INTERVAL_S": "0.25"})
    api = cluster.api()
    first = cluster.worker(TOKENFAN_FAKE_RATE="20")
    client = _client(api)
    made = client.responses.create(input="survive the crash", background=True, max_output_tokens=30)
    wait_for(lambda: len(client.responses.retrieve(made.id).output_text.split()) >= 5, what="five tokens")
    first.signal(signal.SIGKILL)
    cluster.worker(TOKENFAN_FAKE_RATE="50")
    evs = list(client.responses.retrieve(made.id, stream=True))
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    # the takeover's meta is one more keepalive, between deltas; in_progress only before the output items
    types = [e.type for e in evs]
    assert types.count("keepalive") == 2 and types.index("keepalive", 5) > types.index("response.output_text.delta")
    assert types.count("response.in_progress") == 1 and types.index("response.in_progress") == 1
    assert evs[-1].type == "response.incomplete"
    assert _deltas(evs) == _expected("survive the crash", 30) == evs[-1].response.output_text
    # the Node SDK's accumulator rebuilds it across the takeover
    node = nodesdk.run("sdk_streams.cjs", api.url, made.id, "0", "retrieve_stream")["retrieve_stream"]
    assert node["types"] == types and node["text"] == node["output_text"] == _expected("survive the crash", 30)


def test_node_sdk_responses_stream_rebuilds_every_response(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    got = nodesdk.run("sdk_streams.cjs", api.url, "the node helper", "6", "responses_stream,responses")
    helper, raw = got["responses_stream"], got["responses"]
    assert helper["types"][:5] == OPENING and helper["status"] == "incomplete"
    assert helper["text"] == helper["output_text"] == _expected("the node helper", 6) == raw["text"]
    assert raw["numbers"] == list(range(len(raw["numbers"])))


def test_background_runs_unwatched_listed_on_the_ops_page(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    # An ordinary stream nobody watches is stopped as abandoned once its first viewer's placeholder (10 s)
    # and the grace (1 s) are over; this one takes 15 s.
    cluster.worker(TOKENFAN_ABANDON_GRACE_S="1", TOKENFAN_FAKE_RATE="4", TOKENFAN_FAKE_TOKENS="200")
    client = _client(api)
    made = client.responses.create(input="in the background", max_output_tokens=60, background=True)
    assert made.status == "queued" and made.background is True and made.output == []
    sid = _sid(made.id)

    def listed() -> bool:
        snap = httpx.get(f"{api.url}/v1/ops/snapshot", timeout=5).json()
        return any(s["id"] == sid and s["status"] == "running" for s in snap["streams"])

    wait_for(listed, timeout=20, what="the response's stream on the ops page")
    running = client.responses.retrieve(made.id)
    assert running.status == "in_progress"
    wait_for(lambda: stream_status(r, sid) is StreamStatus.FINISHED, timeout=30, what="the response to end")
    done = client.responses.retrieve(made.id)
    assert done.status == "incomplete" and done.output_text == _expected("in the background", 60)
    assert done.incomplete_details is not None and done.incomplete_details.reason == "max_output_tokens"


def test_cancel_background_responses(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    client = _client(api)
    # queued (no worker yet): ended at once
    queued = client.responses.create(input="never started", background=True)
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.output == []
    assert [(e.sequence_number, e.type) for e in client.responses.retrieve(queued.id, stream=True)] == [
        (0, "response.created"), (1, "response.incomplete")]
    cluster.worker(TOKENFAN_FAKE_RATE="20", TOKENFAN_FAKE_TOKENS="300")
    slow = client.responses.create(input="cancel me", background=True, max_output_tokens=300)
    wait_for(lambda: client.responses.retrieve(slow.id).output_text, timeout=20, what="some text")
    ended = client.responses.cancel(slow.id)
    assert ended.status == "cancelled" and 0 < len(ended.output_text) < len(_expected("cancel me", 300))
    assert client.responses.cancel(slow.id).status == "cancelled"  # idempotent, as OpenAI's
    evs = list(client.responses.retrieve(slow.id, stream=True))
    assert evs[-1].type == "response.incomplete" and evs[-1].response.status == "cancelled"
    assert _deltas(evs) == ended.output_text
    # only a background response that has not finished can be cancelled
    done = client.responses.create(input="finished first", max_output_tokens=3)
    assert done.status == "incomplete"
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.cancel(done.id)
    assert exc.value.code == "not_background"
    bg = client.responses.create(input="finish then cancel", background=True, max_output_tokens=3)
    wait_for(lambda: client.responses.retrieve(bg.id).status == "incomplete", timeout=20, what="bg to end")
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.cancel(bg.id)
    assert exc.value.code == "response_already_finished"
    assert r.llen(keys.queue_list("smollm2")) == 0


def test_delete_forgets_the_response(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="20", TOKENFAN_FAKE_TOKENS="300")
    client = _client(api)
    done = client.responses.create(input="delete me", max_output_tokens=3)
    assert client.responses.delete(done.id) is None
    for call in (lambda: client.responses.retrieve(done.id), lambda: client.responses.delete(done.id),
                 lambda: list(client.responses.retrieve(done.id, stream=True))):
        with pytest.raises(openai.NotFoundError):
            call()
    assert not r.exists(keys.log(_sid(done.id)), keys.state(_sid(done.id)))
    running = client.responses.create(input="delete me running", background=True, max_output_tokens=300)
    wait_for(lambda: client.responses.retrieve(running.id).output_text, timeout=20, what="some text")
    client.responses.delete(running.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(running.id)
    wait_for(lambda: stream_status(r, _sid(running.id)) is StreamStatus.FINISHED, timeout=10,
             what="the deleted response to stop")


def test_kept_for_the_response_ttl_with_the_log(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api(TOKENFAN_LOG_TTL_S="1", TOKENFAN_RESPONSE_TTL_S="1")
    cluster.worker(TOKENFAN_LOG_TTL_S="1")
    client = _client(api)
    done = client.responses.create(input="short lived", max_output_tokens=3)
    # The terminal publish expired the record (no longer than the log: no copy of it), before anybody read it.
    assert 0 < r.pttl(keys.response(_sid(done.id))) <= 1000
    assert not r.exists(keys.response_log(_sid(done.id)))
    assert client.responses.retrieve(done.id).status == "incomplete"
    url = f"{api.url}/v1/responses/{done.id}"
    wait_for(lambda: httpx.get(url, timeout=5).status_code == 404, timeout=5, what="the response to expire")
    assert not r.exists(keys.response(_sid(done.id)), keys.log(_sid(done.id)))


def test_responses_belong_to_the_key_that_made_them(cluster: Cluster, r: redis.Redis) -> None:
    alice, bob = _add_key(r, "alice"), _add_key(r, "bob")
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="20", TOKENFAN_FAKE_TOKENS="100")
    mine, theirs = _client(api, alice), _client(api, bob)
    made = mine.responses.create(input="alice's", background=True, max_output_tokens=40)
    for call in (lambda: theirs.responses.retrieve(made.id), lambda: theirs.responses.cancel(made.id),
                 lambda: theirs.responses.delete(made.id),
                 lambda: list(theirs.responses.retrieve(made.id, stream=True, starting_after=2))):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert exc.value.code == "response_not_found"
    with pytest.raises(openai.AuthenticationError):
        _client(api, "tf_nope").responses.retrieve(made.id)
    evs = list(mine.responses.retrieve(made.id, stream=True))
    assert evs[-1].type == "response.incomplete" and _deltas(evs) == _expected("alice's", 40)


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "function_call", "call_id": "c", "name": "f"}]},
     "input.1.arguments"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input.0.content.0.type"),
    ({"input": [{"role": "user", "content": 5}]}, "input.0.content"),
    ({"input": ""}, "input"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "top_p": 0}, "top_p"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
    ({"input": "x", "stream": "yes"}, "stream"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "x", "tools": [{"type": "function", "name": "no spaces"}]}, "tools.0.name"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "bogus"}}]},
     "tools.0.parameters.type"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
     "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "previous_response_id": "resp_abc"}, "previous_response_id"),
    ({"input": "x", "background": True, "store": False}, "store"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "model": "no-such-model"}, "model"),
]


def test_bad_input_is_a_4xx_in_openai_shape_and_runs_nothing(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()  # no worker: any job enqueued would stay in the queue
    for body, param in BAD_BODIES:
        resp = httpx.post(f"{api.url}/v1/responses", json=body, timeout=10)
        assert 400 <= resp.status_code < 500, (body, resp.status_code, resp.text)
        err = resp.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
    assert r.llen(keys.queue_list("smollm2")) == 0
    # a schema: refused while structured output is missing, and a broken one always
    bad_schema = {"input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "bogus"}}}}
    resp = httpx.post(f"{api.url}/v1/responses", json=bad_schema, timeout=10)
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["param"].startswith("text.format"), err
    for rid in ("resp_nope", "nope", "resp_" + "a" * 100, "resp_"):
        for method, path in (("GET", f"/v1/responses/{rid}"), ("POST", f"/v1/responses/{rid}/cancel"),
                             ("DELETE", f"/v1/responses/{rid}")):
            resp = httpx.request(method, api.url + path, timeout=10)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "response_not_found", (method, rid)
    assert r.llen(keys.queue_list("smollm2")) == 0


def test_bad_starting_after(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="40")
    client = _client(api)
    done = client.responses.create(input="bounds", max_output_tokens=4)
    full = list(client.responses.retrieve(done.id, stream=True))
    last = full[-1].sequence_number
    assert last == len(full) - 1
    assert list(client.responses.retrieve(done.id, stream=True, starting_after=last)) == []
    url = f"{api.url}/v1/responses/{done.id}"
    for after in (str(last + 1), "-1", "abc", "1.5", "+3", str(10**30)):
        resp = httpx.get(url, params={"stream": "true", "starting_after": after}, timeout=10)
        assert resp.status_code == 400, (after, resp.text)
        assert resp.json()["error"]["param"] == "starting_after"
    assert httpx.get(url, params={"stream": "maybe"}, timeout=10).status_code == 400
    with pytest.raises(openai.BadRequestError):
        list(client.responses.retrieve(done.id, stream=True, starting_after=last + 1))
    # past the end of one still running: judged when it ends, as an error event
    running = client.responses.create(input="still running", background=True, max_output_tokens=30)
    evs = list(client.responses.retrieve(running.id, stream=True, starting_after=500))
    assert [e.type for e in evs] == ["error"] and evs[0].code == "invalid_starting_after"


def test_text_format(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    client = _client(api)
    plain = client.responses.create(input="plain", max_output_tokens=3, text={"format": {"type": "text"}},
                                    temperature=0.2, top_p=0.9)
    assert plain.status == "incomplete" and plain.text is not None and plain.text.format is not None
    assert plain.text.format.type == "text" and plain.temperature == 0.2 and plain.top_p == 0.9
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    shaped = client.responses.create(input="structured", max_output_tokens=3, text=fmt)
    assert shaped.text is not None and shaped.text.format is not None and shaped.text.format.type == "json_schema"


def test_a_failed_response_ends_with_error_then_response_failed(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_FAIL_AFTER="3", TOKENFAN_FAKE_RATE="40")
    client = _client(api)
    evs = list(client.responses.create(input="this one fails", stream=True, max_output_tokens=20))
    types = [e.type for e in evs]
    assert types == [*OPENING, *["response.output_text.delta"] * 3, "error", "response.failed"], types
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    assert evs[-2].code and evs[-2].message
    failed = evs[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.code
    # stored as failed, and read again the same from any point, exactly once
    rid = failed.id
    got = client.responses.retrieve(rid)
    assert got.status == "failed" and got.error is not None and got.error.code == failed.error.code
    for after in (0, 5, len(evs) - 3):
        again = list(client.responses.retrieve(rid, stream=True, starting_after=after))
        assert [(e.type, e.sequence_number) for e in again] == [(e.type, e.sequence_number) for e in evs[after + 1:]]


@pytest.mark.parametrize("stream", [False, True])
def test_text_format_answers_are_json_that_matches(cluster: Cluster, stream: bool) -> None:
    api = cluster.api()
    cluster.worker()
    client = _client(api)
    schema = {"type": "object", "properties": {"name": {"type": "string", "minLength": 2},
                                               "age": {"type": "integer", "minimum": 3}},
              "required": ["name", "age"], "additionalProperties": False}
    for fmt, check in (({"type": "json_schema", "name": "person", "schema": schema, "strict": True}, schema),
                       ({"type": "json_object"}, {"type": "object"})):
        if stream:
            evs = list(client.responses.create(input="json please", text={"format": fmt}, max_output_tokens=64,
                                               stream=True))
            assert evs[-1].type == "response.completed", [e.type for e in evs]
            assert len([e for e in evs if e.type == "response.output_text.delta"]) > 1  # streamed, piece by piece
            text = _deltas(evs)
        else:
            done = client.responses.create(input="json please", text={"format": fmt}, max_output_tokens=64)
            assert done.status == "completed" and done.text is not None and done.text.format is not None
            assert done.text.format.type == fmt["type"]
            text = done.output_text
        jsonschema.validate(json.loads(text), check)


def test_store_false_answers_and_keeps_nothing(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    cluster.worker()
    client = _client(api)
    done = client.responses.create(input="forget me", store=False, max_output_tokens=3)
    assert done.status == "incomplete" and done.output_text == _expected("forget me", 3) and done.store is False
    assert not r.exists(keys.response(_sid(done.id)))
    for call in (lambda: client.responses.retrieve(done.id), lambda: client.responses.cancel(done.id),
                 lambda: client.responses.delete(done.id),
                 lambda: list(client.responses.retrieve(done.id, stream=True))):
        with pytest.raises(openai.NotFoundError):
            call()
    evs = list(client.responses.create(input="forget me too", store=False, max_output_tokens=3, stream=True))
    assert evs[-1].type == "response.incomplete" and _deltas(evs) == _expected("forget me too", 3)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(evs[0].response.id)
