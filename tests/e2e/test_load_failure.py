"""A model that cannot load: its reason in /ready and in the 503 answer, and no reload every few seconds."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from .conftest import Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("load-failure")
    (data / "config.toml").write_text(f'[[models]]\nname = "missing"\npath = "{data / "no-such-model"}"\n')
    srv = Server(data, "--config", str(data / "config.toml"), "--load-failure-backoff", "600")
    try:
        yield srv
    finally:
        srv.stop()


def backend(server: Server) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{server.url}/ready", timeout=5)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        [member] = ready.json()["backends"]
        if member["detail"].startswith("cannot load"):
            assert ready.status_code == 503
            return member
        time.sleep(0.2)
    raise TimeoutError(f"no load failure reported:\n{server.log.read_text()}")


def test_the_reason_is_in_ready_and_in_the_503(broken):
    member = backend(broken)
    assert member["state"] == "down" and "no-such-model" in member["detail"] and "next try in 600s" in member["detail"]
    with pytest.raises(openai.InternalServerError) as err:
        broken.sdk().images.generate(model="missing", prompt="a fox", size="64x64")
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "60"
    assert "cannot be served now: cannot load" in err.value.body["message"]
    assert "no-such-model" in err.value.body["message"]


def test_it_is_not_reloaded_every_few_seconds(broken):
    backend(broken)
    workers = broken.workers()
    time.sleep(3)  # the crash backoff would have restarted it within 1-2 s
    assert broken.workers() == workers == []
    scraped = httpx.get(f"{broken.url}/metrics", timeout=5).text.splitlines()
    assert [line for line in scraped if line.startswith("imagegate_worker_restarts_total{")] == []
