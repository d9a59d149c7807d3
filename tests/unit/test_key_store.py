"""SqliteStore: migrations, WAL, the keys version counter, keys and usage, and two connections to one file."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest

from app.store import keys as keys_module
from app.store.keys import MIGRATIONS, KeyRecord, SqliteStore, Usage

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
    s = SqliteStore(path)
    yield s
    s.close()


def pragma(path, name: str):
    db = sqlite3.connect(path)
    try:
        return db.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        db.close()


def test_migrations_run_once(path, monkeypatch):
    SqliteStore(path).close()  # creates the directory and the schema
    assert path.exists()
    assert pragma(path, "user_version") == len(MIGRATIONS)
    SqliteStore(path).close()  # a second run would fail on CREATE TABLE
    assert pragma(path, "user_version") == len(MIGRATIONS)

    extra = "CREATE TABLE extra (x INTEGER); INSERT INTO extra VALUES (1);"
    monkeypatch.setattr(keys_module, "MIGRATIONS", [*MIGRATIONS, extra])
    for _ in range(2):  # only the new migration runs, and only once
        SqliteStore(path).close()
        assert pragma(path, "user_version") == len(MIGRATIONS) + 1
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT COUNT(*) FROM extra").fetchone()[0] == 1
    finally:
        db.close()


def test_wal_mode(store, path):
    assert pragma(path, "journal_mode") == "wal"
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


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
    with pytest.raises(sqlite3.IntegrityError):  # digests are unique
        await store.add_key(record("key_3", digest="digest-of-key_1"))
    assert await store.version() == 2  # the failed insert changed nothing


async def test_a_failed_write_leaves_the_store_usable(path):
    store, other = SqliteStore(path), SqliteStore(path)
    try:
        await store.add_key(record("key_1"))
        with pytest.raises(sqlite3.IntegrityError):
            await store.add_key(record("key_2", digest="digest-of-key_1"))
        assert not store._db.in_transaction
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
    rows = store._db.execute("SELECT hour, requests, images, pixel_steps FROM usage WHERE principal = 'p'").fetchall()
    assert sorted(tuple(r) for r in rows) == [(int(HOUR // 3600), 2, 3, 150), (int(HOUR // 3600) + 1, 1, 4, 200)]
    assert await store.usage("p") == Usage(requests=3, images=7, pixel_steps=350)
    assert await store.usage("p", since=HOUR + 3600) == Usage(requests=1, images=4, pixel_steps=200)
    # `since` counts whole hours: a time inside an hour includes that hour's bucket
    assert await store.usage("p", since=HOUR + 1800) == Usage(requests=3, images=7, pixel_steps=350)
    assert await store.usage("p", since=HOUR + 7200) == Usage()
    assert await store.usage("nobody") == Usage()
    assert store.usage_sync("q") == Usage(requests=1, images=8, pixel_steps=999)


async def test_data_persists_across_instances(path):
    first = SqliteStore(path)
    await first.add_key(record("key_1", models=["a"]))
    await first.record_usage([("key_1", HOUR, 1, 3, 30)])
    first.close()
    second = SqliteStore(path)
    try:
        assert (await second.key("key_1")).models == ["a"]  # type: ignore[union-attr]
        assert await second.usage("key_1") == Usage(requests=1, images=3, pixel_steps=30)
        assert await second.version() == 1
    finally:
        second.close()


async def test_two_instances_see_each_others_writes(path):
    gateway, cli = SqliteStore(path), SqliteStore(path)
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
