"""The batch engine's pure parts: text pieces at UTF-8 and stop-sequence boundaries, and slot choice."""

from __future__ import annotations

from tokenfan.worker.batch import Slot, Stream, TextOut, common_prefix, pick_slot


def test_a_character_split_over_two_tokens_is_sent_whole() -> None:
    out = TextOut([])
    e_acute = "é".encode()
    assert out.push(b"caf" + e_acute[:1]) == ("caf", False)
    assert out.push(e_acute[1:] + b"!") == ("é!", False)
    assert out.flush() == ""


def test_a_truncated_character_at_the_end_becomes_a_replacement_mark() -> None:
    out = TextOut([])
    assert out.push("→".encode()[:2]) == ("", False)
    assert out.flush() == "\ufffd"


def test_text_that_may_start_a_stop_sequence_is_held_back() -> None:
    out = TextOut(["END"])
    assert out.push(b"it is E") == ("it is ", False)
    assert out.push(b"N") == ("", False)
    assert out.push(b"d") == ("ENd", False)  # not the stop after all: sent


def test_a_stop_sequence_across_tokens_ends_the_text_before_it() -> None:
    out = TextOut(["\n\n", "END"])
    assert out.push(b"one E") == ("one ", False)
    assert out.push(b"ND two") == ("", True)


def test_the_earliest_stop_sequence_wins() -> None:
    out = TextOut(["b", "a"])
    assert out.push(b"xxabc") == ("xx", True)


def test_held_back_text_is_flushed_at_the_end() -> None:
    out = TextOut(["STOP"])
    assert out.push(b"go ST") == ("go ", False)
    assert out.flush() == "ST"


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def _slot(seq: int, tokens: list[int], used: float, busy: bool = False) -> Slot:
    slot = Slot(seq, tokens, used)
    if busy:
        slot.stream = Stream("k", slot, [], None, TextOut([]), 1)
    return slot


def test_the_free_slot_with_the_longest_common_prefix_is_picked() -> None:
    slots = [_slot(0, [1, 2, 3, 4], 1.0, busy=True), _slot(1, [1, 2], 2.0), _slot(2, [1, 2, 3], 3.0)]
    assert pick_slot(slots, [1, 2, 3, 4, 5]) is slots[2]  # slot 0 shares more but is busy


def test_on_a_tie_the_least_recently_used_slot_is_picked() -> None:
    slots = [_slot(0, [9], 5.0), _slot(1, [], 1.0), _slot(2, [8], 3.0)]
    assert pick_slot(slots, [1, 2]) is slots[1]


def test_no_free_slot() -> None:
    assert pick_slot([_slot(0, [], 0.0, busy=True)], [1]) is None
