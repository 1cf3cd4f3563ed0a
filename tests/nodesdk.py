"""The official Node SDK (npm `openai`) for the tests: installed once into the test cache (outside the
repository, beside tests/docker.py's), pinned to the version the issue's users ran, and run on a script
of tests/node/ that prints what it got as JSON."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

# The SDK version the tests ran (issue 26's users: 6.49).
OPENAI_NODE = "6.49.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenfan-test" / "node"
SCRIPTS = Path(__file__).parent / "node"
# npm's install and one script's run: generous, so a wedged one fails instead of hanging the suite.
INSTALL_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120


def node_modules() -> Path:
    """The cache's node_modules with the pinned SDK, installed by npm when missing (skips without Node)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    modules = CACHE / "node_modules"
    manifest = modules / "openai" / "package.json"
    CACHE.mkdir(parents=True, exist_ok=True)
    # One install at a time: parallel pytest workers share the cache, and two npm runs in one prefix
    # corrupt it. A worker that waited finds it done.
    with (CACHE / "install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not manifest.exists() or json.loads(manifest.read_text())["version"] != OPENAI_NODE:
            subprocess.run(["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--no-save",
                            f"openai@{OPENAI_NODE}"], check=True, timeout=INSTALL_TIMEOUT_S, capture_output=True)
    return modules


def run(script: str, *args: str) -> dict[str, Any]:
    """Run tests/node/`script` with the SDK; its JSON output, or a failure with its stderr."""
    env = {**os.environ, "NODE_PATH": str(node_modules())}
    done = subprocess.run(["node", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"node {script} failed:\n{done.stderr}"
    out: dict[str, Any] = json.loads(done.stdout)
    return out
