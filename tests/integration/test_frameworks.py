"""LangChain and litellm, the clients issue 26 names, against real API and worker processes: the fake
engine paced slow and pings every 50 ms (test_openai_keepalive's pace), so every stream carries pings
after its first `id:` (the bytes are checked). LangChain's ChatOpenAI streams chat completions, and
with `use_responses_api=True` and a bound tool goes through a whole tool round trip; litellm's
`completion(stream=True)` with an `openai/` model and `api_base`.

litellm fetches its model cost map from GitHub when it is imported (three tries, then its bundled
copy): LITELLM_LOCAL_MODEL_COST_MAP keeps it on the bundled copy, as a machine offline (or CI) needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI

from tests.integration.test_openai_keepalive import HEARTBEAT_S, PROMPT, RATE, TOKENS, Tee, _pinged_after_an_id
from tests.procs import Cluster, Proc, expected_text
from tokenfan.worker.engines import fake_tokens


@pytest.fixture
def api(cluster: Cluster) -> Proc:
    proc = cluster.api(TOKENFAN_HEARTBEAT_S=HEARTBEAT_S)
    cluster.worker(TOKENFAN_FAKE_RATE=RATE, TOKENFAN_SLOTS="2")
    return proc


@pytest.fixture
def tee() -> Tee:
    return Tee()


@pytest.fixture
def http(tee: Tee) -> Iterator[httpx.Client]:
    client = httpx.Client(transport=tee, timeout=60)
    yield client
    client.close()


def _chat(api: Proc, http: httpx.Client, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model="smollm2", base_url=f"{api.url}/v1", api_key="unused",  # type: ignore[arg-type]
                      max_retries=0, timeout=60, http_client=http, streaming=True, **kw)


def _streamed(llm: Any, messages: list[BaseMessage]) -> AIMessageChunk:
    """The chunks of one streamed answer, added up as LangChain's own callers do."""
    chunks = list(llm.stream(messages))
    assert len(chunks) > 1
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    assert isinstance(whole, AIMessageChunk)
    return whole


@tool
def get_time(zone: str) -> str:
    """The time now in a time zone."""
    return f"it is noon in {zone}"


def test_langchain_streams_chat_completions_across_many_pings(api: Proc, http: httpx.Client, tee: Tee) -> None:
    got = _streamed(_chat(api, http, max_tokens=TOKENS), [HumanMessage(PROMPT)])
    assert got.text == expected_text(PROMPT, TOKENS)
    assert got.response_metadata.get("finish_reason") == "length"
    _pinged_after_an_id(bytes(tee.seen))


def test_langchain_responses_api_through_a_tool_round_trip(api: Proc, http: httpx.Client, tee: Tee) -> None:
    llm = _chat(api, http, use_responses_api=True, max_tokens=TOKENS).bind_tools([get_time])
    ask: list[BaseMessage] = [HumanMessage("use get_time please")]
    called = _streamed(llm, ask)
    (call,) = called.tool_calls
    assert call["name"] == "get_time" and call["id"]
    jsonschema.validate(call["args"], convert_to_openai_tool(get_time)["function"]["parameters"])
    result = get_time.invoke(call["args"])
    answer = _streamed(llm, [*ask, called, ToolMessage(result, tool_call_id=call["id"])])
    assert not answer.tool_calls
    assert answer.text == "".join(fake_tokens([{"role": "tool", "content": result}], TOKENS))
    raw = bytes(tee.seen)
    assert raw.count(b"event: response.function_call_arguments.delta") > 1  # the Responses API, streamed
    assert raw.count(b"event: response.output_text.delta") == TOKENS
    _pinged_after_an_id(raw)


def test_litellm_streams_an_openai_model_across_many_pings(api: Proc, http: httpx.Client, tee: Tee,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm  # only now: its import reads the variable

    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=60, http_client=http)
    chunks = list(litellm.completion(model="openai/smollm2", api_base=f"{api.url}/v1", api_key="unused",
                                     messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS,
                                     stream=True, client=client))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text(PROMPT, TOKENS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    _pinged_after_an_id(bytes(tee.seen))
    # and without a client of ours: litellm's own, on the api_base alone
    plain = litellm.completion(model="openai/smollm2", api_base=f"{api.url}/v1", api_key="unused",
                               messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == expected_text(PROMPT, TOKENS)
