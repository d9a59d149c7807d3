"""In-process gateway with fake backends: the HTTP stack without torch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from litestar.testing import TestClient
from openai import OpenAI

from app.asgi import create_app
from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL, load_settings

BASE = "http://testserver.local"


def make_client(tmp_path, backends, **overrides) -> TestClient:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), **overrides})
    return TestClient(create_app(settings, backends=backends), base_url=BASE)


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(models=[DEMO_MODEL])


@pytest.fixture
def client(tmp_path, fake) -> Iterator[TestClient]:
    with make_client(tmp_path, [(fake, [DEMO_MODEL])]) as tc:
        yield tc


@pytest.fixture
def sdk(client) -> OpenAI:
    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", http_client=client, max_retries=0)
