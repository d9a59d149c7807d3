"""The Authenticator, Principal and Guard on their own, over a SqlKeyStore in a temporary directory."""

from __future__ import annotations

import base64
import hmac
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY

from app.auth import principals
from app.auth.guard import Guard, period_bounds
from app.auth.principals import Authenticator, Principal, digest, hash_password, new_key
from app.config import load_settings
from app.errors import PermissionDenied, QuotaExceeded, RateLimited, Unauthorized
from app.store.keys import KeyRecord, SqlKeyStore, Usage

ADMIN_KEY = "sk-admin-unit-" + "a" * 32
STATIC_KEY = "sk-static-unit-" + "b" * 32
USER, PASSWORD = "bob", "unit-password-9Qz"
PASSWORD_HASH = hash_password(PASSWORD)  # once for the module: argon2 is slow on purpose
NOW = datetime(2031, 5, 17, 12, 0, tzinfo=UTC).timestamp()


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def store(tmp_path):
    s = SqlKeyStore(tmp_path / "imagegate.db")
    yield s
    s.close()


def make_auth(tmp_path, store, *, clock=lambda: NOW, environ: dict[str, str] | None = None, **overrides: Any):
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), **overrides})
    return Authenticator(settings, store, clock=clock, environ=environ or {})


def configured(**limits: Any) -> dict[str, Any]:
    return {
        "admin_key": ADMIN_KEY,
        "api_keys": [{"id": "static", "key_sha256": digest(STATIC_KEY), **limits}],
        "users": [{"name": USER, "password_hash": PASSWORD_HASH, **limits}],
    }


async def add_virtual(store: SqlKeyStore, **fields: Any) -> tuple[str, KeyRecord]:
    key = new_key()
    fields = {"models": ["*"], **fields}
    record = KeyRecord(id=f"key_{key[-8:]}", alias="vk", digest=digest(key), prefix=key[:10], created_at=NOW, **fields)
    await store.add_key(record)
    return key, record


def reason_of(error: Unauthorized) -> str:
    return {
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.": "missing",
        "The Authorization header is malformed.": "malformed",
        "Incorrect API key provided.": "unknown",
        "This API key has expired.": "expired",
        "This API key has been revoked or disabled.": "revoked",
        "Incorrect user name or password.": "bad_password",
    }[error.message]


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("imagegate_auth_failures_total", {"reason": reason}) or 0.0


class CountingHasher:
    """Stands in for the module's PasswordHasher (which has slots) and records every verify."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.verified: list[str] = []

    def verify(self, hashed: str, password: str) -> bool:
        self.verified.append(hashed)
        return self.inner.verify(hashed, password)

    def hash(self, password: str) -> str:
        return self.inner.hash(password)


@pytest.fixture
def hasher(monkeypatch) -> CountingHasher:
    counting = CountingHasher(principals._hasher)
    monkeypatch.setattr(principals, "_hasher", counting)
    return counting


@pytest.fixture
def compared(monkeypatch) -> list[tuple[Any, Any]]:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    return calls


# -- Authenticator ----------------------------------------------------------------------------------------------


async def test_admin_key_is_compared_in_constant_time(tmp_path, store, compared):
    auth = make_auth(tmp_path, store, **configured())
    principal = await auth.authenticate(bearer(ADMIN_KEY))
    assert principal.admin and principal.kind == "admin"
    assert (digest(ADMIN_KEY), digest(ADMIN_KEY)) in compared
    compared.clear()
    with pytest.raises(Unauthorized):
        await auth.authenticate(bearer("sk-ig-wrong"))
    assert (digest("sk-ig-wrong"), digest(ADMIN_KEY)) in compared


async def test_virtual_key_is_compared_in_constant_time(tmp_path, store, compared):
    key, record = await add_virtual(store)
    auth = make_auth(tmp_path, store, **configured())
    for headers in (bearer(key), {"x-api-key": key}, {"x-bf-vk": key}):
        compared.clear()
        principal = await auth.authenticate(headers)
        assert principal.id == record.id and principal.kind == "virtual_key" and not principal.admin
        assert (record.digest, digest(key)) in compared


async def test_argon2_runs_once_per_user_and_password(tmp_path, store, hasher):
    auth = make_auth(tmp_path, store, **configured())
    for _ in range(3):
        principal = await auth.authenticate(basic(USER, PASSWORD))
        assert principal.id == f"user:{USER}" and principal.kind == "user" and principal.alias == USER
    assert hasher.verified == [PASSWORD_HASH]
    for _ in range(2):  # a wrong password is never cached: each attempt pays the full price
        with pytest.raises(Unauthorized) as refused:
            await auth.authenticate(basic(USER, "wrong"))
        assert reason_of(refused.value) == "bad_password"
        assert refused.value.headers()["www-authenticate"] == 'Basic realm="imagegate"'
    assert hasher.verified == [PASSWORD_HASH] * 3
    await auth.authenticate(basic(USER, PASSWORD))
    assert len(hasher.verified) == 3


async def test_unknown_user_still_costs_one_argon2_verify(tmp_path, store, hasher):
    auth = make_auth(tmp_path, store, **configured())
    for attempt in range(1, 3):
        with pytest.raises(Unauthorized) as refused:
            await auth.authenticate(basic("mallory", PASSWORD))
        assert reason_of(refused.value) == "bad_password"  # the same answer as a wrong password
        assert hasher.verified == [principals._dummy_hash()] * attempt


async def test_a_broken_password_hash_is_a_refusal_not_a_crash(tmp_path, store):
    auth = make_auth(
        tmp_path, store, users=[{"name": USER, "password_hash": "$argon2id$not-a-hash"}], admin_key=ADMIN_KEY
    )
    with pytest.raises(Unauthorized) as refused:
        await auth.authenticate(basic(USER, PASSWORD))
    assert reason_of(refused.value) == "bad_password"


async def test_secrets_from_the_environment(tmp_path, store):
    environ = {"STATIC": STATIC_KEY, "PW": PASSWORD}
    settings = {
        "api_keys": [{"id": "env", "key_env": "STATIC"}, {"id": "absent", "key_env": "NOT_SET"}],
        "users": [{"name": USER, "password_env": "PW"}, {"name": "ghost", "password_env": "NOT_SET"}],
    }
    auth = make_auth(tmp_path, store, environ=environ, **settings)
    assert (await auth.authenticate(bearer(STATIC_KEY))).id == "env"
    assert (await auth.authenticate(basic(USER, PASSWORD))).id == f"user:{USER}"
    assert len(auth._keys) == 1 and set(auth._users) == {USER}  # a variable that is not set: no credential
    with pytest.raises(Unauthorized):
        await auth.authenticate(basic("ghost", ""))
    with_admin = make_auth(tmp_path, store, environ={"IMAGEGATE_ADMIN_KEY": ADMIN_KEY})
    assert (await with_admin.authenticate({"x-api-key": ADMIN_KEY})).admin


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"authorization": "Bearer"}, "malformed"),
        ({"authorization": "Negotiate abc"}, "malformed"),
        ({"authorization": "Basic %%%"}, "malformed"),
        ({"authorization": "Basic " + base64.b64encode(b"nocolon").decode()}, "malformed"),
        ({"x-bf-vk": STATIC_KEY}, "unknown"),
        ({"x-bf-vk": ADMIN_KEY}, "unknown"),
        (bearer("sk-ig-unknown"), "unknown"),
    ],
)
async def test_refusal_reasons(tmp_path, store, headers, reason):
    auth = make_auth(tmp_path, store, **configured())
    before = failures(reason)
    with pytest.raises(Unauthorized) as refused:
        await auth.authenticate(headers)
    assert reason_of(refused.value) == reason
    assert refused.value.status == 401 and refused.value.code == "invalid_api_key"
    assert failures(reason) == before + 1


async def test_every_credential_is_tried_and_a_refusal_counts_once(tmp_path, store):
    key, _ = await add_virtual(store)
    auth = make_auth(tmp_path, store, **configured())
    placeholder = bearer("unused")  # what the OpenAI SDKs always send next to the real credential
    assert (await auth.authenticate({**placeholder, "x-api-key": STATIC_KEY})).id == "static"
    assert (await auth.authenticate({**placeholder, "x-bf-vk": key})).kind == "virtual_key"
    assert (await auth.authenticate({"x-bf-vk": "sk-ig-wrong", "x-api-key": key})).kind == "virtual_key"
    assert (await auth.authenticate({"authorization": "Token x", "x-api-key": STATIC_KEY})).id == "static"
    before = {r: failures(r) for r in ("unknown", "malformed", "missing")}
    with pytest.raises(Unauthorized) as refused:  # nothing holds: the first failure answers, counted once
        await auth.authenticate({"x-bf-vk": STATIC_KEY, "authorization": "Token x", "x-api-key": "nope"})
    assert reason_of(refused.value) == "unknown"
    assert {r: failures(r) for r in before} == {**before, "unknown": before["unknown"] + 1}


async def test_scheme_names_are_case_insensitive_and_values_trimmed(tmp_path, store):
    auth = make_auth(tmp_path, store, **configured())
    assert (await auth.authenticate({"authorization": f"bearer  {STATIC_KEY} "})).id == "static"
    assert (await auth.authenticate({"authorization": f"BEARER {STATIC_KEY}"})).id == "static"
    assert (await auth.authenticate({"x-api-key": f" {STATIC_KEY}"})).id == "static"


async def test_expiry_and_revocation_follow_the_clock_and_the_store(tmp_path, store):
    now = [NOW]
    key, record = await add_virtual(store, expires_at=NOW + 60)
    auth = make_auth(tmp_path, store, clock=lambda: now[0], **configured(expires_at="2031-05-17T12:01:00+00:00"))
    for headers in (bearer(key), bearer(STATIC_KEY), basic(USER, PASSWORD)):
        await auth.authenticate(headers)
    now[0] = NOW + 60
    for headers in (bearer(key), bearer(STATIC_KEY), basic(USER, PASSWORD)):
        with pytest.raises(Unauthorized) as refused:
            await auth.authenticate(headers)
        assert reason_of(refused.value) == "expired"
    now[0] = NOW
    other = SqlKeyStore(tmp_path / "imagegate.db")  # another process (the CLI) revokes it
    try:
        await other.update_key(record.id, {"active": False, "revoked_at": NOW})
        with pytest.raises(Unauthorized) as refused:
            await auth.authenticate({"x-bf-vk": key})
        assert reason_of(refused.value) == "revoked"
        await other.delete_key(record.id)
        with pytest.raises(Unauthorized) as refused:
            await auth.authenticate({"x-bf-vk": key})
        assert reason_of(refused.value) == "unknown"
    finally:
        other.close()


async def test_disabled_static_credentials_are_revoked(tmp_path, store):
    auth = make_auth(tmp_path, store, **configured(active=False))
    for headers in (bearer(STATIC_KEY), basic(USER, PASSWORD)):
        with pytest.raises(Unauthorized) as refused:
            await auth.authenticate(headers)
        assert reason_of(refused.value) == "revoked"


async def test_anonymous_only_while_no_credential_exists(tmp_path, store):
    auth = make_auth(tmp_path, store)
    assert not auth.configured and await auth.anonymous()
    _, record = await add_virtual(store)
    assert not await auth.anonymous()
    await store.delete_key(record.id)
    assert await auth.anonymous()
    assert not await make_auth(tmp_path, store, admin_key=ADMIN_KEY).anonymous()


async def test_principals_carry_their_limits(tmp_path, store):
    limits = {"models": ["sd-*"], "rpm": 5, "max_concurrent": 2, "image_quota": 9, "quota_period": "hour"}
    key, _ = await add_virtual(store, **{**limits, "models": ["flux-*"]})
    auth = make_auth(tmp_path, store, **configured(**limits))
    for headers in (bearer(STATIC_KEY), basic(USER, PASSWORD)):
        p = await auth.authenticate(headers)
        assert (p.models, p.rpm, p.max_concurrent, p.image_quota, p.quota_period) == (("sd-*",), 5, 2, 9, "hour")
        assert not p.admin
    assert (await auth.authenticate(bearer(key))).models == ("flux-*",)


# -- Principal and period_bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "allowed", "refused"),
    [
        (("*",), ["sd-xl", "anything", ""], []),
        (("sd-*", "flux-?"), ["sd-xl", "sd-", "flux-1"], ["flux-12", "SD-xl", "xsd-xl"]),
        (("model-[ab]",), ["model-a", "model-b"], ["model-c"]),
        (("exact",), ["exact"], ["exactly", "Exact"]),
        ((), [], ["sd-xl", "*", ""]),
    ],
)
def test_principal_allows(patterns, allowed, refused):
    p = Principal(id="p", alias="p", kind="virtual_key", models=patterns)
    assert all(p.allows(m) for m in allowed)
    assert not any(p.allows(m) for m in refused)


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("hour", "2031-05-17T10:59:59.5+00:00", "2031-05-17T10:00:00+00:00", "2031-05-17T11:00:00+00:00"),
        ("hour", "2031-05-17T11:00:00+00:00", "2031-05-17T11:00:00+00:00", "2031-05-17T12:00:00+00:00"),
        ("day", "2031-05-17T23:59:59+00:00", "2031-05-17T00:00:00+00:00", "2031-05-18T00:00:00+00:00"),
        ("day", "2031-05-17T01:00:00+02:00", "2031-05-16T00:00:00+00:00", "2031-05-17T00:00:00+00:00"),
        ("month", "2031-05-17T12:00:00+00:00", "2031-05-01T00:00:00+00:00", "2031-06-01T00:00:00+00:00"),
        ("month", "2031-12-31T23:59:59+00:00", "2031-12-01T00:00:00+00:00", "2032-01-01T00:00:00+00:00"),
        ("month", "2032-02-29T12:00:00+00:00", "2032-02-01T00:00:00+00:00", "2032-03-01T00:00:00+00:00"),
        ("month", "2032-01-01T00:00:00+00:00", "2032-01-01T00:00:00+00:00", "2032-02-01T00:00:00+00:00"),
    ],
)
def test_period_bounds_are_utc_calendar_periods(period, now, start, end):
    assert period_bounds(period, ts(now)) == (ts(start), ts(end))


# -- Guard ------------------------------------------------------------------------------------------------------


def rejections(kind: str) -> float:
    return REGISTRY.get_sample_value("imagegate_limit_rejections_total", {"kind": kind}) or 0.0


async def test_guard_checks_model_then_concurrency_then_quota_then_rpm(store):
    guard = Guard(store, clock=lambda: NOW)
    p = Principal(id="p-order", alias="p", kind="virtual_key", models=("m-*",), max_concurrent=1, image_quota=1, rpm=1)
    first = await guard.admit(p, "m-1", 1)  # now every limit is spent at once

    before = {k: rejections(k) for k in ("model", "concurrency", "quota", "rpm")}
    with pytest.raises(PermissionDenied) as denied:
        await guard.admit(p, "x-1", 1)
    assert denied.value.code == "model_not_allowed" and denied.value.param == "model"
    with pytest.raises(RateLimited, match="in flight") as limited:
        await guard.admit(p, "m-1", 1)
    assert limited.value.retry_after == 1

    first.finish(images=1, pixel_steps=10)  # concurrency is free again; the quota is not (its row may be pending)
    with pytest.raises(QuotaExceeded) as spent:
        await guard.admit(p, "m-1", 1)
    assert spent.value.headers()["x-should-retry"] == "false"
    await guard.drain()
    with pytest.raises(QuotaExceeded):  # and still, once the usage row is written
        await guard.admit(p, "m-1", 1)

    with pytest.raises(RateLimited, match="per minute") as limited:
        await guard.admit(replace(p, image_quota=None), "m-1", 1)
    assert 1 <= limited.value.retry_after <= 60
    after = {k: rejections(k) for k in before}
    assert after == {"model": before["model"] + 1, "concurrency": before["concurrency"] + 1} | {
        "quota": before["quota"] + 2,
        "rpm": before["rpm"] + 1,
    }
    ticket = await guard.admit(replace(p, image_quota=None, rpm=None), "m-1", 1)
    ticket.finish()
    await guard.drain()


async def test_refusals_take_nothing(store):
    guard = Guard(store, clock=lambda: NOW)
    p = Principal(id="p-refusal", alias="p", kind="virtual_key", image_quota=1, rpm=2)
    t = await guard.admit(p, "m", 1)  # rpm: 1 of 2
    t.finish(images=1)
    await guard.drain()
    for _ in range(3):  # refused by the quota, before the rpm window is touched
        with pytest.raises(QuotaExceeded):
            await guard.admit(p, "m", 1)
    unlimited = replace(p, image_quota=None)
    (await guard.admit(unlimited, "m", 1)).finish()  # rpm: 2 of 2
    with pytest.raises(RateLimited):
        await guard.admit(unlimited, "m", 1)
    await guard.drain()


async def test_tickets_hold_their_reservation_and_finish_once(store):
    guard = Guard(store, clock=lambda: NOW)
    p = Principal(id="p-ticket", alias="p", kind="virtual_key", image_quota=3)
    t = await guard.admit(p, "m", 3)
    with pytest.raises(QuotaExceeded):  # all 3 are held by the request in flight
        await guard.admit(p, "m", 1)
    t.finish(images=1, pixel_steps=100)  # 2 were not delivered: given back
    t.finish(images=1, pixel_steps=100)  # a second finish changes nothing
    await guard.drain()
    assert await store.usage("p-ticket") == Usage(requests=1, images=1, pixel_steps=100)
    t2 = await guard.admit(p, "m", 2)
    with pytest.raises(QuotaExceeded):
        await guard.admit(p, "m", 1)
    t2.finish(images=0)
    await guard.drain()
    (await guard.admit(p, "m", 2)).finish(images=2)
    await guard.drain()
    assert (await store.usage("p-ticket")).images == 3


async def test_quota_counts_only_the_current_period(store):
    now = [ts("2031-05-17T23:00:00+00:00")]
    guard = Guard(store, clock=lambda: now[0])
    p = Principal(id="p-period", alias="p", kind="virtual_key", image_quota=2, quota_period="day")
    (await guard.admit(p, "m", 2)).finish(images=2)
    await guard.drain()
    with pytest.raises(QuotaExceeded) as spent:
        await guard.admit(p, "m", 1)
    assert spent.value.retry_after == 3600
    now[0] = ts("2031-05-18T00:00:00+00:00")
    (await guard.admit(p, "m", 2)).finish(images=2)
    await guard.drain()
    assert (await store.usage("p-period")).images == 4
