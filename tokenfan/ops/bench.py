"""`tokenfan bench`: see docs/benchmarks.md."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure relay overhead, capacity, TTFT and end-to-end speed")
    p.add_argument("scenario", nargs="*", default=[])


def run(args: argparse.Namespace) -> int:
    raise SystemExit("tokenfan bench: not built yet")
