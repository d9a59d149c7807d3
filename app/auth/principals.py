"""Who is calling: principals, and how credentials are turned into them.

Credentials accepted on every ``/v1`` route, any one of them:

- ``Authorization: Bearer <key>`` and ``x-api-key: <key>``: a static API key, a virtual key, or the admin key;
- ``x-bf-vk: <virtual key>``: virtual keys only (Bifrost's header);
- ``Authorization: Basic base64(user:password)``: a configured user.

Secrets are compared as SHA-256 digests (keys have at least 128 random bits, so a fast digest is enough) or with
argon2 (passwords), always in constant time, and never logged.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from app import metrics
from app.config import Limits, Settings
from app.errors import Unauthorized
from app.store.keys import KeyRecord, KeyStore

KEY_PREFIX = "sk-ig-"
_hasher = PasswordHasher()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_key() -> str:
    """A new virtual key: ``sk-ig-`` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=datetime.now().astimezone().tzinfo).timestamp()
    return moment.timestamp()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and its limits; ``models`` are fnmatch patterns (empty: no model)."""

    id: str
    alias: str
    kind: str
    models: tuple[str, ...] = ("*",)
    rpm: int | None = None
    max_concurrent: int | None = None
    image_quota: int | None = None
    quota_period: str = "day"
    admin: bool = False

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


ANONYMOUS = Principal(id="anonymous", alias="anonymous", kind="anonymous", admin=True)
"""Used only when no credential is configured at all (and then only on loopback unless allowed)."""


def _limits(source: Limits | KeyRecord) -> dict:
    return {
        "models": tuple(source.models),
        "rpm": source.rpm,
        "max_concurrent": source.max_concurrent,
        "image_quota": source.image_quota,
        "quota_period": source.quota_period,
    }


@dataclass
class _Static:
    principal: Principal
    expires_at: float | None
    active: bool


@dataclass
class Authenticator:
    """Turns request headers into a :class:`Principal` or raises :class:`Unauthorized` (401)."""

    settings: Settings
    store: KeyStore
    clock: Callable[[], float] = time.time
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    _keys: dict[str, _Static] = field(default_factory=dict)
    _users: dict[str, tuple[str, _Static]] = field(default_factory=dict)
    _admin_digest: str | None = None
    _virtual: dict[str, KeyRecord] = field(default_factory=dict)
    _version: int = -1
    _verified: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        admin_key = self.environ.get("IMAGEGATE_ADMIN_KEY") or s.admin_key
        self._admin_digest = digest(admin_key) if admin_key else None
        for k in s.api_keys:
            secret_digest = k.key_sha256 or digest(self.environ.get(k.key_env, ""))
            if k.key_env and not self.environ.get(k.key_env):
                continue  # its variable is not set: the key does not exist here
            p = Principal(id=k.id, alias=k.alias or k.id, kind="api_key", admin=k.admin, **_limits(k))
            self._keys[secret_digest] = _Static(p, parse_time(k.expires_at), k.active)
        for u in s.users:
            stored = u.password_hash or (
                hash_password(self.environ[u.password_env]) if u.password_env in self.environ else ""
            )
            if not stored:
                continue
            p = Principal(id=f"user:{u.name}", alias=u.name, kind="user", admin=u.role == "admin", **_limits(u))
            self._users[u.name] = (stored, _Static(p, parse_time(u.expires_at), u.active))

    _has_virtual_keys: bool = False

    @property
    def configured(self) -> bool:
        """Whether any static credential exists (virtual keys are checked separately)."""
        return bool(self._keys or self._users or self._admin_digest)

    @functools.cached_property
    def anonymous_allowed(self) -> bool:
        """Anonymous use is possible only on loopback, or where explicitly allowed."""
        return self.settings.allow_anonymous or is_loopback(self.settings.host)

    async def anonymous(self) -> bool:
        """True while no credential exists at all (no static one, no virtual key) and anonymity is allowed."""
        if self.configured or not self.anonymous_allowed:
            return False
        await self._refresh()
        return not self._has_virtual_keys

    async def _refresh(self) -> None:
        version = await self.store.version()
        if version != self._version:  # any change anywhere (API, CLI, another replica) empties the cache
            self._virtual.clear()
            self._has_virtual_keys = await self.store.has_keys()
            self._version = version

    def _fail(self, reason: str, scheme: str = "Bearer") -> Unauthorized:
        messages = {
            "missing": "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            "malformed": "The Authorization header is malformed.",
            "unknown": "Incorrect API key provided.",
            "expired": "This API key has expired.",
            "revoked": "This API key has been revoked or disabled.",
            "bad_password": "Incorrect user name or password.",
        }
        error = Unauthorized(messages[reason], headers={"www-authenticate": f'{scheme} realm="imagegate"'})
        error.reason = reason  # type: ignore[attr-defined]
        return error

    def _check(self, entry: _Static, scheme: str = "Bearer") -> Principal:
        if not entry.active:
            raise self._fail("revoked", scheme)
        if entry.expires_at is not None and self.clock() >= entry.expires_at:
            raise self._fail("expired", scheme)
        return entry.principal

    async def _virtual_key(self, key_digest: str) -> KeyRecord | None:
        await self._refresh()
        record = self._virtual.get(key_digest)
        if record is None:
            record = await self.store.key_by_digest(key_digest)
            if record is not None:  # misses are not cached: random keys must not grow the gateway's memory
                self._virtual[key_digest] = record
        return record

    async def _by_key(self, key: str, *, virtual_only: bool = False) -> Principal:
        key_digest = digest(key)
        if not virtual_only:
            if self._admin_digest and hmac.compare_digest(key_digest, self._admin_digest):
                return Principal(id="admin", alias="admin", kind="admin", admin=True)
            static = self._keys.get(key_digest)
            if static is not None:
                return self._check(static)
        record = await self._virtual_key(key_digest)
        if record is None or not hmac.compare_digest(record.digest, key_digest):
            raise self._fail("unknown")
        entry = _Static(
            Principal(id=record.id, alias=record.alias or record.id, kind="virtual_key", **_limits(record)),
            record.expires_at,
            record.active,
        )
        return self._check(entry)

    def _by_password(self, value: str) -> Principal:
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise self._fail("malformed", "Basic") from None
        if not sep:
            raise self._fail("malformed", "Basic")
        stored, entry = self._users.get(user, ("", None))
        token = digest(f"{user}\0{password}\0{stored}")
        if entry is None or token not in self._verified:
            try:  # an unknown user costs the same argon2 work as a known one
                ok = _hasher.verify(stored or _dummy_hash(), password) and entry is not None
            except (VerificationError, InvalidHashError):
                ok = False
            if not ok or entry is None:
                raise self._fail("bad_password", "Basic")
            self._verified[token] = self.clock()  # argon2 is slow on purpose: verify each password once
        return self._check(entry, "Basic")

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The principal behind a request's headers (raises :class:`Unauthorized`).

        Every credential present is tried, in the order x-bf-vk, Authorization, x-api-key, and the first that holds
        wins: the OpenAI SDKs always send ``Authorization: Bearer``, so a client that puts its key in another header
        next to a placeholder bearer still gets in. When none holds, the first one's failure is the answer.
        """
        attempts = []
        if vk := headers.get("x-bf-vk", "").strip():
            attempts.append(lambda: self._by_key(vk, virtual_only=True))
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            attempts.append(lambda: self._by_key(value))
        elif scheme.lower() == "basic" and value:
            attempts.append(lambda: self._password_attempt(value))
        elif authorization:
            attempts.append(lambda: self._malformed())
        if key := headers.get("x-api-key", "").strip():
            attempts.append(lambda: self._by_key(key))
        first: Unauthorized | None = None
        for attempt in attempts:
            try:
                return await attempt()
            except Unauthorized as e:
                first = first or e
        error = first or self._fail("missing")
        metrics.AUTH_FAILURES.labels(getattr(error, "reason", "unknown")).inc()
        raise error

    async def _password_attempt(self, value: str) -> Principal:
        return self._by_password(value)

    async def _malformed(self) -> Principal:
        raise self._fail("malformed")
