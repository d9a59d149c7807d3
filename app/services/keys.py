"""Virtual keys: the use cases behind the admin API and ``imagegate keys``."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
from msgspec import UNSET

from app.auth.guard import period_bounds
from app.auth.principals import digest, new_key, parse_time
from app.errors import InvalidRequest, NotFound
from app.protocol.admin import CreatedKey, KeyCreate, KeyList, KeyUpdate, KeyUsage, KeyView
from app.store.keys import KeyRecord, KeyStore


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _expiry(value: str | None) -> float | None:
    try:
        moment = parse_time(value)
        _iso(moment)  # shown in UTC later: must stay within datetime's years 1-9999 there too
    except (ValueError, OverflowError, OSError):
        raise InvalidRequest(f"expires_at {value!r} is not an ISO 8601 time.", param="expires_at") from None
    return moment


class KeyService:
    def __init__(self, store: KeyStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def _view(self, record: KeyRecord) -> KeyView:
        start, _ = period_bounds(record.quota_period, self.clock())
        total, period = await self.store.usage(record.id), await self.store.usage(record.id, since=start)
        return KeyView(
            id=record.id,
            alias=record.alias,
            prefix=record.prefix,
            models=record.models,
            rpm=record.rpm,
            max_concurrent=record.max_concurrent,
            image_quota=record.image_quota,
            quota_period=record.quota_period,
            expires_at=_iso(record.expires_at),
            active=record.active,
            created_at=_iso(record.created_at) or "",
            revoked_at=_iso(record.revoked_at),
            usage=KeyUsage(**msgspec.structs.asdict(total)),
            period_usage=KeyUsage(**msgspec.structs.asdict(period)),
        )

    async def _get(self, key_id: str) -> KeyRecord:
        record = await self.store.key(key_id)
        if record is None:
            raise NotFound(f"No key with id '{key_id}'.", param="key_id", code="key_not_found")
        return record

    async def create(self, data: KeyCreate) -> CreatedKey:
        key = new_key()
        record = KeyRecord(
            id=f"key_{secrets.token_hex(8)}",
            alias=data.alias,
            digest=digest(key),
            prefix=key[:10],
            models=data.models,
            rpm=data.rpm,
            max_concurrent=data.max_concurrent,
            image_quota=data.image_quota,
            quota_period=data.quota_period,
            expires_at=_expiry(data.expires_at),
            active=data.active,
            created_at=self.clock(),
        )
        await self.store.add_key(record)
        view = await self._view(record)
        return CreatedKey(key=key, **msgspec.structs.asdict(view))

    async def list(self) -> KeyList:
        return KeyList(data=[await self._view(r) for r in await self.store.keys()])

    async def show(self, key_id: str) -> KeyView:
        return await self._view(await self._get(key_id))

    async def update(self, key_id: str, data: KeyUpdate) -> KeyView:
        await self._get(key_id)
        changes = {f: v for f in data.__struct_fields__ if (v := getattr(data, f)) is not UNSET}
        if "expires_at" in changes:
            changes["expires_at"] = _expiry(changes["expires_at"])
        if changes.get("active") is True:
            changes["revoked_at"] = None
        record = await self.store.update_key(key_id, changes)
        assert record is not None
        return await self._view(record)

    async def revoke(self, key_id: str) -> KeyView:
        await self._get(key_id)
        record = await self.store.update_key(key_id, {"active": False, "revoked_at": self.clock()})
        assert record is not None
        return await self._view(record)

    async def delete(self, key_id: str) -> None:
        if not await self.store.delete_key(key_id):
            raise NotFound(f"No key with id '{key_id}'.", param="key_id", code="key_not_found")
