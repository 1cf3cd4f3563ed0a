"""shared/tools.py: the call text's grammar, its parser and the prompt for templates that know no tools."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenfan.shared import structured
from tokenfan.shared import tools as toolcalls

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[dict[str, Any]] = [{"name": "get_weather", "parameters": WEATHER}, {"name": "ping"}]
RAW = (toolcalls.block("get_weather", '{"city": "O}s\\"lo{"} ') + "\n" + toolcalls.block("ping", "{}"))


def calls_of(pieces: list[toolcalls.Piece]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for p in pieces:
        if p.call is not None:
            c = out.setdefault(p.call, {"name": "", "arguments": ""})
            c["name"] += p.name or ""
            c["arguments"] += p.arguments
    return out


def parse(raw: str, cuts: list[int], auto: bool) -> list[toolcalls.Piece]:
    parser = toolcalls.CallParser(auto=auto)
    bounds = [0, *sorted(set(cuts)), len(raw)]
    pieces = [p for a, b in itertools.pairwise(bounds) for p in parser.feed(raw[a:b])]
    return pieces + parser.finish()


@given(st.lists(st.integers(min_value=1, max_value=len(RAW) - 1), max_size=30), st.booleans())
def test_calls_read_the_same_however_the_text_is_split(cuts: list[int], auto: bool) -> None:
    pieces = parse(RAW, cuts, auto)
    assert "".join(p.raw for p in pieces) == RAW  # nothing lost, nothing twice
    assert calls_of(pieces) == {0: {"name": "get_weather", "arguments": '{"city": "O}s\\"lo{"}'},
                                1: {"name": "ping", "arguments": "{}"}}
    assert not any(p.text for p in pieces)
    assert sum(p.name is not None for p in pieces) == 2  # each call's name once


@pytest.mark.parametrize("text", ["Hello there", "<b>bold</b>", "<tool", " <tool_call>"])
def test_auto_text_is_text_even_when_it_starts_like_a_call(text: str) -> None:
    for cut in range(1, len(text)):
        pieces = parse(text, [cut], auto=True)
        assert "".join(p.text for p in pieces) == text and not calls_of(pieces)


@pytest.mark.parametrize("after", ["\nDone.", "\n<tool>x", "\n<tool_call>{\"nom", " plain"])
@given(cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=12))
def test_text_after_the_calls_keeps_what_looked_like_another_block(after: str, cuts: list[int]) -> None:
    # Without a grammar the model may write text after its calls; the characters that matched the next
    # block's start before the text showed are text, not dropped.
    raw = toolcalls.block("ping", "{}") + after
    pieces = parse(raw, [c for c in cuts if c < len(raw)], auto=False)
    assert "".join(p.raw for p in pieces) == raw
    assert calls_of(pieces) == {0: {"name": "ping", "arguments": "{}"}}
    assert "".join(p.text for p in pieces) == after


def test_the_grammar_names_every_tool_and_bounds_the_calls() -> None:
    g = toolcalls.grammar(TOOLS, 3)
    assert '\\"name\\": \\"get_weather\\"' in g and '\\"name\\": \\"ping\\"' in g
    assert 'root ::= tool-block ("\\n" tool-block){0,2}' in g
    assert "root ::= tool-block\n" in toolcalls.grammar(TOOLS, 1) + "\n"


def test_check_names_the_bad_part_of_a_tools_parameters() -> None:
    bad = [TOOLS[0], {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "string", "maxLength": 10**6}}}}]
    with pytest.raises(structured.SchemaError) as got:
        toolcalls.check(bad)
    assert got.value.where == "1.function.parameters.properties.n.maxLength"


def test_render_without_template_support_puts_tools_calls_and_results_in_text() -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    plain, spec = toolcalls.render(msgs, TOOLS, knows_tools=False)
    assert spec is None and [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"].startswith("Be brief.") and json.dumps(TOOLS[0]) in plain[0]["content"]
    assert plain[2]["content"] == toolcalls.block("get_weather", '{"city": "Oslo"}')
    assert plain[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    native, spec = toolcalls.render(msgs, TOOLS, knows_tools=True)
    assert spec == [{"type": "function", "function": t} for t in TOOLS]
    assert native[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}


# The tool parts of a Hermes-form template (Qwen2.5's, cut down): what a model that knows tools was trained on.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}<|im_start|>assistant
"""


def test_a_template_that_knows_tools_gets_the_tools_the_calls_and_the_results_in_its_own_form() -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    assert toolcalls.template_knows_tools(HERMES_TEMPLATE)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    native, spec = toolcalls.render(msgs, TOOLS, knows_tools=True)
    prompt = Jinja2ChatFormatter(HERMES_TEMPLATE, "<|im_end|>", "")(messages=native, tools=spec).prompt
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n<tools>")
    for tool in spec or []:
        assert json.dumps(tool, ensure_ascii=False) in prompt  # each tool, as JSON
    # the earlier call in the template's form: the same call our parser reads (the arguments an object)
    call = prompt[prompt.index(toolcalls.OPEN):prompt.index("</tool_call>") + len("</tool_call>")]
    assert json.loads(call.removeprefix(toolcalls.OPEN).removesuffix("</tool_call>")) == {
        "name": "get_weather", "arguments": {"city": "Oslo"}}
    assert "<tool_response>\nsunny\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant") and prompt.count("Be brief.") == 1
