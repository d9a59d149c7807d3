"""The AUTOMATIC1111 dialect in process: state per principal (the current model, progress, interrupt), never
global; requests of each dialect counted under its label."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL
from tests.integration.conftest import make_client

OTHER = "imagegate-other"
ALICE = {"authorization": "Bearer sk-alice"}
BOB = {"authorization": "Bearer sk-bob"}


def key(secret: str, **fields) -> dict:
    return {"key_sha256": hashlib.sha256(secret.encode()).hexdigest(), **fields}


@pytest.fixture
def client(tmp_path):
    keys = [{"id": "alice", **key("sk-alice")}, {"id": "bob", **key("sk-bob")}]
    fake = FakeBackend(models=[DEMO_MODEL, OTHER], step_delay=0.02)
    models = [
        {"name": DEMO_MODEL, "path": str(tmp_path / "demo"), "size_multiple": 16},
        {"name": OTHER, "path": str(tmp_path / "other"), "size_multiple": 16},
    ]
    backends = [(fake, [DEMO_MODEL, OTHER])]
    with make_client(tmp_path, backends, models=models, api_keys=keys, job_poll_interval=0.05) as tc:
        tc.fake = fake  # type: ignore[attr-defined]
        yield tc


def test_the_current_model_is_per_principal(client):
    assert client.get("/sdapi/v1/options", headers=ALICE).json()["sd_model_checkpoint"] == DEMO_MODEL
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": OTHER, "samples_format": "png"}, headers=ALICE)
    assert r.status_code == 200 and r.json() is None
    assert client.get("/sdapi/v1/options", headers=ALICE).json()["sd_model_checkpoint"] == OTHER
    assert client.get("/sdapi/v1/options", headers=BOB).json()["sd_model_checkpoint"] == DEMO_MODEL
    body = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}
    assert client.post("/sdapi/v1/txt2img", json=body, headers=ALICE).status_code == 200
    assert client.fake.last_params.model == OTHER
    assert client.post("/sdapi/v1/txt2img", json=body, headers=BOB).status_code == 200
    assert client.fake.last_params.model == DEMO_MODEL
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, headers=BOB)
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    assert client.get("/sdapi/v1/options").status_code == 401
    assert set(client.get("/sdapi/v1/options").json()) == {"error", "detail", "body", "errors"}


def test_progress_and_interrupt_touch_only_the_callers_own_generation(client):
    answers: dict = {}

    def slow() -> None:
        body = {"prompt": "slow", "width": 64, "height": 64, "steps": 100}
        answers["alice"] = client.post("/sdapi/v1/txt2img", json=body, headers=ALICE)

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.get("/sdapi/v1/progress", headers=ALICE).json()["progress"] == 0:
        time.sleep(0.05)
    mine = client.get("/sdapi/v1/progress", headers=ALICE).json()
    assert 0 < mine["progress"] < 1 and mine["state"]["sampling_steps"] == 100
    assert client.get("/sdapi/v1/progress", headers=BOB).json()["progress"] == 0  # not Bob's
    assert client.post("/sdapi/v1/interrupt", headers=BOB).json() == {}  # Bob cannot stop Alice's
    assert client.get("/sdapi/v1/progress", headers=ALICE).json()["progress"] > 0
    assert client.post("/sdapi/v1/interrupt", headers=ALICE).json() == {}
    thread.join(30)
    assert answers["alice"].status_code == 200 and answers["alice"].json()["images"] == []


def test_requests_count_under_their_dialect(client):
    def count(dialect: str, status: str) -> float:
        labels = (f'dialect="{dialect}"', f'status_code="{status}"')
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("imagegate_dialect_requests_total{") and all(x in line for x in labels):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count("automatic1111", "200"), count("automatic1111", "404"), count("huggingface", "200")
    client.get("/sdapi/v1/options", headers=ALICE)
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, headers=ALICE)
    client.post(
        "/hf/models/imagegate-demo", json={"inputs": "a fox", "parameters": {"width": 64, "height": 64}}, headers=ALICE
    )
    after = count("automatic1111", "200"), count("automatic1111", "404"), count("huggingface", "200")
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
