"""Issue 27 through real processes on the real model: the patterns that wedged a worker, sent while a plain
stream runs on it, get their 400 naming the part and the limit, and the plain stream goes on; a recursive
schema is served."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import openai
import pytest

from tests.procs import Cluster

pytestmark = pytest.mark.model

# A guard against a hang, not a speed claim: the plain stream's longest wait between two chunks (a token
# takes about 0.1 s here, seconds under a loaded CI machine; a wedged worker never sends one again).
MAX_GAP_S = 30.0
COSTLY = ["^((((a{0,256}){0,256}){0,256}){0,256})$", "^((a{0,256}){0,256})$", "^" + "[a-z]*" * 100 + "$"]
TREE = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#"}}},
        "required": ["name", "children"]}


def _plain(client: openai.OpenAI, out: dict[str, Any]) -> None:
    """A streamed answer, with the time of each chunk."""
    times, text = [time.monotonic()], ""
    for c in client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Tell a story."}],
                                            max_tokens=64, temperature=0, stream=True):
        times.append(time.monotonic())
        text += "".join(ch.delta.content or "" for ch in c.choices)
    out["text"], out["gap"] = text, max(b - a for a, b in itertools.pairwise(times))


def _fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_costly_patterns_are_refused_beside_a_running_stream_and_a_tree_is_served(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1", TOKENFAN_N_CTX="512", TOKENFAN_SLOTS="2")
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120)
    plain: dict[str, Any] = {}
    runner = threading.Thread(target=_plain, args=(client, plain))
    runner.start()
    messages = [{"role": "user", "content": "Answer."}]
    for pattern in COSTLY:
        with pytest.raises(openai.BadRequestError) as got:
            client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8,
                                           response_format=_fmt({"type": "string", "pattern": pattern}))
        err = got.value.body if isinstance(got.value.body, dict) else {}
        assert err.get("param") == "response_format.json_schema", err
        assert "schema.pattern" in err.get("message", "") and "GRAMMAR_REPEAT_" in err["message"], err
    tool = {"type": "function", "function": {"name": "find", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "pattern": COSTLY[1]}}}}}
    with pytest.raises(openai.BadRequestError) as got:
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, tools=[tool])
    err = got.value.body if isinstance(got.value.body, dict) else {}
    assert "properties.q.pattern" in json.dumps(err) and "GRAMMAR_REPEAT_" in err.get("message", ""), err

    tree = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "A family tree as JSON."}], max_tokens=200,
        temperature=0, response_format=_fmt(TREE))
    runner.join(timeout=300)
    assert not runner.is_alive() and plain["text"].strip(), plain
    assert plain["gap"] < MAX_GAP_S, plain
    answer = tree.choices[0]
    if answer.finish_reason == "stop":  # a tree the model closed: valid all the way down
        value = json.loads(answer.message.content or "")
        assert isinstance(value["name"], str) and isinstance(value["children"], list), value
    else:  # cut by max_tokens: still the start of a tree
        assert answer.finish_reason == "length" and (answer.message.content or "").startswith("{"), answer
    client.close()
