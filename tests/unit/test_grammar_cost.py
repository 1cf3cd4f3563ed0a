"""What a grammar may cost llama.cpp is bounded at the edge (issue 27): the bounds let real schemas and
tool lists through (tests/unit/real_schemas.py) and refuse the costly ones, naming the part and the limit."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.real_schemas import SCHEMAS, TOOL_LISTS
from tokenfan.shared import defaults, structured
from tokenfan.shared import tools as toolcalls

CLASSES = ["[a-z]", "[a-zA-Z0-9]", "[0-9a-f]", ".", "[^,]"]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_real_response_formats_pass_the_bounds(name: str) -> None:
    assert "root ::=" in structured.check(SCHEMAS[name])


@pytest.mark.parametrize("name", sorted(TOOL_LISTS))
def test_real_tool_lists_pass_the_bounds(name: str) -> None:
    toolcalls.check(TOOL_LISTS[name])


@pytest.mark.parametrize("pattern", ["^((((a{0,256}){0,256}){0,256}){0,256})$", "^((a{0,256}){0,256})$",
                                     "^" + "[a-z]*" * 100 + "$"])
def test_the_patterns_that_wedged_a_worker_are_refused_naming_the_part(pattern: str) -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": pattern}}}
    with pytest.raises(structured.SchemaError, match="GRAMMAR_REPEAT_") as got:
        structured.check(schema)
    assert got.value.where == "properties.code.pattern"


def _open_nest(klass: str, bounds: list[int]) -> str:
    """`klass` repeated {0,b0}, in a group repeated {0,b1}, in a group ...: nothing ends a repetition."""
    body = f"{klass}{{0,{bounds[0]}}}"
    for b in bounds[1:]:
        body = f"({body}){{0,{b}}}"
    return f"^{body}$"


@given(st.sampled_from(CLASSES), st.lists(st.integers(2, 300), min_size=2, max_size=5))
def test_nested_open_repeats_past_the_bounds_are_refused(klass: str, bounds: list[int]) -> None:
    outer, total, nested = 1, 1, len(bounds)
    for b in bounds[1:]:
        outer *= b
    for b in bounds:
        total *= b
    costly = (outer > defaults.GRAMMAR_REPEAT_SPLITS or total > defaults.GRAMMAR_REPEAT_PRODUCT
              or nested > defaults.GRAMMAR_REPEAT_NESTING)
    schema = {"type": "string", "pattern": _open_nest(klass, bounds)}
    if costly:
        with pytest.raises(structured.SchemaError, match="GRAMMAR_REPEAT_") as got:
            structured.check(schema)
        assert got.value.where == "pattern"
    else:
        structured.check(schema)


@given(st.sampled_from(CLASSES), st.integers(1, 40), st.sampled_from(["*", "+", "?", "{0,5}", "{1,3}"]))
def test_variable_repeats_in_a_row_are_bounded(klass: str, count: int, quantifier: str) -> None:
    schema = {"type": "string", "pattern": "^" + f"{klass}{quantifier}" * count + "$"}
    if count > defaults.GRAMMAR_REPEAT_SPLITS:
        with pytest.raises(structured.SchemaError, match="GRAMMAR_REPEAT_SPLITS"):
            structured.check(schema)
    else:
        structured.check(schema)


@settings(max_examples=50)
@given(st.integers(1, 64), st.integers(1, 16), st.sampled_from(["-", ",", "[.]", "[|]", "@"]))
def test_a_fixed_character_ending_each_repetition_lets_large_repeats_through(inner: int, outer: int,
                                                                             end: str) -> None:
    structured.check({"type": "string", "pattern": f"^([a-z0-9]{{1,{inner}}}{end}){{0,{outer}}}$"})


def test_enums_and_unions_are_bounded_by_count_and_size() -> None:
    n = defaults.GRAMMAR_ENUM_VALUES
    structured.check({"enum": list(range(n))})
    with pytest.raises(structured.SchemaError, match="GRAMMAR_ENUM_VALUES") as got:
        structured.check({"type": "object", "properties": {"k": {"enum": list(range(n + 1))}}})
    assert got.value.where == "properties.k.enum"
    with pytest.raises(structured.SchemaError, match="GRAMMAR_ENUM_BYTES") as got:  # the issue's 256 x 256
        structured.check({"enum": [f"{i:03d}" + "a" * 253 for i in range(256)]})
    assert got.value.where == "enum"
    width = defaults.GRAMMAR_ALTERNATIVES
    with pytest.raises(structured.SchemaError, match="GRAMMAR_ALTERNATIVES") as got:
        structured.check({"anyOf": [{"const": i} for i in range(width + 1)]})
    assert got.value.where == "anyOf"
    with pytest.raises(structured.SchemaError, match="GRAMMAR_ALTERNATIVES"):
        pattern = "^(" + "|".join(chr(0x100 + i) for i in range(width + 1)) + ")$"
        structured.check({"type": "string", "pattern": pattern})


def test_the_grammars_rules_are_bounded() -> None:
    schema = SCHEMAS["invoice"]
    rules = structured.check(schema).count(" ::= ")
    fewer = structured.Limits(rules=rules - 1)
    with pytest.raises(structured.SchemaError, match=f"{rules} rules.*TOKENFAN_GRAMMAR_RULES"):
        structured.check(schema, fewer)
    with pytest.raises(structured.SchemaError, match=r"the tools' grammar has .* rules"):
        toolcalls.check([{"name": "t", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}]
                        * 40, fewer)


def test_a_tools_costly_pattern_names_the_tool_and_the_part() -> None:
    bad = {"type": "object", "properties": {"q": {"type": "string", "pattern": "^((a{0,256}){0,256})$"}}}
    with pytest.raises(structured.SchemaError) as got:
        toolcalls.check([*TOOL_LISTS["weather"], {"name": "find", "parameters": bad}])
    assert got.value.where == "2.function.parameters.properties.q.pattern"


RECURSIVE = ["ui_tree", "linked_list", "file_tree_root_ref", "org_chart", "json_expression"]


@pytest.mark.parametrize("name", RECURSIVE)
def test_recursive_schemas_become_recursive_rules(name: str) -> None:
    grammar = structured.check(SCHEMAS[name])
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    assert any(_reaches(rules, rule, rule) for rule in rules), grammar


def _reaches(rules: dict[str, str], start: str, goal: str) -> bool:
    seen: set[str] = set()
    todo = [start]
    while todo:
        words = set(rules[todo.pop()].replace('"', " ").replace("(", " ").replace(")", " ").split())
        for name in words & rules.keys():
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return False


@pytest.mark.parametrize("schema", [
    {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "string"}]}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}},
     "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/a"}]}}},
    {"anyOf": [{"$ref": "#"}, {"type": "integer"}]},
])
def test_a_ref_cycle_that_reads_nothing_is_refused_as_left_recursion(schema: dict[str, Any]) -> None:
    with pytest.raises(structured.SchemaError, match="left recursion") as got:
        structured.check(schema)
    assert got.value.where == "$ref"


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    """SmolLM2's vocabulary alone (no weights, no decode): what llama.cpp's grammar parser needs."""
    ll = pytest.importorskip("llama_cpp")
    from tokenfan.worker.engines import bundled_model_path

    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(str(bundled_model_path()).encode(), params)
    assert model
    yield ll, ll.llama_model_get_vocab(model)
    ll.llama_model_free(model)


@pytest.mark.parametrize("name", [*RECURSIVE, "invoice", "person_profile", "package_manifest"])
def test_llama_cpp_parses_the_grammars_of_recursive_and_real_schemas(vocab: Any, name: str) -> None:
    ll, v = vocab
    sampler = ll.llama_sampler_init_grammar(v, structured.check(SCHEMAS[name]).encode(), b"root")
    assert sampler, name
    n = ll.llama_vocab_n_tokens(v)
    data = (ll.llama_token_data * n)(*[(i, 0.0, 0.0) for i in range(n)])
    cand = ll.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    ll.llama_sampler_apply(sampler, ctypes.byref(cand))
    allowed = sum(1 for i in range(n) if data[i].logit != float("-inf"))
    ll.llama_sampler_free(sampler)
    assert 0 < allowed < n / 100  # an object's `{`, with or without a space: a handful of tokens


@settings(max_examples=300)
@given(st.text(alphabet="ab[]()|{}*+?^$.\\-,0123456789", max_size=40))
def test_any_pattern_text_is_converted_or_refused_never_a_crash(pattern: str) -> None:
    try:
        structured.check({"type": "string", "pattern": pattern})
    except structured.SchemaError as exc:
        assert exc.where == "pattern" or exc.where == "", exc


@pytest.mark.parametrize("pattern", ["^][]{a5$", "^a]$", "^a}b$", "^}$"])
def test_a_stray_bracket_is_refused_not_spun_on(pattern: str) -> None:
    """llama.cpp's converter never moved past a `]` or `}` outside a class or quantifier: the request
    spun the process that checked it for ever."""
    with pytest.raises(structured.SchemaError, match="Unexpected") as got:
        structured.check({"type": "string", "pattern": pattern})
    assert got.value.where == "pattern"


@pytest.mark.parametrize("pattern", ["^([[a]{0,3}x){0,4}$", "^([a--b]{0,3}-){0,4}$", "^([a&&b]*x)*$"])
def test_classes_python_warns_about_are_read_without_a_warning(pattern: str) -> None:
    """A class Python's `re` would warn about (future set syntax) is taken as matching anything: the
    warnings are errors in this suite, and would have been a 500 at the edge."""
    try:
        structured.check({"type": "string", "pattern": pattern})
    except structured.SchemaError as exc:
        assert exc.where == "pattern"


@pytest.mark.parametrize("pattern", ["^a**$", "^a?*$", "^b+*$", "^|*$", "^a|+b$", "^(*a)$", "^{2}a$"])
def test_repeats_llama_cpp_cannot_parse_are_refused_at_the_edge(pattern: str) -> None:
    """The converter writes these into grammars llama.cpp's parser refuses (a repeat of a bare repeat,
    nothing to repeat): the worker would fail the stream; the edge says why first."""
    with pytest.raises(structured.SchemaError, match="repeat") as got:
        structured.check({"type": "string", "pattern": pattern})
    assert got.value.where == "pattern"


@pytest.mark.parametrize("pattern", ["^a*?$", "^a+?$", "^(a*)*$", "^a{2}?$", "^(a?)+$"])
def test_lazy_and_grouped_repeats_still_convert(pattern: str) -> None:
    structured.check({"type": "string", "pattern": pattern})
