"""Virtual keys against a real `imagegate serve`: the admin API, the `imagegate keys` CLI, limits and usage."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from .conftest import Server

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"
ADMIN_KEY = "sk-ig-admin-key-for-the-e2e-tests-0123456789"


class Gateway:
    """A server with an admin key on one data dir, that a test may restart."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server = self._start()

    def _start(self) -> Server:
        srv = Server(self.data_dir)
        try:
            srv.wait_ready()
        except BaseException:
            srv.stop()
            raise
        return srv

    def restart(self) -> None:
        self.server.stop()
        self.server = self._start()

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.server.url}/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
        )

    def sdk(self, key: str) -> OpenAI:
        return OpenAI(base_url=f"{self.server.url}/v1", api_key=key, max_retries=0, timeout=120)

    def cli(self, *args: str) -> dict:
        cmd = [sys.executable, "-m", "app", "keys", *args, "--data-dir", str(self.data_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEGATE_ADMIN_KEY", ADMIN_KEY)  # the server subprocess inherits it
        gw = Gateway(tmp_path_factory.mktemp("auth-data"))
        try:
            yield gw
        finally:
            gw.server.stop()


def generate(sdk: OpenAI) -> None:
    result = sdk.images.generate(model=MODEL, prompt="a key", size="64x64")
    assert len(result.data) == 1 and result.data[0].b64_json


def test_admin_api_key_works_until_revoked(gateway):
    with gateway.admin() as admin:
        created = admin.post("/keys", json={"alias": "api", "models": ["imagegate-*"]})
        assert created.status_code == 201, created.text
        body = created.json()
        key, key_id = body["key"], body["id"]
        sdk = gateway.sdk(key)
        generate(sdk)
        with pytest.raises(openai.AuthenticationError):
            gateway.sdk("sk-ig-not-a-key").images.generate(model=MODEL, prompt="x", size="64x64")
        # A virtual key is not an admin credential.
        other = httpx.post(f"{gateway.server.url}/admin/keys", json={"alias": "x"}, headers={"x-api-key": key})
        assert other.status_code == 403
        listed = admin.get("/keys")
        assert listed.status_code == 200 and key not in listed.text
        revoked = admin.post(f"/keys/{key_id}/revoke")
        assert revoked.status_code == 200 and revoked.json()["active"] is False
        with pytest.raises(openai.AuthenticationError):
            sdk.images.generate(model=MODEL, prompt="after revocation", size="64x64")


def test_cli_key_is_seen_at_once_and_limited(gateway):
    created = gateway.cli("create", "--alias", "cli", "--rpm", "2")
    sdk = gateway.sdk(created["key"])
    generate(sdk)
    generate(sdk)
    with pytest.raises(openai.RateLimitError):
        generate(sdk)
    revoked = gateway.cli("revoke", created["id"])
    assert revoked["active"] is False
    with pytest.raises(openai.AuthenticationError) as raised:
        generate(sdk)
    assert raised.value.status_code == 401


def test_usage_survives_a_restart(gateway):
    with gateway.admin() as admin:
        created = admin.post("/keys", json={"alias": "usage"}).json()
    sdk = gateway.sdk(created["key"])
    generate(sdk)
    result = sdk.images.generate(model=MODEL, prompt="two", size="64x64", n=2)
    assert len(result.data) == 2
    gateway.restart()
    with gateway.admin() as admin:
        shown = admin.get(f"/keys/{created['id']}")
    assert shown.status_code == 200, shown.text
    view = shown.json()
    assert view["usage"]["requests"] == 2 and view["usage"]["images"] == 3
    assert view["period_usage"]["images"] == 3 and view["usage"]["pixel_steps"] > 0
    assert "key" not in view
    # The CLI reads the same store.
    assert gateway.cli("show", created["id"])["usage"] == view["usage"]
