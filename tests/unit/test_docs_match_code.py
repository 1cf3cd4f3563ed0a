"""The docs' tables against the code they describe, so they cannot drift (issue 28).

Each test reads a table or list in docs/ and the code's own values: the
Redis key names (shared/keys.py), the metric names and types (the API's and
the worker's registries), the job outcomes (`JobOutcome`), the HTTP routes
(the app), and the finish and cancel reasons. The reasons are bare strings
in the code, so they are found where the code spells them: the arguments of
the calls that end a stream or a choice and set a cancel flag, the dict
entries and assignments that name them.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from tokenfan.api.app import create_app
from tokenfan.api.metrics import ApiMetrics
from tokenfan.api.routers import ROUTERS
from tokenfan.shared import keys
from tokenfan.shared.settings import ApiSettings
from tokenfan.shared.state import JobOutcome
from tokenfan.worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CODE = [ROOT / d for d in ("api", "shared", "worker")]


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def ticked(text: str) -> list[str]:
    """Every `code span` in a piece of Markdown."""
    return re.findall(r"`([^`]+)`", text)


def table_rows(text: str, first_cell: str) -> Iterator[list[str]]:
    """The cells of each table row whose first cell starts with `first_cell` (inside its backticks)."""
    for line in text.splitlines():
        if line.startswith(f"| `{first_cell}"):
            yield [c.strip() for c in line.strip().strip("|").split(" | ")]


def listed_after(text: str, label: str) -> set[str]:
    """The backticked items of the first parenthesis after `label`: "`finish_reason` (`stop`, ...)"."""
    m = re.search(re.escape(label) + r" \(([^)]*)\)", text)
    assert m, f"{label} is no longer followed by a list in parentheses"
    return set(ticked(m.group(1).split(";")[0]))


# --- Redis keys --------------------------------------------------------------------------------

PLACEHOLDERS = {"stream_id": "ID", "model": "{model}", "name": "{name}", "owner": "{owner}",
                "minute": "{minute}"}
NOT_KEYS = {"stream_tag", "stream_id_of", "stream_keys", "queue_name"}  # helpers; queue_name is RQ's name


def code_keys() -> set[str]:
    names = {keys.LEASES, keys.SWEEP}
    for fname, fn in inspect.getmembers(keys, inspect.isfunction):
        if fname.startswith("_") or fname in NOT_KEYS or fn.__module__ != keys.__name__:
            continue
        names.add(fn(*(PLACEHOLDERS[p] for p in inspect.signature(fn).parameters)))
    return names


def test_the_keys_table_lists_every_key_and_no_other() -> None:
    section = doc("protocol.md").split("## Redis keys", 1)[1].split("\n## ", 1)[0]
    documented = {k for row in table_rows(section, "") for k in ticked(row[0])}
    # RQ's queue list carries our queue name: it is our key too.
    assert documented == code_keys(), (
        f"in the code, not in docs/protocol.md: {sorted(code_keys() - documented)}; "
        f"in the docs, not in shared/keys.py: {sorted(documented - code_keys())}")


# --- metrics -----------------------------------------------------------------------------------

def code_metrics() -> dict[str, str]:
    """Exposed name -> type, from both registries (a counter is exposed with `_total`)."""
    out: dict[str, str] = {}
    for registry in (ApiMetrics(CollectorRegistry()).registry, WorkerMetrics("m", CollectorRegistry()).registry):
        for family in registry.collect():
            out[family.name + ("_total" if family.type == "counter" else "")] = family.type
    return out


def doc_metrics() -> dict[str, list[str]]:
    return {ticked(row[0])[0]: row for row in table_rows(doc("metrics.md"), "tokenfan_")}


def test_the_metrics_tables_list_every_metric_with_its_type() -> None:
    documented, code = doc_metrics(), code_metrics()
    assert set(documented) == set(code), (
        f"in the code, not in docs/metrics.md: {sorted(set(code) - set(documented))}; "
        f"in the docs, not in the code: {sorted(set(documented) - set(code))}")
    assert {name: row[1] for name, row in documented.items()} == code


def test_the_jobs_metric_lists_every_job_outcome() -> None:
    row = doc_metrics()["tokenfan_worker_jobs_total"]
    documented = set(ticked(row[3].split("by `outcome`:", 1)[1]))
    code = {o.value for o in JobOutcome}
    assert documented == code, f"docs/metrics.md lists the outcomes {sorted(documented)}; JobOutcome {sorted(code)}"


# --- routes --------------------------------------------------------------------------------------

def test_the_routes_table_lists_every_route() -> None:
    section = doc("protocol.md").split("## HTTP routes", 1)[1].split("\n## ", 1)[0]
    documented = {p for row in table_rows(section, "") for span in ticked(row[0]) for p in span.split()[-1:]}
    skip = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/", "/static"}  # docs/security.md's
    # The routers' own routes too: FastAPI may keep an included router as one entry of the app's routes.
    found = [*create_app(ApiSettings()).routes, *(r for router in ROUTERS for r in router.routes)]
    routes = {p for r in found if (p := getattr(r, "path", ""))} - skip
    routes = {p.replace("{model_id:path}", "{id}").replace("{stream_id}", "{id}").replace("{response_id}", "{id}")
              for p in routes}
    assert routes <= documented, f"routes missing from docs/protocol.md: {sorted(routes - documented)}"


# --- finish and cancel reasons -------------------------------------------------------------------

def _strings(node: ast.AST) -> set[str]:
    """The non-empty string constants in an expression, but for the key of a `.get(key, default)`."""
    looked_up = {id(n.args[0]) for n in ast.walk(node)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" and n.args}
    return {n.value for n in ast.walk(node)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value and id(n) not in looked_up}


def _called(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _dict_values(tree: ast.AST, key: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value == key and isinstance(v, ast.Constant):
                    found |= _strings(v)
    return found


def _scan(collect: Callable[[ast.AST], set[str]]) -> set[str]:
    found: set[str] = set()
    for folder in CODE:
        for path in folder.rglob("*.py"):
            found |= collect(ast.parse(path.read_text()))
    return found


# worker/batch.py ends a stream whose grammar is too slow with `_end(s, "error", "")` and at once sets its
# `finish` to None and its `error`: the stream ends with an `error` event, never with that finish reason.
NOT_FINISH_REASONS = {"error"}


def _finish_reasons(tree: ast.AST) -> set[str]:
    """`finish("x")`, `_end(stream, "x", ...)`, `choice_done(i, "x")`, `reason = "x"`, `{"finish_reason": "x"}`."""
    found = _dict_values(tree, "finish_reason")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called(node) in ("finish", "_end", "choice_done"):
            found |= {s for a in node.args for s in _strings(a)}
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "reason" for t in node.targets):
            found |= _strings(node.value)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Tuple) for t in node.targets):
            for t in node.targets:  # `toks, reason = ..., "stop" if ... else "length"`
                if isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    for el, val in zip(t.elts, node.value.elts, strict=False):
                        if isinstance(el, ast.Name) and el.id == "reason":
                            found |= _strings(val)
    return found


def _cancel_reasons(tree: ast.AST) -> set[str]:
    """`cancel_stream(..., "x")` and its default, `cancel.request(.., .., "x", ..)` (or `arequest`),
    `watch.cancel = "x"`."""
    found = _dict_values(tree, "cancel_reason")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called(node) == "cancel_stream":
            found |= {s for a in node.args[3:] for s in _strings(a)}
        if (isinstance(node, ast.Call) and _called(node) in ("request", "arequest")
                and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "cancel"):
            found |= {s for a in node.args[2:3] for s in _strings(a)}
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "cancel_stream":
            found |= {s for d in node.args.defaults for s in _strings(d)}
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "cancel"
                                                for t in node.targets):
            found |= _strings(node.value)
    return found


def test_the_done_event_lists_every_finish_reason() -> None:
    code = _scan(_finish_reasons) - NOT_FINISH_REASONS
    assert {"stop", "length", "tool_calls", "cancelled"} <= code  # the scan still finds what it should
    documented = listed_after(doc("protocol.md"), "`finish_reason`")
    assert documented == code, f"docs/protocol.md's done event lists {sorted(documented)}; the code {sorted(code)}"


def test_the_done_event_lists_every_cancel_reason() -> None:
    code = _scan(_cancel_reasons)
    assert {"client", "disconnect", "abandoned", "timeout"} <= code
    documented = listed_after(doc("protocol.md"), "`cancel_reason`")
    assert documented == code, f"docs/protocol.md's done event lists {sorted(documented)}; the code {sorted(code)}"
