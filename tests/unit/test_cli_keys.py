"""``imagegate keys ...``, ``hash-password``, ``hash-key`` and ``new-key`` through click's test runner."""

from __future__ import annotations

import hashlib
import json

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner

from app.cli import main


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    for name in ("IMAGEGATE_CONFIG", "IMAGEGATE_DATA_DIR", "IMAGEGATE_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    return str(tmp_path / "data")


@pytest.fixture
def cli(data_dir):
    runner = CliRunner()

    def run(*args: str, input: str | None = None, code: int = 0):
        result = runner.invoke(main, ["keys", *args, "--data-dir", data_dir], input=input)
        assert result.exit_code == code, (result.output, result.stderr)
        return result

    return run


def test_round_trip(cli):
    created = cli("create", "--alias", "team-a", "--model", "sd-*", "--rpm", "10", "--image-quota", "100")
    view = json.loads(created.stdout)
    secret = view["key"]
    assert secret.startswith("sk-ig-") and view["prefix"] == secret[:10]
    assert view["alias"] == "team-a" and view["models"] == ["sd-*"] and view["rpm"] == 10
    assert view["image_quota"] == 100 and view["quota_period"] == "day" and view["active"] is True
    assert view["usage"] == {"requests": 0, "images": 0, "pixel_steps": 0}
    key_id = view["id"]

    listed = cli("list")
    assert secret not in listed.stdout
    body = json.loads(listed.stdout)
    assert [k["id"] for k in body["data"]] == [key_id] and "key" not in body["data"][0]

    shown = cli("show", key_id)
    assert secret not in shown.stdout
    shown_view = json.loads(shown.stdout)
    assert "key" not in shown_view and shown_view["usage"]["requests"] == 0 and shown_view["rpm"] == 10

    updated = json.loads(cli("update", key_id, "--rpm", "3", "--quota-period", "hour").stdout)
    assert updated["rpm"] == 3 and updated["quota_period"] == "hour" and updated["image_quota"] == 100
    assert updated["active"] is True  # not named: unchanged

    cleared = json.loads(cli("update", key_id, "--clear", "rpm", "--clear", "image-quota").stdout)
    assert cleared["rpm"] is None and cleared["image_quota"] is None and cleared["alias"] == "team-a"

    revoked = json.loads(cli("revoke", key_id).stdout)
    assert revoked["active"] is False and revoked["revoked_at"] is not None
    again = json.loads(cli("update", key_id, "--active").stdout)
    assert again["active"] is True and again["revoked_at"] is None

    deleted = cli("delete", key_id)
    assert json.loads(deleted.stdout)["deleted"] is True
    assert json.loads(cli("list").stdout)["data"] == []
    for out in (listed, shown, deleted):
        assert secret not in out.output


def test_create_options(cli):
    view = json.loads(
        cli(
            "create",
            "--alias",
            "x",
            "--max-concurrent",
            "2",
            "--quota-period",
            "month",
            "--expires-at",
            "2040-01-01T00:00:00+00:00",
            "--inactive",
        ).stdout
    )
    assert view["max_concurrent"] == 2 and view["quota_period"] == "month" and view["active"] is False
    assert view["expires_at"].startswith("2040-01-01T00:00:00") and view["models"] == ["*"]
    cleared = json.loads(cli("update", view["id"], "--clear", "expires_at").stdout)
    assert cleared["expires_at"] is None and cleared["active"] is False


@pytest.mark.parametrize("verb", ["show", "update", "revoke", "delete"])
def test_unknown_id_exits_1(cli, verb):
    result = cli(verb, "key_nope", code=1)
    assert "key_nope" in result.stderr and result.stdout == ""


def test_usage_errors(cli):
    assert "--alias" in cli("create", code=2).stderr
    assert "expires_at" in cli("create", "--alias", "x", "--expires-at", "soon", code=2).stderr
    assert cli("create", "--alias", "x", "--rpm", "-1", code=2).stdout == ""
    assert "alias" in cli("create", "--alias", "", code=2).stderr
    key_id = json.loads(cli("create", "--alias", "x").stdout)["id"]
    assert "conflicts" in cli("update", key_id, "--rpm", "2", "--clear", "rpm", code=2).stderr
    assert cli("update", key_id, "--clear", "alias", code=2).stdout == ""
    assert "expires_at" in cli("update", key_id, "--expires-at", "never", code=2).stderr


def test_hash_key():
    result = CliRunner().invoke(main, ["hash-key"], input="sk-ig-abc\n")
    assert result.exit_code == 0
    assert result.stdout.strip() == hashlib.sha256(b"sk-ig-abc").hexdigest()


def test_hash_password_verifies():
    result = CliRunner().invoke(main, ["hash-password"], input="s3cret pass\n")
    assert result.exit_code == 0
    hashed = result.stdout.strip()
    assert hashed.startswith("$argon2")
    assert PasswordHasher().verify(hashed, "s3cret pass")


def test_empty_secret_is_refused():
    assert CliRunner().invoke(main, ["hash-password"], input="\n").exit_code == 2


def test_new_key():
    first, second = (CliRunner().invoke(main, ["new-key"]).stdout.strip() for _ in range(2))
    assert first.startswith("sk-ig-") and len(first) > 40 and first != second
