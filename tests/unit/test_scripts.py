"""Lua scripts with named keys and arguments (shared/scripts.py), and the scripts that use them."""

from __future__ import annotations

import re

import pytest

from tokenfan.shared import bus, events, keys, leases
from tokenfan.shared.bus import BusConfig
from tokenfan.shared.scripts import ARG_PREFIX, KEY_PREFIX, Script

SCRIPTS = {"publish": bus.PUBLISH, "last_seq": bus.LAST_SEQ_SCRIPT, "max_set": bus.MAX_SET,
           "acquire": leases.ACQUIRE, "reclaim": leases.RECLAIM, "renew": leases.RENEW, "handback": leases.HANDBACK}


def test_the_names_are_bound_in_order_above_the_body() -> None:
    s = Script(("log", "lease"), ("owner", "ttl_ms"), "return 1\n")
    assert s.lua == "local k_log, k_lease = KEYS[1], KEYS[2]\nlocal a_owner, a_ttl_ms = ARGV[1], ARGV[2]\nreturn 1\n"
    assert s.keys_for("S") == (keys.log("S"), keys.lease("S"))
    assert s.args_for(ttl_ms=5, owner="w") == ["w", 5]


def test_arguments_are_all_named_and_only_trailing_ones_may_be_left_off() -> None:
    s = Script(("lease",), ("owner", "seen", "attempt"), "")
    assert s.args_for(owner="w", seen=None, attempt=None) == ["w"]
    with pytest.raises(TypeError, match="missing"):
        s.args_for(owner="w", seen="x")
    with pytest.raises(TypeError, match="unknown"):
        s.args_for(owner="w", seen="x", attempt=1, extra=2)
    with pytest.raises(TypeError, match="trailing"):
        s.args_for(owner="w", seen=None, attempt=1)


def test_a_key_name_is_a_key_function_of_shared_keys() -> None:
    with pytest.raises(AttributeError):
        Script(("no_such_key",), (), "")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_no_script_counts_positions_and_every_name_it_reads_is_bound(name: str) -> None:
    script = SCRIPTS[name]
    body = script.lua.split("\n", 2 if script.arg_names else 1)[-1]
    assert "KEYS[" not in body and "ARGV[" not in body
    used = set(re.findall(rf"\b(?:{KEY_PREFIX}|{ARG_PREFIX})\w+", body))
    bound = {KEY_PREFIX + k for k in script.key_names} | {ARG_PREFIX + a for a in script.arg_names}
    assert used == bound, f"read but not bound: {sorted(used - bound)}; bound but never read: {sorted(bound - used)}"


def test_the_publish_call_sends_what_it_always_sent() -> None:
    """The per-token call: the same KEYS and ARGV, in the same order, as before they had names."""
    ev = events.Done(7, events.FinishReason.STOP)
    ks, args = bus._publish_args("S", "w1", ev, BusConfig(100, 60, 30, sharded=True))
    assert ks == (keys.log("S"), keys.channel("S"), keys.lease("S"), keys.state("S"), keys.cancel("S"),
                  keys.viewers("S"), keys.response("S"), keys.response_log("S"))
    assert args == ["w1", 7, ev.encode(), 100, 60, "1", 30, "1"]
