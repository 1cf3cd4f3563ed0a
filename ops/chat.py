"""`tokenfan chat "prompt"`: stream an answer in the terminal, resuming if the connection drops.

SSE is parsed by httpx-sse, as by the tests and the benchmark: its `id` is
the last one seen (the spec's last event id), which is what a resume sends.
An event without data is skipped, as the spec does: httpx-sse 0.4 yields one
for a blank line once an id was seen (florimondmanca/httpx-sse#35). Our own
pings are a comment line with no blank line, so they yield nothing; an API
of another version, or a proxy, may still send the blank line.

A dropped connection is resumed from the last event, but not for ever: when
no event arrives for `--timeout` seconds (an API that stays unreachable, or
one that died and none took its place), chat gives up with one line and exit
code 1. A stream that waits for a worker still gets `queued` events, and one
whose worker died gets its takeover or its `error` from the server, so a live
API never looks stalled for that long.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx
from httpx_sse import connect_sse

from tokenfan.shared import events

RECONNECT_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 5.0)
# Seconds a connection may take to open.
CONNECT_TIMEOUT_S = 10.0


def run_chat(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("TOKENFAN_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict[str, object] = {"messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.max_tokens}
    if args.model:
        body["model"] = args.model
    timeout = httpx.Timeout(min(CONNECT_TIMEOUT_S, args.timeout), read=args.timeout)
    with httpx.Client(base_url=args.url, headers=headers, timeout=timeout) as client:
        try:
            created = client.post("/v1/streams", json=body)
        except httpx.TransportError as exc:
            print(f"tokenfan: cannot reach the API at {args.url} (--url): {exc}", file=sys.stderr)
            return 2
        if created.status_code != 201:
            print(f"tokenfan: {created.status_code} {created.text}", file=sys.stderr)
            return 1
        return _follow(client, created.json()["id"], args.timeout)


def _follow(client: httpx.Client, sid: str, timeout: float) -> int:
    last, failures = "0", 0
    progress = time.monotonic()
    while True:
        if time.monotonic() - progress > timeout:
            print(f"\ntokenfan: no event from the API at {client.base_url} for {timeout:g}s (--timeout); giving up "
                  f"on stream {sid}", file=sys.stderr)
            return 1
        try:
            with connect_sse(client, "GET", f"/v1/streams/{sid}", headers={"Last-Event-ID": last}) as source:
                resp = source.response
                if resp.status_code == 204:
                    return 0
                if resp.status_code != 200:
                    print(f"\ntokenfan: {resp.status_code} {resp.read().decode()}", file=sys.stderr)
                    return 1
                for ev in source.iter_sse():
                    if not ev.data:
                        continue
                    last = ev.id or last
                    failures = 0
                    progress = time.monotonic()
                    e = _event(ev.data, last)
                    if e is not None and _show(e):
                        return 0 if isinstance(e, events.Done) else 1
        except httpx.TransportError:
            pass
        failures += 1
        time.sleep(RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S)) - 1])


def _event(data: str, last: str) -> events.Event | None:
    """One frame's event; None for one this version does not know (a newer API's): skipped."""
    try:
        return events.decode_frame(data, int(last))
    except ValueError:
        return None


def _show(e: events.Event) -> bool:
    """Print one event; True when it ends the stream."""
    if isinstance(e, events.Token):
        sys.stdout.write(e.text)
        sys.stdout.flush()
    elif isinstance(e, events.Disclosure):
        print(f"[{e.text}]", file=sys.stderr)
    elif isinstance(e, events.Queued):
        print(f"[queued, position {e.position}]", file=sys.stderr)
    elif isinstance(e, events.Done):
        t = e.timings
        print(f"\n[{e.finish_reason}: {e.usage.completion_tokens} tokens, "
              f"first token {t.ttft_ms} ms, {t.tokens_per_s} tokens/s, worker {t.worker}]", file=sys.stderr)
        return True
    elif isinstance(e, events.Error):
        print(f"\n[error {e.code}: {e.message}]", file=sys.stderr)
        return True
    return False
