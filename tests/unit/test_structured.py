"""Structured output at the edge: the schema checks (shared/structured.py), the converter kept in shared/,
and the fake engine's JSON answers."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tokenfan.shared import jsongrammar, structured
from tokenfan.worker.engines import FakeEngine, GenRequest, fake_json_tokens

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age"]}
# Schemas the converter turns into grammars: every kind of node it knows.
GOOD: list[dict[str, Any]] = [
    {"type": "object"},
    PERSON,
    {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]+$"},
    {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4},
    {"enum": ["red", "green", 3, None]},
    {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": ["string", "null"]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                      "id": {"type": "string", "format": "uuid"}},
     "additionalProperties": False},
    {"type": "object", "additionalProperties": {"type": "boolean"}},
    {"type": "array", "prefixItems": [{"type": "string"}, {"const": 1}]},
    {"type": "object", "properties": {"q": {"type": "string", "pattern": "^a(b|[\\]x])*$"}}},
]
# A schema, and the part the error must name.
BAD: list[tuple[Any, str]] = [
    ({"type": "string", "pattern": "^\\d+$"}, "pattern"),
    ({"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[\\d]{5}$"}}}, "properties.zip.pattern"),
    ({"type": "string", "pattern": "abc"}, "pattern"),
    ({"type": "string", "pattern": "^a\\.b$"}, "pattern"),
    ({"type": "string", "pattern": "^(ab$"}, "pattern"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "pattern"),
    ({"type": "string", "pattern": "^a{1,1999}$"}, "pattern"),
    ({"type": "string", "maxLength": 10**9}, "maxLength"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 5, "maxItems": 2}, "minItems"),
    ({"type": "object", "properties": {"a": {"type": "strnig"}}}, "properties.a.type"),
    ({"type": "object", "properties": {"a": "string"}}, "properties.a"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, ""),
    ({"anyOf": []}, "anyOf"),
    ({"type": "object", "required": "a"}, "required"),
    ({"enum": []}, "enum"),
    ({"type": "object", "additionalProperties": "no"}, "additionalProperties"),
    ("not an object", ""),
]


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}}
    return node


@pytest.mark.parametrize("schema", GOOD)
def test_the_converter_kept_in_shared_gives_llama_cpp_pythons_own_grammar(schema: dict[str, Any]) -> None:
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    ours = structured.check(schema)
    assert ours == llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    assert ours == jsongrammar.json_schema_to_gbnf(json.dumps(schema)) and "root ::=" in ours


@pytest.mark.parametrize(("schema", "where"), BAD)
def test_a_schema_the_converter_cannot_take_is_refused_naming_its_part(schema: Any, where: str) -> None:
    with pytest.raises(structured.SchemaError) as got:
        structured.check(schema)
    assert got.value.where == where, str(got.value)


def test_nesting_is_bounded() -> None:
    structured.check(_nested(structured.MAX_DEPTH - 1))
    with pytest.raises(structured.SchemaError, match="nests deeper"):
        structured.check(_nested(structured.MAX_DEPTH + 2))


def test_a_grammar_over_the_cap_and_too_many_properties_are_refused() -> None:
    with pytest.raises(structured.SchemaError, match="characters"):
        structured.check({"type": "object", "properties": {f"p{i}" + "x" * 1000: {"type": "string"}
                                                           for i in range(150)}})
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(structured.MAX_PROPERTIES + 1)}}
    with pytest.raises(structured.SchemaError) as got:
        structured.check(wide)
    assert got.value.where == "properties"
    structured.check({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(150)}})


def test_the_worker_side_grammar_of_json_object_is_the_converters() -> None:
    assert structured.grammar(dict(structured.JSON_OBJECT)) == structured.check({"type": "object"})


SIMPLE = [s for s in GOOD if "pattern" not in json.dumps(s) and "format" not in json.dumps(s)]


@pytest.mark.parametrize("schema", SIMPLE)
def test_the_fake_engines_json_matches_simple_schemas(schema: dict[str, Any]) -> None:
    value = json.loads("".join(fake_json_tokens([{"role": "user", "content": "hi"}], schema)))
    jsonschema.validate(value, schema)


def test_the_fake_engine_answers_json_and_ends_it_with_stop_or_cuts_it_with_length() -> None:
    eng = FakeEngine(rate=0, length=100, n_ctx=1000)
    msgs = [{"role": "user", "content": "a b c"}]
    pieces = list(eng.generate(GenRequest(msgs, max_tokens=50, json_schema=dict(structured.JSON_OBJECT))))
    assert json.loads("".join(t for t, _ in pieces)) == {"answer": "a b c"}
    assert pieces[-1][1] == "stop"
    cut = list(eng.generate(GenRequest(msgs, max_tokens=2, json_schema=PERSON)))
    assert len(cut) == 2 and cut[-1][1] == "length"
