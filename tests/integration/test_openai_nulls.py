"""An explicit null on any parameter OpenAI's schema makes nullable is that parameter not given (issue 26):
the SDKs send null for a None. The lists come from the openai SDK's own request types (the TypedDicts of
each route's create params), sent through the SDK itself, against real API and worker processes."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import completion_create_params as legacy_params
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import response_create_params as responses_params

from tests.procs import Cluster, expected_text


def _takes_none(t: Any) -> bool:
    return t is type(None) or any(_takes_none(a) for a in typing.get_args(t))


def nullable(*typed: type) -> list[str]:
    """The optional parameters whose type takes None, over the request types given (the base and the
    non-streaming variant, where `stream` is)."""
    found: set[str] = set()
    for td in typed:
        hints = typing.get_type_hints(td, include_extras=True)
        # Required[...] read from the annotation: the SDK's TypedDicts leave __required_keys__ empty.
        found |= {k for k, t in hints.items() if typing.get_origin(t) is not typing.Required and _takes_none(t)}
    return sorted(found)


CHAT = nullable(chat_params.CompletionCreateParamsNonStreaming)
LEGACY = nullable(legacy_params.CompletionCreateParamsNonStreaming)
RESPONSES = nullable(responses_params.ResponseCreateParamsNonStreaming)


def test_the_lists_are_the_sdks() -> None:
    # What the issue found refused; if the SDK stops calling them nullable, this list is what changed.
    assert {"temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty"} <= set(CHAT)
    assert {"stream", "background", "store", "temperature"} <= set(RESPONSES)
    assert {"echo", "n", "stream", "max_tokens"} <= set(LEGACY)
    assert "messages" not in CHAT and "prompt" not in LEGACY and "input" not in RESPONSES  # required


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    api = cluster.api()
    cluster.worker()
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def _nulls(names: list[str]) -> dict[str, Any]:
    return {name: None for name in names}


def test_chat_completions_take_null_for_every_nullable_parameter(client: openai.OpenAI) -> None:
    got = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "nulls"}],
                                         **_nulls(CHAT))
    assert isinstance(got, openai.types.chat.ChatCompletion) and len(got.choices) == 1  # n: 1
    assert got.choices[0].message.content and got.choices[0].logprobs is None


def test_completions_take_null_for_every_nullable_parameter(client: openai.OpenAI) -> None:
    got = client.completions.create(model="smollm2", prompt="nulls", **_nulls(LEGACY))
    (choice,) = got.choices
    assert choice.text == expected_text("nulls", 16)  # max_tokens: OpenAI's default, 16; echo: off


def test_responses_take_null_for_every_nullable_parameter(client: openai.OpenAI) -> None:
    got = client.responses.create(model="smollm2", input="nulls", **_nulls(RESPONSES))
    assert got.status == "completed" and got.output_text
    assert got.background is False and got.store is True and got.temperature == 0.7
    assert client.responses.retrieve(got.id).id == got.id  # store: true, the default


def test_the_openapi_schema_says_null_is_taken(cluster: Cluster) -> None:
    api = cluster.api()
    schema = httpx.get(f"{api.url}/openapi.json", timeout=10).json()["components"]["schemas"]
    for model, names in (("ChatRequest", ["temperature", "n", "stream"]), ("ResponsesRequest", ["store"])):
        for name in names:
            assert {"type": "null"} in schema[model]["properties"][name]["anyOf"], (model, name)
    assert "anyOf" not in schema["ChatRequest"]["properties"]["messages"]  # a required one stays required


