"""`tokenfan status`: the ops page's picture, in the terminal."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import httpx


def _table(title: str, head: list[str], rows: list[list[Any]]) -> str:
    cells = [head, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = [title, "  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    if not rows:
        lines.append("  (none)")
    return "\n".join(lines)


def render(snap: dict[str, Any]) -> str:
    parts = [
        _table("MODELS", ["model", "queue", "workers"],
               [[m["name"], m["queue_depth"], m["workers_live"]] for m in snap["models"]]),
        _table("WORKERS", ["worker", "model", "state", "stream", "jobs"],
               [[w["name"], w["model"], w["state"], w["stream"] or "-", w["jobs"]] for w in snap["workers"]]),
        _table("STREAMS", ["stream", "model", "status", "tokens", "tokens/s", "age s"],
               [[s["id"], s["model"], s["status"], s["tokens"], s["tokens_per_s"], s["age_s"]]
                for s in snap["streams"]]),
        _table("RECENT ERRORS", ["when", "stream", "code", "message"],
               [[time.strftime("%H:%M:%S", time.localtime(e["time"])), e["stream_id"], e["code"], e["message"]]
                for e in snap["errors"]]),
    ]
    return "\n\n".join(parts)


def run_status(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("TOKENFAN_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(f"{args.url}/v1/ops/snapshot", headers=headers, timeout=5.0)
    except httpx.HTTPError as exc:
        print(f"tokenfan: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        print(f"tokenfan: {resp.status_code} {resp.text}", file=sys.stderr)
        return 1
    print(render(resp.json()))
    return 0
