"""`tokenfan chat "prompt"`: stream an answer in the terminal, resuming if the connection drops."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator

import httpx
import orjson

RECONNECT_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 5.0)


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str, str]]:
    """(id, event, data) per SSE event; comments skipped."""
    ev_id, kind, data = "", "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield ev_id, kind, "\n".join(data)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            ev_id = value
        elif field == "event":
            kind = value
        elif field == "data":
            data.append(value)


def run_chat(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("TOKENFAN_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict[str, object] = {"messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.max_tokens}
    if args.model:
        body["model"] = args.model
    with httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(10.0, read=60.0)) as client:
        created = client.post("/v1/streams", json=body)
        if created.status_code != 201:
            print(f"tokenfan: {created.status_code} {created.text}", file=sys.stderr)
            return 1
        return _follow(client, created.json()["id"])


def _follow(client: httpx.Client, sid: str) -> int:
    last, failures = "0", 0
    while True:
        try:
            with client.stream("GET", f"/v1/streams/{sid}", headers={"Last-Event-ID": last}) as resp:
                if resp.status_code == 204:
                    return 0
                if resp.status_code != 200:
                    print(f"\ntokenfan: {resp.status_code} {resp.read().decode()}", file=sys.stderr)
                    return 1
                for ev_id, kind, data in sse_events(resp.iter_lines()):
                    last = ev_id or last
                    failures = 0
                    if _show(kind, orjson.loads(data)):
                        return 0 if kind == "done" else 1
        except httpx.TransportError:
            pass
        failures += 1
        time.sleep(RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S)) - 1])


def _show(kind: str, ev: dict[str, object]) -> bool:
    """Print one event; True when it ends the stream."""
    if kind == "token":
        sys.stdout.write(str(ev.get("text", "")))
        sys.stdout.flush()
    elif kind == "disclosure":
        print(f"[{ev.get('text')}]", file=sys.stderr)
    elif kind == "queued":
        print(f"[queued, position {ev.get('position')}]", file=sys.stderr)
    elif kind == "done":
        t = ev.get("timings") or {}
        u = ev.get("usage") or {}
        assert isinstance(t, dict) and isinstance(u, dict)
        print(f"\n[{ev.get('finish_reason')}: {u.get('completion_tokens')} tokens, "
              f"first token {t.get('ttft_ms')} ms, {t.get('tokens_per_s')} tokens/s, worker {t.get('worker')}]",
              file=sys.stderr)
        return True
    elif kind == "error":
        print(f"\n[error {ev.get('code')}: {ev.get('message')}]", file=sys.stderr)
        return True
    return False
