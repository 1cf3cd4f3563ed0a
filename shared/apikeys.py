"""API keys: who may call the API, as which tenant, within which limits.

Only a key's SHA-256 is stored, never the key. Keys come from a JSON file or
variable that the operator writes (`TOKENFAN_API_KEYS_FILE`,
`TOKENFAN_API_KEYS`) and from the Redis hash `tf:keys` that `tokenfan keys`
manages; both may be used at once. Shape of one record:

    {"hash": "<sha256 hex>", "tenant": "acme", "admin": false, "revoked": false,
     "max_concurrent": 8, "rpm": 120, "created": 1764030000.0}
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

import orjson
from pydantic import BaseModel, Field

from tokenfan.shared import keys

KEY_PREFIX = "tf_"


class KeyRecord(BaseModel):
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = Field(min_length=1, max_length=64)
    admin: bool = False
    revoked: bool = False
    max_concurrent: int = Field(default=8, ge=1)
    rpm: int = Field(default=120, ge=1)
    created: float = 0.0

    @property
    def owner(self) -> str:
        """What streams are bound to: the key itself (its hash), not the tenant."""
        return f"key:{self.hash[:32]}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_records(raw: str | bytes) -> dict[str, KeyRecord]:
    data = orjson.loads(raw) if raw else []
    items = data.get("keys", []) if isinstance(data, dict) else data
    records = [KeyRecord.model_validate(i) for i in items]
    return {r.hash: r for r in records}


def load_static(path: str | None, inline: str | None) -> dict[str, KeyRecord]:
    """Keys from the operator's file and variable (read once at startup)."""
    found: dict[str, KeyRecord] = {}
    if path:
        found.update(parse_records(Path(path).read_bytes()))
    if inline:
        found.update(parse_records(inline))
    return found


def make_record(tenant: str, *, admin: bool, max_concurrent: int, rpm: int) -> tuple[str, KeyRecord]:
    key = new_key()
    rec = KeyRecord(hash=hash_key(key), tenant=tenant, admin=admin, max_concurrent=max_concurrent, rpm=rpm,
                    created=time.time())
    return key, rec


def save_file(path: Path, records: dict[str, KeyRecord]) -> None:
    body = {"keys": [r.model_dump() for r in records.values()]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
    tmp.chmod(0o600)
    tmp.replace(path)


REDIS_HASH = keys.api_keys()
