"""The ops page's charts in headless Chromium: drawn from the API's own history and live feed, they move
under load, and they fit a phone's screen. Screenshots go to test-artifacts/e2e/ whatever the outcome."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.e2e.conftest import ARTIFACTS, PageLog
from tests.procs import Cluster, create_stream, read_stream, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.browser
CHARTS = ("tokens", "streams", "ttft", "slots", "errors")


class Load(threading.Thread):
    def __init__(self, base: str) -> None:
        super().__init__(daemon=True, name="load")
        self.base = base
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                sid = create_stream(self.base, f"chart me {n}", max_tokens=40)
                read_stream(self.base, sid, timeout=30)
                n += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def last_value(page: Page, chart: str) -> float:
    """The largest latest value among a chart's series (what its legend shows)."""
    values = page.eval_on_selector_all(f"#chart-{chart} path.line",
                                       "ps => ps.map(p => parseFloat(p.dataset.last)).filter(v => !isNaN(v))")
    return max(values, default=0.0)


def points(page: Page, chart: str) -> int:
    counts = page.eval_on_selector_all(f"#chart-{chart} path.line", "ps => ps.map(p => +p.dataset.points)")
    return max(counts, default=0)


def test_charts_move_under_load(cluster: Cluster, page: Page, page_log: PageLog) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="40", TOKENFAN_FAKE_TOKENS="200")
    page.goto(f"{api.url}/ops")
    page.locator("#chart-streams path.line").first.wait_for(state="attached")
    wait_for(lambda: last_value(page, "tokens") == 0 and points(page, "streams") >= 2, timeout=15,
             what="the idle charts")
    before = points(page, "streams")
    load = Load(api.url)
    load.start()
    try:
        wait_for(lambda: last_value(page, "tokens") > 0, timeout=30, what="tokens/s rising on the chart")
        wait_for(lambda: last_value(page, "streams") >= 1, timeout=30, what="a running stream on the chart")
        wait_for(lambda: last_value(page, "ttft") > 0, timeout=30, what="a time to first token on the chart")
        wait_for(lambda: last_value(page, "slots") >= 1, timeout=30, what="a busy slot on the chart")
        assert points(page, "streams") > before, "the charts take live samples"
        assert page.locator("#chart-tokens .legend li").filter(has_text="smollm2").count() == 1
        out = ARTIFACTS / "e2e"
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / "ops-charts-desktop.png"), full_page=True)
    finally:
        load.stop.set()
        load.join(60)
    assert load.error is None, load.error
    # The history endpoint is what a page opened later starts from.
    history = httpx.get(f"{api.url}/v1/ops/history", timeout=10).json()
    assert history["span_s"] == 900 and any(s["tokens_per_s"].get("smollm2") for s in history["samples"])
    assert not page_log.errors, str(page_log)


def test_charts_fit_a_phone(cluster: Cluster, browser: Browser) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="40")
    sid = create_stream(api.url, "a phone looks", max_tokens=30)
    read_stream(api.url, sid, timeout=30)
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(f"{api.url}/ops")
        wait_for(lambda: all(page.locator(f"#chart-{c} svg").count() == 1 for c in CHARTS), timeout=15,
                 what="every chart drawn")
        wait_for(lambda: points(page, "streams") >= 2, timeout=15, what="samples on the phone")
        widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], f"the page scrolls sideways on a phone: {widths}"
        for chart in CHARTS:
            box = page.locator(f"#chart-{chart}").bounding_box()
            assert box and box["width"] <= 390 and box["height"] > 100, (chart, box)
        out = ARTIFACTS / "e2e"
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / "ops-charts-phone.png"), full_page=True)
    finally:
        context.close()
