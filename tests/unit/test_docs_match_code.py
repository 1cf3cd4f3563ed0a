"""The docs' tables against the code they describe, so they cannot drift (issue 28).

Each test reads a table or list in docs/ and the code's own values: the
Redis key names (shared/keys.py), the metric names and types (the API's and
the worker's registries), the job outcomes (`JobOutcome`), the HTTP routes
(the app), the event types and the finish and cancel reasons (the enums of
shared/events.py).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from tokenfan.api.app import create_app
from tokenfan.api.metrics import ApiMetrics
from tokenfan.api.routers import ROUTERS
from tokenfan.shared import events, keys
from tokenfan.shared.events import CancelReason, FinishReason
from tokenfan.shared.settings import ApiSettings
from tokenfan.shared.state import JobOutcome
from tokenfan.worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


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


# --- events, finish and cancel reasons -----------------------------------------------------------

def test_the_events_tables_list_every_event_type() -> None:
    section = doc("protocol.md").split("## Events (native format)", 1)[1].split("\n## ", 1)[0]
    logged, made = section.split("Events the API makes itself", 1)
    assert {ticked(row[0])[0] for row in table_rows(logged, "")} == set(events.TYPES)
    assert {ticked(row[0])[0] for row in table_rows(made, "")} == set(events.EventType) - events.TYPES


def test_the_done_event_lists_every_finish_reason() -> None:
    documented = listed_after(doc("protocol.md"), "`finish_reason`")
    code = {r.value for r in FinishReason}
    assert documented == code, f"docs/protocol.md's done event lists {sorted(documented)}; FinishReason {sorted(code)}"


def test_the_done_event_lists_every_cancel_reason() -> None:
    documented = listed_after(doc("protocol.md"), "`cancel_reason`")
    code = {r.value for r in CancelReason}
    assert documented == code, f"docs/protocol.md's done event lists {sorted(documented)}; CancelReason {sorted(code)}"
