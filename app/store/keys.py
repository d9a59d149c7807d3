"""Virtual keys and usage, behind a small store interface; embedded SQLite (WAL) by default.

Keys are stored as SHA-256 digests only. ``version`` counts every change to keys, so a process that caches keys
(the gateway) sees a revocation made elsewhere (another replica, the CLI) on its very next lookup.
A PostgreSQL store for several gateway replicas fills the same :class:`KeyStore` interface.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

T = TypeVar("T")

MIGRATIONS: list[str] = [
    """
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        alias TEXT NOT NULL,
        digest TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        models TEXT NOT NULL,
        rpm INTEGER,
        max_concurrent INTEGER,
        image_quota INTEGER,
        quota_period TEXT NOT NULL,
        expires_at REAL,
        active INTEGER NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE usage (
        principal TEXT NOT NULL,
        hour INTEGER NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        images INTEGER NOT NULL DEFAULT 0,
        pixel_steps INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (principal, hour)
    );
    CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta VALUES ('keys_version', 0);
    """,
]


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


_COLUMNS = [f for f in msgspec.structs.fields(KeyRecord)]
_NAMES = [f.name for f in _COLUMNS]


def _row(row: sqlite3.Row | None) -> KeyRecord | None:
    if row is None:
        return None
    data = dict(row)
    data["models"] = msgspec.json.decode(data["models"])
    data["active"] = bool(data["active"])
    return KeyRecord(**data)


DB_NAME = "imagegate.db"


def db_path(data_dir: str | Path) -> Path:
    """Where the embedded store lives in a data directory."""
    return Path(data_dir) / DB_NAME


class SqliteStore:
    """The store in one SQLite file, in WAL mode so readers never wait for the writer."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()
        # Lookups on every request run on the event loop through a connection of their own: in WAL mode a reader
        # never waits for the writer, and an indexed read costs microseconds, less than a hop to a thread.
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._reader.row_factory = sqlite3.Row

    def _migrate(self) -> None:
        with self._lock:
            current = self._db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                self._db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    def _call(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return fn()

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._call, fn)

    def _transaction(self, work: Callable[[], T]) -> T:
        """Run ``work`` in one write transaction: committed whole, or rolled back whole."""

        def go() -> T:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

        return self._call(go)

    def _bump(self) -> None:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_version'")

    # -- sync API (the CLI uses these directly) --------------------------------------------------------------

    def version_sync(self) -> int:
        return self._call(lambda: self._db.execute("SELECT value FROM meta WHERE name='keys_version'").fetchone()[0])

    def add_key_sync(self, record: KeyRecord) -> None:
        values = msgspec.structs.asdict(record)
        values["models"] = msgspec.json.encode(record.models).decode()

        def go() -> None:
            self._db.execute(
                f"INSERT INTO keys ({', '.join(_NAMES)}) VALUES ({', '.join('?' for _ in _NAMES)})",
                [values[n] for n in _NAMES],
            )
            self._bump()

        self._transaction(go)

    def key_sync(self, key_id: str) -> KeyRecord | None:
        return self._call(lambda: _row(self._db.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()))

    def keys_sync(self) -> list[KeyRecord]:
        rows = self._call(lambda: self._db.execute("SELECT * FROM keys ORDER BY created_at").fetchall())
        return [r for r in (_row(row) for row in rows) if r is not None]

    def update_key_sync(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        allowed = {k: v for k, v in changes.items() if k in _NAMES and k not in ("id", "digest", "prefix")}
        if "models" in allowed:
            allowed["models"] = msgspec.json.encode(allowed["models"]).decode()

        def go() -> KeyRecord | None:
            if allowed:
                sets = ", ".join(f"{k} = ?" for k in allowed)
                if self._db.execute(f"UPDATE keys SET {sets} WHERE id = ?", [*allowed.values(), key_id]).rowcount:
                    self._bump()
            return _row(self._db.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone())

        return self._transaction(go)

    def delete_key_sync(self, key_id: str) -> bool:
        def go() -> bool:
            deleted = self._db.execute("DELETE FROM keys WHERE id = ?", (key_id,)).rowcount > 0
            if deleted:
                self._bump()
            return deleted

        return self._transaction(go)

    def usage_sync(self, principal: str, since: float = 0.0) -> Usage:
        row = self._call(
            lambda: self._db.execute(
                "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(images), 0), COALESCE(SUM(pixel_steps), 0) "
                "FROM usage WHERE principal = ? AND hour >= ?",
                (principal, int(since // 3600)),
            ).fetchone()
        )
        return Usage(requests=row[0], images=row[1], pixel_steps=row[2])

    # -- async API (the gateway) -----------------------------------------------------------------------------

    async def version(self) -> int:
        return self._reader.execute("SELECT value FROM meta WHERE name = 'keys_version'").fetchone()[0]

    async def add_key(self, record: KeyRecord) -> None:
        await asyncio.to_thread(self.add_key_sync, record)

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        return _row(self._reader.execute("SELECT * FROM keys WHERE digest = ?", (digest,)).fetchone())

    async def key(self, key_id: str) -> KeyRecord | None:
        return await asyncio.to_thread(self.key_sync, key_id)

    async def keys(self) -> list[KeyRecord]:
        return await asyncio.to_thread(self.keys_sync)

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        return await asyncio.to_thread(self.update_key_sync, key_id, changes)

    async def delete_key(self, key_id: str) -> bool:
        return await asyncio.to_thread(self.delete_key_sync, key_id)

    async def has_keys(self) -> bool:
        return self._reader.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None

    async def record_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add each (principal, time, requests, images, pixel_steps) to its hour's row, in one transaction."""
        values = [(principal, int(at // 3600), *counts) for principal, at, *counts in rows]
        await asyncio.to_thread(
            self._transaction,
            lambda: self._db.executemany(
                "INSERT INTO usage (principal, hour, requests, images, pixel_steps) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (principal, hour) DO UPDATE SET requests = requests + excluded.requests, "
                "images = images + excluded.images, pixel_steps = pixel_steps + excluded.pixel_steps",
                values,
            ),
        )

    async def usage(self, principal: str, since: float = 0.0) -> Usage:
        return await asyncio.to_thread(self.usage_sync, principal, since)

    def close(self) -> None:
        with self._lock:
            self._reader.close()
            self._db.close()
