"""SqlKeyStore: migrations, WAL, the keys version counter, keys and usage, and two connections to one file."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from app.store.keys import KeyRecord, SqlKeyStore, Usage
from app.store.schema import metadata

HOUR = datetime(2031, 5, 17, 10, 0, tzinfo=UTC).timestamp()


def record(key_id: str = "key_1", **fields) -> KeyRecord:
    values = {
        "alias": "team",
        "digest": f"digest-of-{key_id}",
        "prefix": "sk-ig-abcd",
        "models": ["*"],
        "created_at": HOUR,
        **fields,
    }
    return KeyRecord(id=key_id, **values)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "data" / "imagegate.db"


@pytest.fixture
def store(path):
    s = SqlKeyStore(path)
    yield s
    s.close()


def pragma(path, name: str):
    db = sqlite3.connect(path)
    try:
        return db.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        db.close()


def head_revision(path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    finally:
        db.close()


def test_migrations_build_the_declared_schema_once(path):
    SqlKeyStore(path).close()  # creates the directory and the schema
    assert path.exists()
    head = head_revision(path)
    SqlKeyStore(path).close()  # a second run would fail on CREATE TABLE
    assert head_revision(path) == head
    db = sqlite3.connect(path)
    try:  # the migrations made exactly the tables and columns the queries are written against
        for table in metadata.sorted_tables:
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({table.name})")]
            assert columns == [c.name for c in table.columns], table.name
    finally:
        db.close()


OLD_SCHEMA = """
CREATE TABLE keys (id TEXT PRIMARY KEY, alias TEXT NOT NULL, digest TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
    models TEXT NOT NULL, rpm INTEGER, max_concurrent INTEGER, image_quota INTEGER, quota_period TEXT NOT NULL,
    expires_at REAL, active INTEGER NOT NULL, created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE usage (principal TEXT NOT NULL, hour INTEGER NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0, pixel_steps INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (principal, hour));
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('keys_version', 4);
INSERT INTO keys VALUES ('key_old', 'old', 'digest-old', 'sk-ig-old', '["*"]', NULL, NULL, NULL, 'day', NULL, 1,
    0, NULL);
PRAGMA user_version = 1;
"""


async def test_a_data_dir_of_the_previous_release_keeps_its_keys(path):
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    store = SqlKeyStore(path)
    try:
        assert (await store.key("key_old")).alias == "old"  # type: ignore[union-attr]
        assert await store.version() == 4
        await store.add_key(record("key_new"))
        assert await store.version() == 5
    finally:
        store.close()


def test_wal_mode(store, path):
    assert pragma(path, "journal_mode") == "wal"
    assert store.db.reader.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


async def test_version_counts_every_key_change(store):
    assert await store.version() == 0 and store.version_sync() == 0
    assert not await store.has_keys()
    await store.add_key(record("key_1"))
    assert await store.version() == 1 and await store.has_keys()
    await store.update_key("key_1", {"rpm": 10})
    assert await store.version() == 2
    await store.update_key("key_1", {})  # nothing to change: nothing changed
    assert await store.version() == 2
    await store.update_key("key_1", {"digest": "forged", "id": "other", "prefix": "x", "unknown": 1})
    assert await store.version() == 2  # immutable or unknown fields are ignored
    assert (await store.key("key_1")).digest == "digest-of-key_1"  # type: ignore[union-attr]
    assert await store.delete_key("key_1")
    assert await store.version() == 3 and not await store.has_keys()
    assert await store.key("key_1") is None


async def test_keys_are_found_by_digest_and_id(store):
    await store.add_key(record("key_1", alias="one"))
    await store.add_key(record("key_2", alias="two", created_at=HOUR + 1))
    found = await store.key_by_digest("digest-of-key_2")
    assert found is not None and found.id == "key_2" and found.alias == "two"
    assert await store.key_by_digest("digest-of-nothing") is None
    assert (await store.key("key_1")).alias == "one"  # type: ignore[union-attr]
    assert [k.id for k in await store.keys()] == ["key_1", "key_2"]  # oldest first
    with pytest.raises(IntegrityError):  # digests are unique
        await store.add_key(record("key_3", digest="digest-of-key_1"))
    assert await store.version() == 2  # the failed insert changed nothing


async def test_a_failed_write_leaves_the_store_usable(path):
    store, other = SqlKeyStore(path), SqlKeyStore(path)
    try:
        await store.add_key(record("key_1"))
        with pytest.raises(IntegrityError):
            await store.add_key(record("key_2", digest="digest-of-key_1"))
        await store.add_key(record("key_3"))
        await store.record_usage([("key_3", HOUR, 1, 1, 1)])
        assert await other.usage("key_3") == Usage(requests=1, images=1, pixel_steps=1)
    finally:
        store.close()
        other.close()


async def test_records_round_trip(store):
    original = record(
        "key_1",
        models=["sd-*", "flux-?"],
        rpm=5,
        max_concurrent=2,
        image_quota=100,
        quota_period="month",
        expires_at=HOUR + 3600.5,
        active=True,
    )
    await store.add_key(original)
    assert await store.key("key_1") == original
    updated = await store.update_key("key_1", {"models": ["only-this"], "active": False, "revoked_at": HOUR + 9})
    assert updated is not None
    assert updated.models == ["only-this"] and updated.active is False and updated.revoked_at == HOUR + 9
    assert await store.key("key_1") == updated
    cleared = await store.update_key("key_1", {"models": [], "rpm": None})
    assert cleared is not None and cleared.models == [] and cleared.rpm is None
    assert await store.update_key("key_nothing", {"rpm": 1}) is None
    assert not await store.delete_key("key_nothing")


async def test_usage_is_summed_per_hour_bucket(store):
    await store.record_usage([("p", HOUR + 10, 1, 2, 100)])
    await store.record_usage([("p", HOUR + 3599, 1, 1, 50)])  # the same hour: the same row
    await store.record_usage([("p", HOUR + 3600, 1, 4, 200)])  # the next hour
    await store.record_usage([("q", HOUR + 10, 1, 8, 999)])  # another principal
    query = "SELECT hour, requests, images, pixel_steps FROM usage WHERE principal = 'p'"
    rows = store.db.reader.exec_driver_sql(query)
    assert sorted(tuple(r) for r in rows) == [(int(HOUR // 3600), 2, 3, 150), (int(HOUR // 3600) + 1, 1, 4, 200)]
    assert await store.usage("p") == Usage(requests=3, images=7, pixel_steps=350)
    assert await store.usage("p", since=HOUR + 3600) == Usage(requests=1, images=4, pixel_steps=200)
    # `since` counts whole hours: a time inside an hour includes that hour's bucket
    assert await store.usage("p", since=HOUR + 1800) == Usage(requests=3, images=7, pixel_steps=350)
    assert await store.usage("p", since=HOUR + 7200) == Usage()
    assert await store.usage("nobody") == Usage()
    assert store.usage_sync("q") == Usage(requests=1, images=8, pixel_steps=999)


async def test_data_persists_across_instances(path):
    first = SqlKeyStore(path)
    await first.add_key(record("key_1", models=["a"]))
    await first.record_usage([("key_1", HOUR, 1, 3, 30)])
    first.close()
    second = SqlKeyStore(path)
    try:
        assert (await second.key("key_1")).models == ["a"]  # type: ignore[union-attr]
        assert await second.usage("key_1") == Usage(requests=1, images=3, pixel_steps=30)
        assert await second.version() == 1
    finally:
        second.close()


async def test_two_instances_see_each_others_writes(path):
    gateway, cli = SqlKeyStore(path), SqlKeyStore(path)
    try:
        seen = await gateway.version()
        await cli.add_key(record("key_1"))
        assert await gateway.version() == seen + 1  # the basis of the gateway's cache invalidation
        assert (await gateway.key_by_digest("digest-of-key_1")) is not None
        await cli.update_key("key_1", {"active": False})
        assert await gateway.version() == seen + 2
        assert (await gateway.key("key_1")).active is False  # type: ignore[union-attr]
        await gateway.record_usage([("key_1", HOUR, 1, 1, 1)])
        assert await cli.usage("key_1") == Usage(requests=1, images=1, pixel_steps=1)
        await cli.delete_key("key_1")
        assert await gateway.version() == seen + 3 and not await gateway.has_keys()
    finally:
        gateway.close()
        cli.close()


def test_sync_api_matches_the_async_one(store):
    store.add_key_sync(record("key_1"))
    assert store.version_sync() == 1
    assert [k.id for k in store.keys_sync()] == ["key_1"]
    assert store.update_key_sync("key_1", {"alias": "renamed"}).alias == "renamed"  # type: ignore[union-attr]
    assert store.key_sync("key_1").alias == "renamed"  # type: ignore[union-attr]
    assert store.delete_key_sync("key_1") and store.key_sync("key_1") is None
    assert store.version_sync() == 3


async def test_the_version_is_read_again_only_after_a_commit(path):
    gateway, cli = SqlKeyStore(path), SqlKeyStore(path)
    reads: list[str] = []
    event.listen(gateway.db.reader, "before_cursor_execute", lambda *a: reads.append(a[2]))
    try:
        seen = await gateway.version()
        for _ in range(5):
            assert await gateway.version() == seen
        assert len(reads) == 1, "no commit, no query: requests read a counter SQLite keeps"
        await cli.add_key(record("key_1"))  # another process's commit (the CLI, a replica)
        assert await gateway.version() == seen + 1
        await gateway.record_usage([("key_1", HOUR, 1, 1, 1)])  # this process's own writes move it too
        assert await gateway.version() == seen + 1
        gateway.update_key_sync("key_1", {"active": False})
        assert await gateway.version() == seen + 2
        assert len(reads) == 4
    finally:
        gateway.close()
        cli.close()
