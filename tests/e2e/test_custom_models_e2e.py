"""Custom models (seed 001) through a real `imagegate serve` on the demo model: train LoRAs over HTTP, predict with
them, resume a training after kill -9 of its worker, cancel one mid-way."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import time

import httpx
import pytest
from PIL import Image as PILImage

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"
API = "/custom-models/v1"
TRAINING = {"max_steps": 240, "preview_every": 50}
"""Strength 0 trains 100 steps (a few seconds on CPU), strength 10 the 240 of the cap."""


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, demo_data_dir, server):
    data = tmp_path_factory.mktemp("custom")
    shutil.copytree(demo_data_dir / "models", data / "models")  # the session's demo model: no second build
    srv = Server(data, env={"IMAGEGATE_TRAINING": json.dumps(TRAINING)})
    try:
        srv.wait_ready()
        srv.data = data  # type: ignore[attr-defined]
        yield srv
    finally:
        srv.stop()


def photo(colour: tuple[int, int, int], k: int, fmt: str = "PNG") -> bytes:
    """A 'product photo': a coloured square on white, placed by ``k``."""
    image = PILImage.new("RGB", (96, 96), (255, 255, 255))
    image.paste(colour, (10 + 8 * k, 20, 60 + 8 * k, 70))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def model_with_photos(client: httpx.Client, name: str, colour: tuple[int, int, int]) -> str:
    r = client.post(f"{API}/models", json={"displayName": name})
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]
    for k in range(4):
        fmt, media = ("JPEG", "image/jpeg") if k == 3 else ("PNG", "image/png")
        r = client.post(
            f"{API}/models/{model_id}/data",
            content=photo(colour, k, fmt),
            headers={"content-type": media},
            params={"caption": "a product on white"} if k == 0 else None,
        )
        assert r.status_code == 201, r.text
    return model_id


def wait_training(client: httpx.Client, model_id: str, training_id: str, until=("succeeded",), timeout=180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"{API}/models/{model_id}/trainings/{training_id}").json()
        if body["status"] in until:
            return body
        assert body["status"] == "processing", body
        time.sleep(0.1)
    raise TimeoutError(f"training {training_id}: {body}")


def train(client: httpx.Client, model_id: str, strength: int) -> dict:
    r = client.post(f"{API}/models/{model_id}/trainings", json={"trainingStrength": strength, "trainingSpeed": "fast"})
    assert r.status_code == 201, r.text
    return r.json()


def predict(client: httpx.Client, scale_configs: dict, prompt: str, **extra) -> tuple[bytes, dict]:
    body = {
        "scaleConfigs": scale_configs,
        "prompt": prompt,
        "seed": 5,
        "image_size": {"width": 512, "height": 512},
        "num_inference_steps": 2,
        **extra,
    }
    r = client.post(f"{API}/predictions", json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = client.get(f"{API}/predictions/{created['predictionId']}").json()
        if status["status"] != "processing":
            break
        time.sleep(0.1)
    assert status["status"] == "succeeded", status
    assert status["warnings"] == created["warnings"]
    image = httpx.get(status["outputImages"][0])  # a signed URL: no credential needed
    assert image.status_code == 200
    return image.content, created


def test_train_two_custom_models_and_predict_with_them(trainer):
    client = httpx.Client(base_url=trainer.url, timeout=60)
    red = model_with_photos(client, "Summer Collection Style Model", (220, 20, 20))
    blue = model_with_photos(client, "Winter Collection", (20, 20, 220))
    started = train(client, red, 0)
    assert re.fullmatch(r"[A-Z]{3}[0-9]{2}[A-Z]{2}", started["triggerWord"])
    assert started["status"] == "processing"
    hp = started["hyperparameters"]
    assert (hp["rank"], hp["steps"], hp["resolution"], hp["checkpointEvery"]) == (8, 100, 128, 25)
    assert hp["learningRate"] == pytest.approx(1e-4)
    # the training reports its steps and loss while it runs
    seen = None
    deadline = time.monotonic() + 120
    while seen is None and time.monotonic() < deadline:
        body = client.get(f"{API}/models/{red}/trainings/{started['trainingId']}").json()
        if body["status"] == "processing" and body["progress"] and body["progress"]["step"] < 100:
            seen = body["progress"]
        assert body["status"] in ("processing", "succeeded"), body
        time.sleep(0.05)
    assert seen is not None and seen["total"] == 100 and math.isfinite(seen["loss"]), seen
    done = wait_training(client, red, started["trainingId"])
    assert done["triggerWord"] == started["triggerWord"] and done["progress"]["percent"] == 100
    assert len(done["previewImages"]) == 2 and done["previewImages"][0].startswith("data:image/png;base64,")
    assert done["attempts"] == 1 and done["error"] is None
    listed = client.get(f"{API}/models/{red}/trainings").json()
    assert listed == [{"id": started["trainingId"], "status": "succeeded"}]
    blue_training = train(client, blue, 0)
    wait_training(client, blue, blue_training["trainingId"])
    assert client.get(f"{API}/models/{red}").json()["latestTrainingId"] == started["trainingId"]

    trigger_red, trigger_blue = started["triggerWord"], blue_training["triggerWord"]
    prompt = f"a summer dress in style of {trigger_red} and {trigger_blue}"
    off, _ = predict(client, {"1": {"modelId": red, "scale": 0}}, prompt)
    sdk = trainer.sdk()
    base = sdk.images.generate(
        model=MODEL, prompt=prompt, size="512x512", extra_body={"seed": 5, "num_inference_steps": 2}
    )
    assert off == base64.b64decode(base.data[0].b64_json)  # scale 0 is no adapter
    red_only, created = predict(client, {"1": {"modelId": red, "scale": 1.0}}, prompt)
    assert created["warnings"] == []
    blue_only, _ = predict(client, {"1": {"modelId": blue, "trainingId": blue_training["trainingId"]}}, prompt)
    both, _ = predict(
        client, {"1": {"modelId": red, "scale": 0.6}, "2": {"modelId": blue, "scale": 0.8}}, prompt, num_images=2
    )
    assert len({off, red_only, blue_only, both}) == 4  # each adapter changes the image; together, differently
    again, _ = predict(client, {"1": {"modelId": red, "scale": 1.0}}, prompt)
    assert again == red_only  # same seed, same adapters: the same image

    # a prompt without the trigger word still runs, with a warning
    _, created = predict(client, {"1": {"modelId": red}}, "a summer dress")
    assert len(created["warnings"]) == 1 and trigger_red in created["warnings"][0]

    # seed 000's listings show the custom models, and generate with them
    projects = {p["name"]: p["model_count"] for p in client.get("/infer_api/v1/projects").json()["data"]}
    assert projects["custom-models"] == 2
    models = client.get("/infer_api/v1/projects/custom-models/models").json()["data"]
    assert {m["name"]: m["trigger_words"] for m in models} == {red: [trigger_red], blue: [trigger_blue]}
    r = client.post(
        "/infer_api/v1/generations",
        json={"project": "custom-models", "model": red, "prompt": prompt, "seed": 5, "size": "512x512", "steps": 2},
    )
    assert r.status_code == 202, r.text
    result_url = r.json()["result_url"]
    deadline = time.monotonic() + 60
    while (result := client.get(result_url)).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert result.json()["status"] == "completed", result.text
    assert httpx.get(result.json()["images"][0]["url"]).content == red_only  # its newest adapter at scale 1

    # a deleted model can no longer be used; its predictions stay readable
    assert client.delete(f"{API}/models/{blue}").json() == {"id": blue, "deleted": True}
    r = client.post(f"{API}/predictions", json={"scaleConfigs": {"1": {"modelId": blue}}, "prompt": prompt})
    assert r.status_code == 400 and r.json()["error"]["param"] == "scaleConfigs.1.modelId"
    assert client.get(f"{API}/models/{blue}").status_code == 404
    r = client.post(f"{API}/models/{blue}/trainings", json={})
    assert r.status_code == 404


def job_events(data_dir, training_id: str) -> list[tuple[str, dict]]:
    with sqlite3.connect(f"file:{data_dir / 'imagegate.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT type, data FROM job_events WHERE job_id = ? ORDER BY id", (training_id,)).fetchall()
    return [(t, json.loads(d)) for t, d in rows]


def test_a_training_resumes_from_its_checkpoint_after_its_worker_is_killed(trainer):
    client = httpx.Client(base_url=trainer.url, timeout=60)
    model_id = model_with_photos(client, "Resumed", (20, 160, 20))
    started = train(client, model_id, 10)
    training_id = started["trainingId"]
    assert started["hyperparameters"]["steps"] == 240 and started["hyperparameters"]["checkpointEvery"] == 60
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = client.get(f"{API}/models/{model_id}/trainings/{training_id}").json()["progress"]
        if progress and progress["step"] > 60:
            break
        time.sleep(0.02)
    assert 60 < progress["step"] < 200, progress  # past the first checkpoint, well before the end
    (worker,) = trainer.workers()
    os.kill(worker, signal.SIGKILL)
    done = wait_training(client, model_id, training_id)
    assert done["attempts"] == 2 and done["error"] is None
    events = job_events(trainer.data, training_id)
    second = next(i for i, (t, d) in enumerate(events) if t == "started" and d["attempt"] == 2)
    resumed_steps = [d["step"] for t, d in events[second:] if t == "progress"]
    assert resumed_steps and resumed_steps[0] > 60 and resumed_steps[-1] == 240  # from the checkpoint, not step 1
    # the resumed training made a working adapter
    image, _ = predict(client, {"1": {"modelId": model_id}}, f"a dress in style of {started['triggerWord']}")
    assert image.startswith(b"\x89PNG")
    assert not list((trainer.data / "job-inputs").glob(f"{training_id}_*"))  # its copies and checkpoint are gone


def test_a_training_cancelled_mid_way_keeps_no_adapter(trainer):
    client = httpx.Client(base_url=trainer.url, timeout=60)
    model_id = model_with_photos(client, "Cancelled", (160, 160, 20))
    training_id = train(client, model_id, 10)["trainingId"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = client.get(f"{API}/models/{model_id}/trainings/{training_id}").json()["progress"]
        if progress and progress["step"] >= 10:
            break
        time.sleep(0.02)
    r = client.post(f"{API}/models/{model_id}/trainings/{training_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
    assert r.json()["progress"]["step"] < 240
    assert client.get(f"{API}/models/{model_id}").json()["latestTrainingId"] is None
    assert [a for a in client.get("/v1/adapters").json()["data"] if a["name"] == "Cancelled"] == []
    r = client.post(f"{API}/predictions", json={"scaleConfigs": {"1": {"modelId": model_id}}, "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "training_not_ready"
    # soft delete of a training hides it without cancelling anything
    assert client.delete(f"{API}/models/{model_id}/trainings/{training_id}").json()["deleted"] is True
    assert client.get(f"{API}/models/{model_id}/trainings").json() == []
    # the worker is free for inference at once
    sdk = trainer.sdk()
    assert sdk.images.generate(model=MODEL, prompt="a fox", size="64x64").data[0].b64_json
