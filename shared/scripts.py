"""Lua scripts whose keys and arguments have names.

A script states the names of its KEYS and of its ARGV once, here, and its
body reads them as Lua locals (`k_lease`, `a_owner`): `Script` writes the
lines that bind them (`local k_log, k_lease = KEYS[1], KEYS[2]`) above the
body, and builds the lists a call sends from the same names. So no body
says `KEYS[3]` and no caller counts positions.

A key's name is the name of its function in shared/keys.py, and every key
of one script is that function of one id (a stream id, a model): a stream's
keys so share its hash slot, as Redis Cluster requires of a script.

An argument passed as None at the end is left off ARGV, so an optional
argument reads as nil in the body.

The publish script is called for every token, so the names must add
nothing to its cost: a stream's KEYS are built once and kept (a tuple,
shared by its calls), and ARGV is picked from the names in one C call.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

from tokenfan.shared import keys
from tokenfan.shared.defaults import SCRIPT_KEYS_CACHED
from tokenfan.shared.state import AcquireResult, Field, StreamStatus

KEY_PREFIX = "k_"
ARG_PREFIX = "a_"

# The state hash's names the scripts spell (`$status`, `$running`, ...): shared/state.py defines them,
# and the scripts are the only code that changes a stream's status.
STATE_NAMES = {
    "status": Field.STATUS.value, "worker": Field.WORKER.value, "attempt": Field.ATTEMPT.value,
    "queued": StreamStatus.QUEUED.value, "running": StreamStatus.RUNNING.value,
    "finished": StreamStatus.FINISHED.value,
    "missing": AcquireResult.MISSING.value, "taken": AcquireResult.TAKEN.value,
}

# The log's last seq, as the local `last` (0 for an empty or missing log), for a script with a `log` key.
LAST_SEQ = """
local top = redis.call('XREVRANGE', k_log, '+', '-', 'COUNT', 1)
local last = 0
if #top > 0 then last = tonumber(string.match(top[1][1], '^(%d+)')) end
"""


def _bind(prefix: str, names: tuple[str, ...], table: str) -> str:
    if not names:
        return ""
    locals_ = ", ".join(prefix + n for n in names)
    values = ", ".join(f"{table}[{i}]" for i in range(1, len(names) + 1))
    return f"local {locals_} = {values}\n"


class Script:
    """One Lua script: its key names, its argument names, and its text with the names bound."""

    def __init__(self, key_names: tuple[str, ...], arg_names: tuple[str, ...], body: str) -> None:
        self.key_names = key_names
        self.arg_names = arg_names
        self._arg_set = frozenset(arg_names)
        self._pick = operator.itemgetter(*arg_names) if len(arg_names) > 1 else None
        key_fns: tuple[Callable[[str], str], ...] = tuple(getattr(keys, n) for n in key_names)
        self._keys: Callable[[str], tuple[str, ...]] = functools.lru_cache(maxsize=SCRIPT_KEYS_CACHED)(
            lambda ident: tuple(fn(ident) for fn in key_fns))
        self.lua = _bind(KEY_PREFIX, key_names, "KEYS") + _bind(ARG_PREFIX, arg_names, "ARGV") + body

    def keys_for(self, ident: str) -> tuple[str, ...]:
        """KEYS for one stream (or model): each named key function of `ident`, in order."""
        return self._keys(ident)

    def args_for(self, **named: Any) -> list[Any]:
        """ARGV from every argument by name (trailing Nones left off); a missing or unknown name is an error."""
        if named.keys() != self._arg_set:
            unknown = sorted(set(named) - self._arg_set)
            missing = [n for n in self.arg_names if n not in named]
            raise TypeError(f"script arguments: unknown {unknown}, missing {missing}")
        out = list(self._pick(named)) if self._pick is not None else [named[n] for n in self.arg_names]
        while out and out[-1] is None:
            out.pop()
        if None in out:
            raise TypeError("script arguments: only trailing ones may be None")
        return out

    def run(self, registered: Any, ident: str, **named: Any) -> Any:
        """Call the script as registered on a client (`redis.register_script(self.lua)`; an asyncio
        client's returns an awaitable) with the keys of `ident` and the arguments by name."""
        return registered(keys=self.keys_for(ident), args=self.args_for(**named))
