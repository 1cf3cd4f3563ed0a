"""GrammarThread: a grammar call past its budget is left to end on its own, at the lowest CPU priority,
and the next call gets a thread of its own at the caller's."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.procs import wait_for
from tokenfan.shared.defaults import LEFTOVER_NICE
from tokenfan.worker.batch import GrammarThread

HANG_GUARD_S = 30.0


def _nice(tid: int) -> int:
    """A thread's nice value, from /proc (field 19 of its stat line)."""
    after_name = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(after_name[16])


def test_a_call_past_its_budget_runs_on_at_the_lowest_priority_and_is_cleaned_up() -> None:
    release, started = threading.Event(), {}
    cleaned: list[object] = []

    def slow() -> str:
        started["tid"] = threading.get_native_id()
        release.wait(HANG_GUARD_S)
        return "late"

    caller = _nice(threading.get_native_id())
    grammar = GrammarThread()
    assert grammar.call(slow, 0.05, cleaned.append) == (False, None) and grammar.running == 1
    wait_for(lambda: "tid" in started, HANG_GUARD_S, what="the call to start")
    assert _nice(started["tid"]) == LEFTOVER_NICE != caller

    ok, tid = grammar.call(threading.get_native_id, HANG_GUARD_S, cleaned.append)
    assert ok and tid != started["tid"] and _nice(tid) == caller  # the next call: a new thread, not demoted

    release.set()
    wait_for(lambda: grammar.running == 0, HANG_GUARD_S, what="the late call to end")
    assert cleaned == ["late"]  # what the late call made is handed to its cleanup, once
