"""The ops page (`/ops`) in headless Chromium, and the snapshot it is built from, against real processes."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.e2e.conftest import PageLog
from tests.procs import SSE, Cluster, create_stream, read_stream, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser


class Reader(threading.Thread):
    """Follows one stream to its end in the background, so it is watched (not abandoned)."""

    def __init__(self, base: str, sid: str) -> None:
        super().__init__(daemon=True, name=f"reader-{sid}")
        self.base, self.sid = base, sid
        self.status = 0
        self.events: list[SSE] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.status, self.events = read_stream(self.base, self.sid, timeout=60)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


def snapshot(base: str) -> dict[str, Any]:
    resp = httpx.get(f"{base}/v1/ops/snapshot", timeout=5)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def tokens_cell(page: Page, sid: str) -> int:
    text = page.locator(f'#streams tr[data-stream-id="{sid}"] .tokens').text_content() or ""
    return int(text)


def test_ops_page_shows_live_numbers(cluster: Cluster, page: Page, page_log: PageLog) -> None:
    api = cluster.api()
    # One slot, so that the second stream waits in the queue and the page shows it queued.
    worker = cluster.worker(TOKENFAN_FAKE_RATE="10", TOKENFAN_FAKE_TOKENS="200", TOKENFAN_SLOTS="1")
    sid = create_stream(api.url, "watch me on the ops page", max_tokens=200)
    reader = Reader(api.url, sid)
    reader.start()
    queued_sid = ""
    try:
        wait_for(lambda: any(s["id"] == sid and s["status"] == "running" and s["tokens"] > 0
                             for s in snapshot(api.url)["streams"]), timeout=15, what="the stream running")

        page.goto(f"{api.url}/ops")
        row = page.locator(f'#streams tr[data-stream-id="{sid}"]')
        row.wait_for(timeout=15_000)
        first = tokens_cell(page, sid)
        deadline = time.monotonic() + 10
        second = first
        while second <= first:
            assert time.monotonic() < deadline, f"the tokens cell stayed at {first}"
            page.wait_for_timeout(250)
            second = tokens_cell(page, sid)
        assert second > first

        assert row.locator("td").nth(2).text_content() == "running"
        assert row.locator("td").nth(3).text_content() == worker.name
        wrow = page.locator(f'#workers tbody tr[data-worker="{worker.name}"]')
        wrow.wait_for(timeout=10_000)
        assert wrow.locator(".state-busy").text_content() == "busy"
        assert page.locator("#models tbody td").first.text_content() == "smollm2"
        assert page.locator("#models tbody tr").filter(has_text="smollm2").count() == 1
        assert page.locator("#ops-status").text_content() == ""
        assert "1 active stream" in (page.locator("#totals").text_content() or "")

        # The JSON the page renders: the running stream, then a second one queued behind it.
        snap = snapshot(api.url)
        running = [s for s in snap["streams"] if s["id"] == sid]
        assert running and running[0]["status"] == "running" and running[0]["worker"] == worker.name
        assert any(w["name"] == worker.name and w["state"] == "busy" and w["stream"] == sid
                   for w in snap["workers"])
        queued_sid = create_stream(api.url, "wait your turn", max_tokens=5)
        snap = snapshot(api.url)
        queued = [s for s in snap["streams"] if s["id"] == queued_sid]
        assert queued and queued[0]["status"] == "queued", snap["streams"]
        model = [m for m in snap["models"] if m["name"] == "smollm2"]
        assert model and model[0]["queue_depth"] >= 1 and model[0]["workers_live"] == 1, snap["models"]
        assert snap["totals"]["queued"] >= 1 and snap["totals"]["active_streams"] >= 1
        # ... and the page shows it too, within a feed interval or two
        page.locator(f'#streams tr[data-stream-id="{queued_sid}"]').filter(has_text="queued").wait_for(
            timeout=10_000)
        assert not page_log.errors, str(page_log)
    finally:
        for s in (sid, queued_sid):
            if s:
                httpx.delete(f"{api.url}/v1/streams/{s}", timeout=5)
        reader.join(30)
    assert reader.error is None, reader.error
    assert reader.status == 200 and reader.events and reader.events[-1].event == "done"
