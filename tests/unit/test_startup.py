from __future__ import annotations

import pytest

from app.auth.principals import digest, new_key
from app.auth.startup import InsecureBind, check
from app.config import load_settings
from app.store.keys import KeyRecord, SqlKeyStore


def settings(tmp_path, **overrides):
    return load_settings(environ={}, overrides={"data_dir": str(tmp_path), **overrides})


def test_loopback_without_credentials_runs_open_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGEGATE_ADMIN_KEY", raising=False)
    for host in ("127.0.0.1", "localhost", "::1"):
        assert "no credential is configured" in check(settings(tmp_path, host=host))


def test_public_bind_without_credentials_is_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGEGATE_ADMIN_KEY", raising=False)
    with pytest.raises(InsecureBind, match="--allow-anonymous"):
        check(settings(tmp_path, host="0.0.0.0"))
    assert check(settings(tmp_path, host="0.0.0.0", allow_anonymous=True)) is not None


def test_any_credential_allows_a_public_bind(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGEGATE_ADMIN_KEY", raising=False)
    assert check(settings(tmp_path, host="0.0.0.0", admin_key="sk-admin")) is None
    monkeypatch.setenv("IMAGEGATE_ADMIN_KEY", "sk-admin")
    assert check(settings(tmp_path, host="0.0.0.0")) is None


def test_a_virtual_key_in_the_store_counts_as_a_credential(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGEGATE_ADMIN_KEY", raising=False)
    store = SqlKeyStore(tmp_path / "imagegate.db")
    key = new_key()
    store.add_key_sync(KeyRecord(id="k1", alias="a", digest=digest(key), prefix=key[:10], models=["*"]))
    store.close()
    assert check(settings(tmp_path, host="0.0.0.0")) is None
