"""Free TCP ports for the suite's processes, with no race between parallel pytest workers.

Binding port 0 and releasing it leaves a window in which another process that asks the kernel the same
way can be handed the same port before the first one's server binds it. Under pytest-xdist several
workers ask at once. So each worker hands out ports from a block of its own, below the kernel's
ephemeral range (which bind(0) and outgoing connections draw from): no other worker and no kernel
pick can hand out the same port. Each port is checked with a bind before it is handed out (something
else on the machine may listen there), and a worker cycles through its block.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

BASE = 20000
BLOCK = 800  # ports per worker; a worker's processes never hold that many at once


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def worker_index() -> int:
    """0 for a run without xdist, 1 + N for xdist's worker gwN."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) + 1 if name.startswith("gw") and name[2:].isdigit() else 0


def block() -> range:
    start = BASE + worker_index() * BLOCK
    if start + BLOCK > _ephemeral_low():
        raise RuntimeError(f"pytest worker {worker_index()}: no port block below the ephemeral range "
                           f"({_ephemeral_low()}); run fewer workers")
    return range(start, start + BLOCK)


_ports = itertools.cycle(block())


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, from this worker's own block."""
    for _ in range(BLOCK):
        port = next(_ports)
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port left in {block()}")
