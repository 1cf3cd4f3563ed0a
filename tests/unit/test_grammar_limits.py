"""The grammar limits are settings (issue 27): `structured.Limits` made from `CommonSettings`, passed to the
checks, each refusal naming its variable; a schema the defaults refuse passes a raised limit, and one they
let through is refused under a lowered one."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest

from tokenfan.shared import structured
from tokenfan.shared import tools as toolcalls
from tokenfan.shared.settings import ENV_PREFIX, CommonSettings

# Per limit: a schema just past the default, the value that lets it through, and one within the default.
PAST_THE_DEFAULT: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = {
    "repeat": ({"type": "string", "maxLength": 1001}, 1001, {"type": "string", "maxLength": 1000}),
    "repeat_product": ({"type": "string", "pattern": "^(a{0,64}-){0,32}$"}, 2048,
                       {"type": "string", "pattern": "^(a{0,32}-){0,32}$"}),
    "repeat_nesting": ({"type": "string", "pattern": "^((((a-)?b-)?c-)?d-)?$"}, 4,
                       {"type": "string", "pattern": "^(((a-)?b-)?c-)?$"}),
    "repeat_splits": ({"type": "string", "pattern": "^" + "[a-z]*" * 9 + "$"}, 9,
                      {"type": "string", "pattern": "^" + "[a-z]*" * 8 + "$"}),
    "alternatives": ({"anyOf": [{"const": i} for i in range(257)]}, 257, {"anyOf": [{"const": i} for i in range(256)]}),
    "enum_values": ({"enum": list(range(513))}, 513, {"enum": list(range(512))}),
    "enum_bytes": ({"enum": [f"{i:03d}" + "a" * 97 for i in range(170)]}, 17680,
                   {"enum": [f"{i:03d}" + "a" * 97 for i in range(150)]}),
}


@pytest.mark.parametrize("name", sorted(PAST_THE_DEFAULT))
def test_a_schema_past_a_default_passes_with_the_limit_raised(name: str) -> None:
    costly, enough, _ = PAST_THE_DEFAULT[name]
    with pytest.raises(structured.SchemaError, match=rf"\({structured.setting(name)}\)$"):
        structured.check(costly)
    raised = replace(structured.Limits(), **{name: enough})
    assert "root ::=" in structured.check(costly, raised)
    with pytest.raises(structured.SchemaError, match=structured.setting(name)):
        structured.check(costly, replace(raised, **{name: enough - 1}))


@pytest.mark.parametrize("name", sorted(PAST_THE_DEFAULT))
def test_a_schema_within_a_default_is_refused_with_the_limit_lowered(name: str) -> None:
    _, _, modest = PAST_THE_DEFAULT[name]
    structured.check(modest)
    lowered = replace(structured.Limits(), **{name: 1})
    with pytest.raises(structured.SchemaError, match=rf"\({structured.setting(name)}\)$"):
        structured.check(modest, lowered)
    tools = [{"name": "t", "parameters": {"type": "object", "properties": {"a": modest}}}]
    toolcalls.check(tools)
    with pytest.raises(structured.SchemaError, match=structured.setting(name)) as got:
        toolcalls.check(tools, lowered)
    assert got.value.where.startswith("0.function.parameters.properties.a")


def test_every_limit_is_a_setting_named_as_refusals_name_it() -> None:
    names = [f.name for f in fields(structured.Limits)]
    assert set(PAST_THE_DEFAULT) | {"rules"} == set(names)
    given = {f"grammar_{n}": 100 + i for i, n in enumerate(names)}
    limits = structured.Limits.of(CommonSettings(**given))  # type: ignore[arg-type]
    assert limits == structured.Limits(**{n: 100 + i for i, n in enumerate(names)})
    assert structured.Limits.of(CommonSettings()) == structured.Limits()
    for n in names:
        assert structured.setting(n) == ENV_PREFIX + f"grammar_{n}".upper()
        assert f"grammar_{n}" in CommonSettings.model_fields
