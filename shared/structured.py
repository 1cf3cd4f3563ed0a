"""Structured output: a JSON schema checked at the edge, turned into a llama.cpp grammar in the worker.

`response_format` `{"type": "json_object"}` is the schema `{"type": "object"}`;
`{"type": "json_schema", "json_schema": {"schema": …}}` is its schema. The job
carries the schema, not the grammar (smaller, readable in the ops page and the
stream record), and both sides convert it with the same code,
shared/jsongrammar.py (llama-cpp-python's converter, kept here because the API
installs without llama-cpp-python): the API to refuse, before any job is
enqueued, what the converter cannot turn into a grammar, the worker to build
the grammar sampler of the stream.

What the converter would accept but must not reach llama.cpp is refused here
too, each error naming the part of the schema (`properties.age.maxLength`):
- bounds (`minLength`, `maxLength`, `minItems`, `maxItems`, a pattern's
  `{m,n}`) over `MAX_REPEAT`: the converter spells a bound out as nested
  optional groups, so `"maxLength": 10**9` would build a grammar of gigabytes
  in the API, and a few thousand nest deep enough to overflow llama.cpp's
  recursive grammar parser in the worker; more than `MAX_PROPERTIES`
  properties in one object (the converter's work grows with their square);
- nesting deeper than `MAX_DEPTH`, patterns longer than `MAX_PATTERN`, a
  grammar longer than `MAX_GRAMMAR`;
- escapes llama.cpp's grammar parser does not know (`\\d`, `\\w`, `\\.` inside
  `[...]`: the converter copies a pattern's escapes into the grammar as they
  are, and llama.cpp would refuse the whole grammar in the worker).

What no check here can bound: how much work llama.cpp's grammar matcher does
per token for a highly ambiguous pattern (docs/openai.md says so).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Final

from tokenfan.shared import jsongrammar

JSON_OBJECT: Final[dict[str, Any]] = {"type": "object"}
# The largest bound the converter may spell out (a string's length, an array's items, a pattern's {m,n}).
MAX_REPEAT: Final = 256
# Schema nesting: far beyond any real response format, well within Python's and llama.cpp's recursion.
MAX_DEPTH: Final = 32
MAX_PATTERN: Final = 1000
# Properties of one object: the converter's work on optional ones grows with the square of their number
# (and recurses once per property), in the API's event loop. OpenAI's own limit is 100 in all.
MAX_PROPERTIES: Final = 200
# The converted grammar, in characters: a schema of a few hundred properties fits.
MAX_GRAMMAR: Final = 128 * 1024

TYPES: Final = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
BOUNDS: Final = ("minLength", "maxLength", "minItems", "maxItems")
SUBSCHEMA_LISTS: Final = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS: Final = ("properties", "$defs", "definitions")
# The escapes llama.cpp's grammar parser reads (parse_char in llama-grammar.cpp); anything else fails it.
GBNF_ESCAPES: Final = frozenset('xuUtrn\\"[]')
HEX_DIGITS: Final = {"x": 2, "u": 4, "U": 8}
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaError(ValueError):
    """A schema the converter cannot turn into a grammar, or one too large; `where` names the part."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


def check(schema: Any) -> str:
    """The grammar of a schema, after every check above; raises SchemaError naming the part."""
    if not isinstance(schema, dict):
        raise SchemaError("", "the schema must be a JSON object")
    _walk(schema, "", 0)
    try:
        grammar = jsongrammar.json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise SchemaError("", "the schema nests too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise SchemaError("", f"llama.cpp's converter cannot turn it into a grammar: {_short(exc)}") from None
    if len(grammar) > MAX_GRAMMAR:
        raise SchemaError("", f"its grammar has {len(grammar)} characters; at most {MAX_GRAMMAR} are allowed")
    _lint(grammar)
    return grammar


def grammar(schema: dict[str, Any]) -> str:
    """The grammar of a schema the API checked (the worker's side); raises SchemaError like `check`."""
    if schema == JSON_OBJECT:
        return _json_object()
    return check(schema)


@functools.cache
def _json_object() -> str:
    return jsongrammar.json_schema_to_gbnf(json.dumps(JSON_OBJECT))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"


def _join(where: str, key: str | int) -> str:
    return f"{where}.{key}" if where else str(key)


def _walk(node: Any, where: str, depth: int) -> None:
    if not isinstance(node, dict):
        raise SchemaError(where, "a schema must be a JSON object")
    if depth > MAX_DEPTH:
        raise SchemaError(where, f"the schema nests deeper than {MAX_DEPTH} levels")
    _check_type(node.get("type"), _join(where, "type"))
    _check_bounds(node, where)
    if "pattern" in node:
        _check_pattern(node["pattern"], _join(where, "pattern"))
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#/")):
        raise SchemaError(_join(where, "$ref"), "only local references (#/...) are supported")
    if "required" in node and not (isinstance(node["required"], list)
                                   and all(isinstance(r, str) for r in node["required"])):
        raise SchemaError(_join(where, "required"), "must be a list of property names")
    if "enum" in node and not (isinstance(node["enum"], list) and node["enum"]):
        raise SchemaError(_join(where, "enum"), "must be a non-empty list")
    for child, at in _children(node, where):
        _walk(child, at, depth + 1)


def _children(node: dict[str, Any], where: str) -> list[tuple[Any, str]]:
    found: list[tuple[Any, str]] = []
    for key in SUBSCHEMA_MAPS:
        if key in node:
            value = node[key]
            if not isinstance(value, dict):
                raise SchemaError(_join(where, key), "must be an object of schemas")
            if len(value) > MAX_PROPERTIES:
                raise SchemaError(_join(where, key), f"has more than {MAX_PROPERTIES} entries")
            found += [(v, _join(_join(where, key), k)) for k, v in value.items()]
    for key in SUBSCHEMA_LISTS:
        if key in node:
            value = node[key]
            if not isinstance(value, list) or not value:
                raise SchemaError(_join(where, key), "must be a non-empty list of schemas")
            found += [(v, _join(_join(where, key), i)) for i, v in enumerate(value)]
    return found + _item_children(node, where)


def _item_children(node: dict[str, Any], where: str) -> list[tuple[Any, str]]:
    found: list[tuple[Any, str]] = []
    items = node.get("items")
    if isinstance(items, list):
        found += [(v, _join(_join(where, "items"), i)) for i, v in enumerate(items)]
    elif items is not None:
        found.append((items, _join(where, "items")))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        found.append((extra, _join(where, "additionalProperties")))
    elif extra is not None and not isinstance(extra, bool):
        raise SchemaError(_join(where, "additionalProperties"), "must be a boolean or a schema")
    return found


def _check_type(kind: Any, where: str) -> None:
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if not isinstance(k, str) or k not in TYPES:
            raise SchemaError(where, f"unknown type {json.dumps(k)[:40]}; one of {', '.join(sorted(TYPES))}")


def _check_bounds(node: dict[str, Any], where: str) -> None:
    for key in BOUNDS:
        if key in node:
            v = node[key]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_REPEAT:
                raise SchemaError(_join(where, key), f"must be an integer from 0 to {MAX_REPEAT}")
    for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems")):
        if lo in node and hi in node and node[lo] > node[hi]:
            raise SchemaError(_join(where, lo), f"is greater than {hi}")


def _check_pattern(pattern: Any, where: str) -> None:
    if not isinstance(pattern, str):
        raise SchemaError(where, "must be a string")
    if len(pattern) > MAX_PATTERN:
        raise SchemaError(where, f"is longer than {MAX_PATTERN} characters")
    for m in _QUANTIFIER.finditer(pattern):
        if any(g and int(g) > MAX_REPEAT for g in m.groups()):
            raise SchemaError(where, f"the quantifier {m.group(0)} is over {MAX_REPEAT}")
    _check_groups(pattern, where)
    try:
        _lint(jsongrammar.pattern_to_gbnf(pattern))
    except SchemaError as exc:
        raise SchemaError(where, str(exc)) from None
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        raise SchemaError(where, f"llama.cpp's converter cannot turn it into a grammar: {_short(exc)}") from None


def _check_groups(pattern: str, where: str) -> None:
    """Parentheses balance (the converter lets `^(ab$` through) and nest at most MAX_DEPTH deep."""
    depth, i, in_class = 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 1
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c in "()":
            depth += 1 if c == "(" else -1
            if depth < 0:
                raise SchemaError(where, "unbalanced parentheses")
            if depth > MAX_DEPTH:
                raise SchemaError(where, f"groups nest deeper than {MAX_DEPTH}")
        i += 1
    if depth:
        raise SchemaError(where, "unbalanced parentheses")


def _lint(gbnf: str) -> None:
    """Every escape inside a grammar's literals and character classes is one llama.cpp reads."""
    closing = {'"': '"', "[": "]"}
    inside: str | None = None
    i = 0
    while i < len(gbnf):
        c = gbnf[i]
        if inside is None:
            inside = closing.get(c)
        elif c == "\\":
            nxt = gbnf[i + 1:i + 2]
            digits = HEX_DIGITS.get(nxt, 0)
            hexpart = gbnf[i + 2:i + 2 + digits]
            if nxt not in GBNF_ESCAPES or len(hexpart) != digits or not all(h in "0123456789abcdefABCDEF"
                                                                             for h in hexpart):
                raise SchemaError("", f"the escape \\{nxt} is not one llama.cpp's grammars know "
                                      "(use a character class such as [0-9] instead of \\d)")
            i += 1 + digits
        elif c == inside:
            inside = None
        i += 1


# --- what the fake engine answers ------------------------------------------

def example(schema: dict[str, Any], root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A small JSON value valid for simple schemas, made deterministically: the fake engine's answer.

    Objects get every property, strings the shortest length allowed, numbers their minimum or 0,
    arrays their fewest items, unions their first member. Patterns and formats are not honoured."""
    root = root if root is not None else schema
    if depth > MAX_DEPTH:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return example(target if isinstance(target, dict) else {}, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return example(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    return _example_of(kind, schema, root, depth)


def _example_of(kind: Any, schema: dict[str, Any], root: dict[str, Any], depth: int) -> Any:
    if kind == "string":
        return "x" * int(schema.get("minLength") or min(3, schema.get("maxLength", 3)))
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if kind == "array" and isinstance(schema.get("prefixItems"), list):
        return [example(v, root, depth + 1) for v in schema["prefixItems"] if isinstance(v, dict)]
    if kind == "array":
        items = schema.get("items")
        items = items if isinstance(items, dict) else {}
        return [example(items, root, depth + 1) for _ in range(int(schema.get("minItems", 0) or 1))]
    props = schema.get("properties") or {}
    if not props and kind is None and "additionalProperties" not in schema:
        return {"answer": "fake"}
    return {k: example(v, root, depth + 1) for k, v in props.items() if isinstance(v, dict)}
