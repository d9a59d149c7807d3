"""Virtual keys and usage, behind a small store interface, on the shared database (:mod:`app.store.db`).

Keys are stored as SHA-256 digests only. ``version`` counts every change to keys, so a process that caches keys
(the gateway) sees a revocation made elsewhere (another replica, the CLI) on its very next lookup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
from sqlalchemy import Connection, Row, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from app.store.db import Database
from app.store.schema import keys, meta, usage


class KeyRecord(msgspec.Struct, kw_only=True):
    """A virtual key as stored (never its secret)."""

    id: str
    alias: str
    digest: str
    prefix: str
    models: list[str]
    rpm: int | None = None
    max_concurrent: int | None = None
    image_quota: int | None = None
    quota_period: str = "day"
    expires_at: float | None = None
    active: bool = True
    created_at: float = 0.0
    revoked_at: float | None = None


UsageRow = tuple[str, float, int, int, int]
"""(principal, time, requests, images, pixel_steps): usage to add to the hour of that time."""


class Usage(msgspec.Struct):
    requests: int = 0
    images: int = 0
    pixel_steps: int = 0


class KeyStore(Protocol):
    async def version(self) -> int: ...
    async def add_key(self, record: KeyRecord) -> None: ...
    async def key_by_digest(self, digest: str) -> KeyRecord | None: ...
    async def key(self, key_id: str) -> KeyRecord | None: ...
    async def keys(self) -> list[KeyRecord]: ...
    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None: ...
    async def delete_key(self, key_id: str) -> bool: ...
    async def has_keys(self) -> bool: ...
    async def record_usage(self, rows: Sequence[UsageRow]) -> None: ...
    async def usage(self, principal: str, since: float = 0.0) -> Usage: ...
    def close(self) -> None: ...


_NAMES = [f.name for f in msgspec.structs.fields(KeyRecord)]
_VERSION = select(meta.c.value).where(meta.c.name == "keys_version")


def _record(row: Row | None) -> KeyRecord | None:
    if row is None:
        return None
    data = row._asdict()
    data["models"] = msgspec.json.decode(data["models"])
    data["active"] = bool(data["active"])
    return KeyRecord(**data)


def _bump(conn: Connection) -> None:
    conn.execute(update(meta).where(meta.c.name == "keys_version").values(value=meta.c.value + 1))


def add_usage(conn: Connection, rows: Sequence[UsageRow]) -> None:
    """Add each (principal, time, requests, images, pixel_steps) to its hour's row, within ``conn``'s transaction."""
    if not rows:
        return
    upsert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(usage)
    statement = upsert.on_conflict_do_update(
        index_elements=[usage.c.principal, usage.c.hour],
        set_={
            "requests": usage.c.requests + upsert.excluded.requests,
            "images": usage.c.images + upsert.excluded.images,
            "pixel_steps": usage.c.pixel_steps + upsert.excluded.pixel_steps,
        },
    )
    conn.execute(
        statement,
        [
            {"principal": p, "hour": int(at // 3600), "requests": r, "images": i, "pixel_steps": s}
            for p, at, r, i, s in rows
        ],
    )


class SqlKeyStore:
    """Keys and usage in the shared database.

    Args:
        db: the database, or the path/URL of one to open (then this store owns it and closes it).
    """

    def __init__(self, db: Database | str | Path) -> None:
        self._owned = not isinstance(db, Database)
        self.db = Database(db) if not isinstance(db, Database) else db
        self._version: int | None = None
        self._seen: int | None = None  # the database's data version when _version was read

    # -- sync API (the CLI uses these directly) --------------------------------------------------------------

    def version_sync(self) -> int:
        return self.db.read(lambda c: c.execute(_VERSION).scalar_one())

    def add_key_sync(self, record: KeyRecord) -> None:
        values = msgspec.structs.asdict(record)
        values["models"] = msgspec.json.encode(record.models).decode()

        def go(conn: Connection) -> None:
            conn.execute(insert(keys).values(values))
            _bump(conn)

        self.db.write(go)

    def key_sync(self, key_id: str) -> KeyRecord | None:
        return self.db.read(lambda c: _record(c.execute(select(keys).where(keys.c.id == key_id)).first()))

    def keys_sync(self) -> list[KeyRecord]:
        rows = self.db.read(lambda c: c.execute(select(keys).order_by(keys.c.created_at)).all())
        return [r for r in map(_record, rows) if r is not None]

    def update_key_sync(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        allowed = {k: v for k, v in changes.items() if k in _NAMES and k not in ("id", "digest", "prefix")}
        if "models" in allowed:
            allowed["models"] = msgspec.json.encode(allowed["models"]).decode()

        def go(conn: Connection) -> KeyRecord | None:
            if allowed and conn.execute(update(keys).where(keys.c.id == key_id).values(allowed)).rowcount:
                _bump(conn)
            return _record(conn.execute(select(keys).where(keys.c.id == key_id)).first())

        return self.db.write(go)

    def delete_key_sync(self, key_id: str) -> bool:
        def go(conn: Connection) -> bool:
            deleted = conn.execute(delete(keys).where(keys.c.id == key_id)).rowcount > 0
            if deleted:
                _bump(conn)
            return deleted

        return self.db.write(go)

    def usage_sync(self, principal: str, since: float = 0.0) -> Usage:
        query = select(
            func.coalesce(func.sum(usage.c.requests), 0),
            func.coalesce(func.sum(usage.c.images), 0),
            func.coalesce(func.sum(usage.c.pixel_steps), 0),
        ).where(usage.c.principal == principal, usage.c.hour >= int(since // 3600))
        row = self.db.read(lambda c: c.execute(query).one())
        return Usage(requests=row[0], images=row[1], pixel_steps=row[2])

    # -- async API (the gateway) -----------------------------------------------------------------------------

    async def version(self) -> int:
        """The keys' version, read again only after a commit somewhere (see :meth:`Database.data_version`)."""
        seen = self.db.data_version()
        if seen is None or seen != self._seen or self._version is None:
            self._version, self._seen = self.db.reader.execute(_VERSION).scalar_one(), seen
        return self._version

    async def add_key(self, record: KeyRecord) -> None:
        await asyncio.to_thread(self.add_key_sync, record)

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        return _record(self.db.reader.execute(select(keys).where(keys.c.digest == digest)).first())

    async def key(self, key_id: str) -> KeyRecord | None:
        return await asyncio.to_thread(self.key_sync, key_id)

    async def keys(self) -> list[KeyRecord]:
        return await asyncio.to_thread(self.keys_sync)

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        return await asyncio.to_thread(self.update_key_sync, key_id, changes)

    async def delete_key(self, key_id: str) -> bool:
        return await asyncio.to_thread(self.delete_key_sync, key_id)

    async def has_keys(self) -> bool:
        return self.db.reader.execute(select(keys.c.id).limit(1)).first() is not None

    async def record_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add each (principal, time, requests, images, pixel_steps) to its hour's row, in one transaction."""
        await self.db.awrite(lambda conn: add_usage(conn, rows))

    async def usage(self, principal: str, since: float = 0.0) -> Usage:
        return await asyncio.to_thread(self.usage_sync, principal, since)

    def close(self) -> None:
        if self._owned:
            self.db.close()
