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
  `{m,n}`) over `GRAMMAR_REPEAT`: the converter spells a bound out as nested
  optional groups, so `"maxLength": 10**9` would build a grammar of gigabytes
  in the API, and a few thousand nest deep enough to overflow llama.cpp's
  recursive grammar parser in the worker; more than `MAX_PROPERTIES`
  properties in one object (the converter's work grows with their square);
- nesting deeper than `MAX_DEPTH`, patterns longer than `MAX_PATTERN`, a
  grammar longer than `MAX_GRAMMAR`;
- escapes llama.cpp's grammar parser does not know (`\\d`, `\\w`, `\\.` inside
  `[...]`: the converter copies a pattern's escapes into the grammar as they
  are, and llama.cpp would refuse the whole grammar in the worker);
- what makes llama.cpp's grammar matcher slow per token (issue 27): it keeps
  one stack per way the text so far can be read and walks every candidate
  token through every stack, so a pattern's nested repeats (the product of
  their bounds, `GRAMMAR_REPEAT_PRODUCT`, and their nesting), the variable
  repeats one piece of text may be shared among (`GRAMMAR_REPEAT_SPLITS`), wide alternations and enums
  (`GRAMMAR_ALTERNATIVES`, `GRAMMAR_ENUM_VALUES`, `GRAMMAR_ENUM_BYTES`) and the
  grammar's rule count (`GRAMMAR_RULES`) are bounded (shared/defaults.py says
  why each value).

Those bounds are `Limits`, one frozen value made from the settings at each
entry point (`Limits.of`: the API's edge, the worker's engine) and passed to
`check`; each refusal names its setting (`TOKENFAN_GRAMMAR_REPEAT_PRODUCT`),
so whoever meets one knows what to raise. The API and the worker must agree:
they are `CommonSettings`.

Recursive schemas (`$ref` cycles: a tree) convert as llama.cpp converts them,
into recursive rules; the walk here never follows a `$ref` (it checks `$defs`
where they are), so it ends whatever the cycles, and the text's nesting is
bounded by the stream's max_tokens. A cycle that reads no character before it
comes back (`a: anyOf [$ref a, ...]`) is left recursion, which llama.cpp
refuses: refused here first.

What no check here can bound exactly, the worker bounds while sampling: a
per-token time budget for the grammar (worker/batch.py).

One module past 400 lines on purpose: every bound on what a schema may cost is
checked in one walk over the schema; split, its rules would sit in files that must agree.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Final

from tokenfan.shared import defaults as d
from tokenfan.shared import jsongrammar

if TYPE_CHECKING:
    from tokenfan.shared.settings import CommonSettings

JSON_OBJECT: Final[dict[str, Any]] = {"type": "object"}
# Schema nesting: far beyond any real response format, well within Python's and llama.cpp's recursion.
MAX_DEPTH: Final = 32
MAX_PATTERN: Final = 1000
# Properties of one object: the converter's work on optional ones grows with the square of their number
# (and recurses once per property), in the API's event loop. OpenAI's own limit is 100 in all.
MAX_PROPERTIES: Final = 200
# The converted grammar, in characters: a schema of a few hundred properties fits.
MAX_GRAMMAR: Final = 128 * 1024
# What `*` and `+` count in the product of nested repeats: unbounded, but one stack walks them.
UNBOUNDED_FACTOR: Final = 2

TYPES: Final = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
BOUNDS: Final = ("minLength", "maxLength", "minItems", "maxItems")
SUBSCHEMA_LISTS: Final = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS: Final = ("properties", "$defs", "definitions")
# The escapes llama.cpp's grammar parser reads (parse_char in llama-grammar.cpp); anything else fails it.
GBNF_ESCAPES: Final = frozenset('xuUtrn\\"[]')
HEX_DIGITS: Final = {"x": 2, "u": 4, "U": 8}
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


@dataclass(frozen=True)
class Limits:
    """The grammar bounds a schema is checked against; each field is the setting `grammar_<field>`
    (`TOKENFAN_GRAMMAR_<FIELD>`), its default in shared/defaults.py with the figures."""

    repeat: int = d.GRAMMAR_REPEAT  # the largest bound spelled out: a length, items, a pattern's {m,n}
    repeat_product: int = d.GRAMMAR_REPEAT_PRODUCT
    repeat_nesting: int = d.GRAMMAR_REPEAT_NESTING
    repeat_splits: int = d.GRAMMAR_REPEAT_SPLITS
    alternatives: int = d.GRAMMAR_ALTERNATIVES
    enum_values: int = d.GRAMMAR_ENUM_VALUES
    enum_bytes: int = d.GRAMMAR_ENUM_BYTES
    rules: int = d.GRAMMAR_RULES

    @classmethod
    def of(cls, settings: CommonSettings) -> Limits:
        return cls(**{f.name: getattr(settings, f"grammar_{f.name}") for f in fields(cls)})


DEFAULT_LIMITS: Final = Limits()


def setting(limit: str) -> str:
    """The environment variable of a `Limits` field, as refusals name it."""
    return f"TOKENFAN_GRAMMAR_{limit.upper()}"


class SchemaError(ValueError):
    """A schema the converter cannot turn into a grammar, or one too large; `where` names the part."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


def check(schema: Any, limits: Limits = DEFAULT_LIMITS) -> str:
    """The grammar of a schema, after every check above; raises SchemaError naming the part."""
    if not isinstance(schema, dict):
        raise SchemaError("", "the schema must be a JSON object")
    _walk(schema, "", 0, limits)
    _check_cycles(schema)
    try:
        grammar = jsongrammar.json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise SchemaError("", "the schema nests too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise SchemaError("", f"llama.cpp's converter cannot turn it into a grammar: {_short(exc)}") from None
    check_size(grammar, "its grammar", limits)
    _lint(grammar)
    return grammar


def check_size(grammar: str, what: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """A converted grammar's characters and rules are within MAX_GRAMMAR and `limits.rules`."""
    if len(grammar) > MAX_GRAMMAR:
        raise SchemaError("", f"{what} has {len(grammar)} characters; at most {MAX_GRAMMAR} are allowed")
    rules = grammar.count(" ::= ")
    if rules > limits.rules:
        raise SchemaError("", f"{what} has {rules} rules; at most {limits.rules} are allowed ({setting('rules')})")


def grammar(schema: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> str:
    """The grammar of a schema the API checked (the worker's side); raises SchemaError like `check`."""
    if schema == JSON_OBJECT:
        return _json_object()
    return check(schema, limits)


@functools.cache
def _json_object() -> str:
    return jsongrammar.json_schema_to_gbnf(json.dumps(JSON_OBJECT))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"


def _join(where: str, key: str | int) -> str:
    return f"{where}.{key}" if where else str(key)


def _walk(node: Any, where: str, depth: int, limits: Limits) -> None:
    if not isinstance(node, dict):
        raise SchemaError(where, "a schema must be a JSON object")
    if depth > MAX_DEPTH:
        raise SchemaError(where, f"the schema nests deeper than {MAX_DEPTH} levels")
    _check_type(node.get("type"), _join(where, "type"))
    _check_bounds(node, where, limits.repeat)
    if "pattern" in node:
        _check_pattern(node["pattern"], _join(where, "pattern"), limits)
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/"))):
        raise SchemaError(_join(where, "$ref"), "only local references (# or #/...) are supported")
    if "required" in node and not (isinstance(node["required"], list)
                                   and all(isinstance(r, str) for r in node["required"])):
        raise SchemaError(_join(where, "required"), "must be a list of property names")
    if "enum" in node:
        _check_enum(node["enum"], _join(where, "enum"), limits)
    for child, at in _children(node, where, limits.alternatives):
        _walk(child, at, depth + 1, limits)


def _children(node: dict[str, Any], where: str, alternatives: int) -> list[tuple[Any, str]]:
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
            if key in ("anyOf", "oneOf") and len(value) > alternatives:
                raise SchemaError(_join(where, key), f"has {len(value)} alternatives; at most {alternatives} "
                                                     f"are allowed ({setting('alternatives')})")
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


def _check_cycles(schema: dict[str, Any]) -> None:
    """No `$ref` comes back to itself through refs and unions alone (`a: anyOf [{$ref a}, ...]`): that is
    left recursion, which llama.cpp refuses in the worker. A cycle through an object's properties or an
    array's items reads a `{` or `[` first, and is a recursive schema like any tree: fine."""
    state: dict[str, bool] = {}  # False: on the path being followed; True: done, no cycle from it

    def follow(ref: str, depth: int) -> None:
        if state.get(ref) is False or depth > MAX_DEPTH:
            raise SchemaError("$ref", f"{ref} refers back to itself before any object or array: "
                                      "left recursion, which llama.cpp's grammars cannot hold")
        if ref in state:
            return
        state[ref] = False
        for nxt in _heads(_target(schema, ref)):
            follow(nxt, depth + 1)
        state[ref] = True

    for ref in _refs_in(schema):
        follow(ref, 0)


def _heads(node: Any) -> list[str]:
    """The refs a node may begin with, as the converter visits it (a `$ref` is all it sees of a node)."""
    if not isinstance(node, dict):
        return []
    ref = node.get("$ref")
    if isinstance(ref, str):
        return [ref]
    members = node.get("oneOf") or node.get("anyOf") or []
    return [r for m in members for r in _heads(m)] if isinstance(members, list) else []


def _target(schema: dict[str, Any], ref: str) -> Any:
    node: Any = schema
    for part in ref[2:].split("/") if ref != "#" else []:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _refs_in(schema: Any) -> list[str]:
    """Every `$ref` string in a schema (a stack, not recursion: the walk bounded its depth already)."""
    found, todo = [], [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                found.append(node["$ref"])
            todo += node.values()
        elif isinstance(node, list):
            todo += node
    return found


def _check_type(kind: Any, where: str) -> None:
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if not isinstance(k, str) or k not in TYPES:
            raise SchemaError(where, f"unknown type {json.dumps(k)[:40]}; one of {', '.join(sorted(TYPES))}")


def _check_enum(values: Any, where: str, limits: Limits) -> None:
    if not (isinstance(values, list) and values):
        raise SchemaError(where, "must be a non-empty list")
    if len(values) > limits.enum_values:
        raise SchemaError(where, f"has {len(values)} values; at most {limits.enum_values} are allowed "
                                 f"({setting('enum_values')})")
    size = len(json.dumps(values).encode())
    if size > limits.enum_bytes:
        raise SchemaError(where, f"its values take {size} bytes of JSON; at most {limits.enum_bytes} are allowed "
                                 f"({setting('enum_bytes')})")


def _check_bounds(node: dict[str, Any], where: str, most: int) -> None:
    for key in BOUNDS:
        if key in node:
            v = node[key]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= most:
                raise SchemaError(_join(where, key), f"must be an integer from 0 to {most} ({setting('repeat')})")
    for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems")):
        if lo in node and hi in node and node[lo] > node[hi]:
            raise SchemaError(_join(where, lo), f"is greater than {hi}")


def _check_pattern(pattern: Any, where: str, limits: Limits) -> None:
    if not isinstance(pattern, str):
        raise SchemaError(where, "must be a string")
    if len(pattern) > MAX_PATTERN:
        raise SchemaError(where, f"is longer than {MAX_PATTERN} characters")
    for m in _QUANTIFIER.finditer(pattern):
        if any(g and int(g) > limits.repeat for g in m.groups()):
            raise SchemaError(where, f"the quantifier {m.group(0)} is over {limits.repeat} ({setting('repeat')})")
    _check_groups(pattern, where)
    PatternCost(pattern, where, limits).check()
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


@dataclass(frozen=True)
class _Cost:
    """What a part of a pattern costs the matcher: the largest product of its nested repeats' bounds,
    how deep they nest, and `splits`: among how many variable repeats one piece of text may be shared
    (each way to share it is a stack of llama.cpp's matcher). `chars` and `classes` are the part's
    own fixed characters and character classes, to tell whether a fixed character delimits it."""

    product: int = 1
    nesting: int = 0
    splits: int = 0
    chars: frozenset[str] = frozenset()
    classes: tuple[str, ...] = ()

    def join(self, other: _Cost) -> _Cost:
        return _Cost(max(self.product, other.product), max(self.nesting, other.nesting),
                     max(self.splits, other.splits), self.chars | other.chars, self.classes + other.classes)

    def delimited(self) -> bool:
        """Whether a fixed character of its own, matched by none of its classes, ends each repetition."""
        return any(not any(_in_class(c, k) for k in self.classes) for c in self.chars)


def _in_class(char: str, klass: str) -> bool:
    """Whether a class may match the character (when in doubt, yes: it then delimits nothing)."""
    try:
        with warnings.catch_warnings():  # `[[`, `--`, `&&` in a class: Python warns of future set syntax
            warnings.simplefilter("error")
            return re.fullmatch(klass, char) is not None
    except (re.error, FutureWarning):
        return True


class PatternCost:
    """A pattern's nested repeats and alternations, against the bounds of its `Limits`.

    A small reader of what the converter takes (groups, classes, escapes, `|`, `* + ? {m,n}`), run
    after `_check_groups` balanced the parentheses: a group costs the most of its alternatives, a
    repeat multiplies what it repeats by its upper bound (`*` and `+` by UNBOUNDED_FACTOR). Measured
    with SmolLM2's vocabulary (49,152 tokens), per token: `([a-z]{0,8}){0,8}` 0.05 s,
    `([a-z]{0,8}){0,16}` 2.3 s, `([a-z]{0,16}){0,16}` over 20 s, while `([a-z]{0,16}-){0,16}`, whose
    `-` ends each repetition, takes 0.007 s; 8 `[a-z]*` in a row 0.012 s, 16 of them 0.33 s."""

    def __init__(self, pattern: str, where: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.p, self.where, self.i, self.limits = pattern, where, 0, limits

    def check(self) -> _Cost:
        cost = self._alternation()
        while self.i < len(self.p):  # a stray `)`, which the converter refuses anyway
            self.i += 1
            cost = cost.join(self._alternation())
        return cost

    def _alternation(self) -> _Cost:
        cost, branches, run = _Cost(), 1, 0
        while self.i < len(self.p) and self.p[self.i] != ")":
            if self.p[self.i] in "^$|":
                if self.p[self.i] == "|":
                    branches, run = branches + 1, 0
                    most = self.limits.alternatives
                    self._check(branches <= most, f"a group has more than {most} alternatives "
                                                  f"({setting('alternatives')})")
                self.i += 1
                continue
            self._check(self._quantifier_at(self.i) is None, f"nothing to repeat before {self.p[self.i]!r} at "
                                                             f"{self.i}")
            part = self._repeated(*self._atom())
            run = run + part.splits if part.splits else 0
            self._check(run <= self.limits.repeat_splits, f"text may be shared among {run} variable repeats in a "
                        f"row; at most {self.limits.repeat_splits} are allowed ({setting('repeat_splits')})")
            cost = cost.join(part)
            cost = _Cost(cost.product, cost.nesting, max(cost.splits, run), cost.chars, cost.classes)
        return cost

    def _atom(self) -> tuple[_Cost, bool]:
        """The next atom's cost, and whether it is a group."""
        c, start = self.p[self.i], self.i
        self.i += 1
        if c == "(":
            inner = self._alternation()
            self.i += 1
            return inner, True
        if c == "[":
            while self.i < len(self.p) and self.p[self.i] != "]":
                self.i += 2 if self.p[self.i] == "\\" else 1
            self.i += 1
            klass = self.p[start:self.i]
            if re.fullmatch(r"\[\\?[^]^\\]\]", klass):  # `[.]`: one character, as JSON schemas write it
                return _Cost(chars=frozenset(klass[-2])), False
            return _Cost(classes=(klass,)), False
        if c == ".":
            return _Cost(classes=(".",)), False
        if c == "\\":
            self.i += 1
            c = self.p[self.i - 1:self.i]
        return _Cost(chars=frozenset(c)), False

    def _repeated(self, cost: _Cost, group: bool) -> _Cost:
        after = ""
        while (q := self._quantifier()) is not None:
            c = self.p[self.i - 1]
            self._check(not (after in ("*", "+", "?") and c in "*+"), f"{c!r} right after {after!r} at {self.i - 1} "
                        "(llama.cpp's grammars cannot repeat a repeat without a group)")
            after = c
            factor, variable = q
            if group and not cost.delimited():
                splits = max(cost.splits, 1) * factor if variable or cost.splits else 0
            else:
                splits = 1 if variable else 0
            chars, classes = cost.chars, cost.classes
            if variable:  # a character that may be absent or repeated ends nothing: it is one more class
                chars, classes = frozenset(), classes + tuple(re.escape(c) for c in sorted(chars))
            cost = _Cost(cost.product * factor, cost.nesting + 1, splits, chars, classes)
            self._check_cost(cost)
        return cost

    def _check_cost(self, cost: _Cost) -> None:
        lim = self.limits
        self._check(cost.nesting <= lim.repeat_nesting, f"repeats nest more than {lim.repeat_nesting} deep "
                                                        f"({setting('repeat_nesting')})")
        self._check(cost.product <= lim.repeat_product, f"nested repeats allow {cost.product} repetitions; at "
                                                        f"most {lim.repeat_product} are allowed "
                                                        f"({setting('repeat_product')})")
        self._check(cost.splits <= lim.repeat_splits, f"text may be shared among {cost.splits} repetitions of a "
                                                      f"group; at most {lim.repeat_splits} are allowed (a fixed "
                                                      f"character in the group ends each one) "
                                                      f"({setting('repeat_splits')})")

    def _quantifier_at(self, i: int) -> str | None:
        """The quantifier that starts at `i`, if one does."""
        if self.p[i:i + 1] in ("*", "+", "?"):
            return self.p[i]
        m = _QUANTIFIER.match(self.p, i)
        return m.group(0) if self.p[i:i + 1] == "{" and m is not None else None

    def _quantifier(self) -> tuple[int, bool] | None:
        """The next quantifier's upper bound (as a factor) and whether it allows more than one count."""
        c = self.p[self.i:self.i + 1]
        if c in ("*", "+", "?"):
            self.i += 1
            return (1 if c == "?" else UNBOUNDED_FACTOR), True
        m = _QUANTIFIER.match(self.p, self.i)
        if c != "{" or m is None:
            return None
        self.i = m.end()
        lo, hi = int(m.group(1) or 0), m.group(2)
        if "," not in m.group(0):
            return max(lo, 1), False
        if not hi:
            return lo + UNBOUNDED_FACTOR, True
        return max(int(hi), 1), int(hi) != lo

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            raise SchemaError(self.where, message)


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
