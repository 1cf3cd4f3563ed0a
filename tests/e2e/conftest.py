"""Browser fixtures: headless Debian Chromium driven by Playwright's sync API.

The browser is the system's `chromium` (Playwright's own download is never
used). A missing Playwright or Chromium fails the test with what to install,
it never skips: a browser test that silently does not run proves nothing.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.procs import Cluster, Proc, log_name, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
# Playwright's own wait, in ms: long enough for a slow CI box, short enough to fail well inside 180 s.
DEFAULT_TIMEOUT_MS = 30_000


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.fail(f"Chromium is not installed (looked for `chromium` on PATH and {path}); "
                    "install Debian's `chromium` package to run the browser tests", pytrace=False)
    return path


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"Playwright for Python is not installed ({exc}); `pip install playwright` "
                    "(the browser is the system's chromium: no `playwright install` needed)", pytrace=False)
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    b = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


class PageLog:
    """JavaScript errors and console errors of one page, for assertions and failure reports."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.console: list[str] = []

    def __str__(self) -> str:
        return f"page errors: {self.errors}; console errors: {self.console}"


@pytest.fixture
def page_log() -> PageLog:
    return PageLog()


@pytest.fixture
def page(browser: Browser, page_log: PageLog, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh context per test (its own sessionStorage), 1024x768."""
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    pg = context.new_page()
    pg.on("pageerror", lambda exc: page_log.errors.append(str(exc)))
    pg.on("console", lambda msg: page_log.console.append(msg.text) if msg.type == "error" else None)
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        out = ARTIFACTS / "e2e"
        out.mkdir(parents=True, exist_ok=True)
        name = log_name(request)
        try:
            pg.screenshot(path=str(out / f"{name}.png"), full_page=True)
        except Exception:  # the page may be gone; the failure itself matters more
            pass
    context.close()


def restart_api(cluster: Cluster, port: int, **env: str) -> Proc:
    """A new API process on `port` (the one a killed API listened on), waited for."""
    deadline = time.monotonic() + 30
    while True:
        proc = cluster._spawn("api", ["--port", str(port)], dict(env))
        proc.port = port
        try:
            wait_for(functools.partial(_healthy_or_dead, proc), timeout=30, what=f"API restarted on port {port}")
        except AssertionError:
            proc.stop()
            raise
        if proc.alive():
            return proc
        # The port was not free yet (a socket of the killed process lingering): try again.
        if time.monotonic() > deadline:
            raise AssertionError(f"could not restart the API on port {port}:\n{proc.log()}")
        time.sleep(0.2)


def _healthy_or_dead(proc: Proc) -> bool:
    if not proc.alive():
        return True
    return httpx.get(f"{proc.url}/healthz", timeout=1.0).status_code == 200


def kill_hard(proc: Proc) -> None:
    """SIGKILL, as a crash: no graceful shutdown, open connections cut."""
    proc.signal(signal.SIGKILL)
    proc.popen.wait(10)
