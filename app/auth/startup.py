"""Whether `imagegate serve` may start with the credentials it has."""

from __future__ import annotations

from app.auth.principals import Authenticator, is_loopback
from app.config import Settings
from app.store.keys import SqlKeyStore


class InsecureBind(Exception):
    """A non-loopback address with no credential at all, and anonymous use not allowed."""


def has_credentials(settings: Settings) -> bool:
    """The same test the gateway applies on each request: a usable static credential, or any virtual key."""
    store = SqlKeyStore(settings.database())
    try:
        return Authenticator(settings, store).configured or bool(store.keys_sync())
    finally:
        store.close()


def check(settings: Settings) -> str | None:
    """None when credentials exist; a warning to log when the server will run open on loopback.

    Raises:
        InsecureBind: no credential, a non-loopback address, and ``allow_anonymous`` not set.
    """
    if has_credentials(settings):
        return None
    if not is_loopback(settings.host) and not settings.allow_anonymous:
        raise InsecureBind(
            f"refusing to serve {settings.host}:{settings.port} without any credential: configure api_keys or "
            "users, set IMAGEGATE_ADMIN_KEY and create keys, or pass --allow-anonymous"
        )
    return (
        f"no credential is configured: anyone who can reach {settings.host}:{settings.port} may use every model "
        "and the admin API"
    )
