"""`tokenfan keys add|list|revoke`: API keys in Redis (default) or in a JSON file (`--file`).

The flags are declared with the other commands' in ops/cli.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import redis

from tokenfan.shared import apikeys, keys
from tokenfan.shared.apikeys import KeyRecord
from tokenfan.shared.errors import Unavailable
from tokenfan.shared.redisconn import redacted, sync_client


class _Store:
    def __init__(self, args: argparse.Namespace, redis_url: str | None) -> None:
        self.path = Path(args.file) if args.file else None
        self.redis = None if self.path else sync_client(redis_url)

    def all(self) -> dict[str, KeyRecord]:
        if self.path:
            return apikeys.parse_records(self.path.read_bytes()) if self.path.exists() else {}
        assert self.redis is not None
        raw = self.redis.hgetall(keys.api_keys())
        return {k.decode(): KeyRecord.model_validate_json(v) for k, v in raw.items()}

    def put(self, rec: KeyRecord) -> None:
        if self.path:
            records = self.all()
            records[rec.hash] = rec
            apikeys.save_file(self.path, records)
        else:
            assert self.redis is not None
            self.redis.hset(keys.api_keys(), rec.hash, rec.model_dump_json())


def run(args: argparse.Namespace, redis_url: str | None) -> int:
    """One command; a Redis that cannot be reached is one line (Unavailable: exit 2), not a traceback."""
    try:
        return _run(_Store(args, redis_url), args)
    except redis.RedisError as exc:
        raise Unavailable(f"cannot reach Redis at {redacted(redis_url or '')} (REDIS_URL): {exc}; "
                          "or use --file for a key file", code="redis_unavailable") from None


def _run(store: _Store, args: argparse.Namespace) -> int:
    if args.keys_command == "add":
        key, rec = apikeys.make_record(args.tenant, admin=args.admin, max_concurrent=args.max_concurrent,
                                       rpm=args.rpm)
        store.put(rec)
        print(key)
        print(f"key for tenant '{rec.tenant}' ({rec.hash[:12]}): shown once, stored only as its hash",
              file=sys.stderr)
        return 0
    if args.keys_command == "list":
        for rec in store.all().values():
            state = "revoked" if rec.revoked else "active"
            print(f"{rec.hash[:12]}  {rec.tenant:<20} admin={str(rec.admin).lower():<5} "
                  f"max_concurrent={rec.max_concurrent} rpm={rec.rpm} {state}")
        return 0
    return _revoke(store, args.key)


def _revoke(store: _Store, ident: str) -> int:
    records = store.all()
    digest = apikeys.hash_key(ident) if ident.startswith(apikeys.KEY_PREFIX) else ident
    found = [r for h, r in records.items() if h.startswith(digest)] if len(digest) >= 8 else []
    if len(found) != 1:
        print(f"tokenfan: {'no' if not found else 'more than one'} key matches '{ident[:12]}'", file=sys.stderr)
        return 1
    store.put(found[0].model_copy(update={"revoked": True}))
    print(f"revoked {found[0].hash[:12]} ({found[0].tenant})")
    return 0
