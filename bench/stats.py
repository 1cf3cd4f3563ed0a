"""Small statistics for `tokenfan bench`: percentiles without numpy."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# Percentiles every latency summary carries.
PERCENTILES = (50, 90, 95, 99, 99.9)


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summary(values: Iterable[float], scale: float = 1.0, digits: int = 3) -> dict[str, Any]:
    """count, mean, min, max and the usual percentiles, each multiplied by `scale`."""
    ordered = sorted(v * scale for v in values)
    out: dict[str, Any] = {"count": len(ordered)}
    if not ordered:
        return out
    out["mean"] = round(sum(ordered) / len(ordered), digits)
    out["min"] = round(ordered[0], digits)
    for p in PERCENTILES:
        out[_name(p)] = round(percentile(ordered, p), digits)
    out["max"] = round(ordered[-1], digits)
    return out


def _name(p: float) -> str:
    return f"p{p:g}".replace(".", "_")


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 50)


def alternating_pairs(sides: Sequence[str], pairs: int,
                      run: Callable[[str, int], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`run(side, pair)` for every side, `pairs` times, the order reversed every other pair so that
    neither side always goes first on a noisy machine; each side's results in order."""
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for i in range(pairs):
        for side in sides if i % 2 == 0 else sides[::-1]:
            runs[side].append(run(side, i))
    return runs


def side_medians(runs: dict[str, list[dict[str, Any]]], keys: Iterable[str]) -> dict[str, dict[str, float]]:
    """Each side's median of each figure over its runs."""
    keys = list(keys)
    return {side: {key: median([r[key] for r in rows]) for key in keys} for side, rows in runs.items()}


def pair_cells(a: dict[str, Any], b: dict[str, Any], keys: Iterable[str]) -> str:
    """One pair's figures as table cells, `a / b`."""
    return " | ".join(f"{a[k]:,} / {b[k]:,}" for k in keys)
