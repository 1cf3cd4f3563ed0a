from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.procs import parse_sse
from tokenfan.shared import events
from tokenfan.shared.events import Event, decode


def test_event_encodes_flat_json_with_seq_type_ts() -> None:
    ev = Event(3, events.TOKEN, {"text": "hi"}, ts=12.5)
    assert orjson.loads(ev.encode()) == {"seq": 3, "type": "token", "ts": 12.5, "text": "hi"}


def test_sse_frame_has_id_event_and_one_data_line() -> None:
    frame = Event(7, events.DONE, {"finish_reason": "stop"}, ts=1.0).sse()
    assert frame.startswith(b"id: 7\nevent: done\ndata: {")
    assert frame.endswith(b"}\n\n")
    assert frame.count(b"\n") == 4


def test_decode_round_trips_and_rejects_garbage() -> None:
    ev = decode(Event(2, events.META, {"model": "m"}, ts=3.0).encode())
    assert (ev.seq, ev.type, ev.data, ev.ts) == (2, "meta", {"model": "m"}, 3.0)
    for bad in (b"[]", b'{"seq": "x", "type": "token"}', b'{"seq": 1, "type": "nope"}'):
        with pytest.raises((ValueError, KeyError)):
            decode(bad)


def test_terminal_types() -> None:
    assert Event(1, events.DONE).terminal and Event(1, events.ERROR).terminal
    assert not Event(1, events.TOKEN).terminal


@given(st.text())
def test_any_model_text_round_trips_through_sse_and_forges_nothing(text: str) -> None:
    frame = Event(5, events.TOKEN, {"text": text}, ts=1.0).sse().decode()
    parsed = list(parse_sse(iter(frame.split("\n"))))
    assert len(parsed) == 1
    assert parsed[0].id == "5" and parsed[0].event == "token"
    assert orjson.loads(parsed[0].data)["text"] == text
