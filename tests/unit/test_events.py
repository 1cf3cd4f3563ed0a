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


def test_a_cancel_flag_reads_as_its_reason_and_an_unknown_one_as_a_clients() -> None:
    assert events.CancelReason.of_flag(b"abandoned") is events.CancelReason.ABANDONED
    assert events.CancelReason.of_flag("timeout") is events.CancelReason.TIMEOUT
    assert events.CancelReason.of_flag(b"a-reason-of-a-newer-api") is events.CancelReason.CLIENT
    assert events.CancelReason.of_flag(None) is events.CancelReason.CLIENT


def test_reasons_are_their_plain_values_in_json() -> None:
    ev = Event(4, events.DONE, {"finish_reason": events.FinishReason.CANCELLED,
                                "cancel_reason": events.CancelReason.DISCONNECT}, ts=1.0)
    assert ev.encode() == b'{"seq":4,"type":"done","ts":1.0,"finish_reason":"cancelled","cancel_reason":"disconnect"}'
