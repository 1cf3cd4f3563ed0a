from __future__ import annotations

import orjson
import pytest

from tokenfan.shared import events
from tokenfan.shared.events import Event, decode


def test_event_encodes_flat_json_with_seq_type_ts() -> None:
    ev = Event(3, events.TOKEN, {"text": "hi"}, ts=12.5)
    assert orjson.loads(ev.encode()) == {"seq": 3, "type": "token", "ts": 12.5, "text": "hi"}


def test_decode_round_trips_and_rejects_garbage() -> None:
    ev = decode(Event(2, events.META, {"model": "m"}, ts=3.0).encode())
    assert (ev.seq, ev.type, ev.data, ev.ts) == (2, "meta", {"model": "m"}, 3.0)
    for bad in (b"[]", b'{"seq": "x", "type": "token"}', b'{"seq": 1, "type": "nope"}'):
        with pytest.raises((ValueError, KeyError)):
            decode(bad)


def test_terminal_types() -> None:
    assert Event(1, events.DONE).terminal and Event(1, events.ERROR).terminal
    assert not Event(1, events.TOKEN).terminal
