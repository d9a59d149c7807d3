"""The custom-models inference API (``/infer_api/v1``) over raw HTTP against one real `imagegate serve`.

The server runs the embedded demo model, configured (JSON config file) into project ``studio`` with a sample image,
trigger words and a style; an admin key and a plain static key. Every route is called once on its happy path and
once with an error, and a real generation job runs on the demo model's worker and its image downloads.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from .conftest import Server

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"
ADMIN_KEY = "sk-infer-e2e-admin-0123456789abcdef"
USER_KEY = "sk-infer-e2e-user-0123456789abcdef"
INFER = "/infer_api/v1"
MODEL_PATH = f"{INFER}/projects/studio/models/{MODEL}"


def write_config(data_dir: Path) -> Path:
    sample = data_dir / "sample.png"
    Image.new("RGB", (80, 48), (10, 120, 200)).save(sample)
    demo = {
        # The embedded demo model (app.config.demo_model), placed in a project with what the API shows of it.
        "name": MODEL,
        "path": str(data_dir / "models" / MODEL),
        "demo": True,
        "devices": ["cpu"],
        "default_size": "256x256",
        "min_side": 64,
        "max_side": 1024,
        "size_multiple": 16,
        "default_steps": 20,
        "preview": "vae",
        "preview_downscale": 1,
        "default_scheduler": "ddim",
        "project": "studio",
        "sample_images": [str(sample)],
        "trigger_words": ["ohwx"],
        "style": "watercolor",
    }
    config = {
        "admin_key": ADMIN_KEY,
        "api_keys": [{"id": "user", "key_sha256": hashlib.sha256(USER_KEY.encode()).hexdigest()}],
        "models": [demo],
    }
    path = data_dir / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("infer-data")
    srv = Server(data_dir, "--config", str(write_config(data_dir)))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60) as client:
        yield client


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_aspect_ratios_and_dimensions(http):
    r = http.get(f"{INFER}/aspect_ratios")
    assert r.status_code == 200, r.text
    table = {row["aspect_ratio"]: (row["width"], row["height"]) for row in r.json()["data"]}
    assert len(table) == 11 and table["1:1"] == (512, 512), "the demo model reports the sd family: 512 px"
    assert error(http.get(f"{INFER}/aspect_ratios", params={"model": "nope"}), 404)["code"] == "model_not_found"

    r = http.get(f"{INFER}/output_image_dimensions/16%3A9")
    assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == table["16:9"]
    assert http.get(f"{INFER}/output_image_dimensions/16x9").json()["aspect_ratio"] == "16:9"
    e = error(http.get(f"{INFER}/output_image_dimensions/7:5"), 404)
    assert e["code"] == "unknown_aspect_ratio" and "16:9" in e["message"]


def test_projects_models_config_and_samples(http):
    assert http.get(f"{INFER}/projects").json()["data"] == [{"name": "studio", "model_count": 1}]
    assert error(http.get(f"{INFER}/projects/nope/models"), 404)["code"] == "project_not_found"
    models = http.get(f"{INFER}/projects/studio/models").json()["data"]
    assert [(m["name"], m["family"], m["trigger_words"]) for m in models] == [(MODEL, "sd", ["ohwx"])]

    config = http.get(f"{MODEL_PATH}/config").json()
    assert config["family"] == "sd" and "ddim" in config["schedulers"] and "text2img" in config["tasks"]
    assert config["default_steps"] == 20 and config["default_scheduler"] == "ddim"
    assert error(http.get(f"{INFER}/projects/studio/models/nope/config"), 404)["code"] == "model_not_found"

    samples = http.get(f"{MODEL_PATH}/images").json()["data"]
    assert [(s["name"], s["width"], s["height"]) for s in samples] == [("sample.png", 80, 48)]
    image = http.get(samples[0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (80, 48)
    error(http.get(f"{MODEL_PATH}/images/9"), 404)


def test_generation_job_to_downloaded_image(http):
    body = {"project": "studio", "model": MODEL, "prompt": "a red fox", "size": "64x64", "steps": 2, "seed": 3}
    r = http.post(f"{INFER}/generations", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["result_url"] and job["status"] == "queued"
    deadline = time.monotonic() + 120
    while True:
        r = http.get(job["result_url"])
        assert r.status_code in (200, 202), r.text
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert r.json()["status"] in ("queued", "running")
        time.sleep(0.2)
    done = r.json()
    assert done["status"] == "completed", done
    assert (done["size"], done["seed"], done["prompt"]) == ("64x64", 3, "a red fox")
    image = httpx.get(done["images"][0]["url"], timeout=30)  # signed: no credential needed
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)

    listed = http.get(f"{INFER}/jobs/completed").json()["data"]
    assert job["job_id"] in [j["job_id"] for j in listed]
    assert http.get(f"{INFER}/jobs/failed").json()["data"] == []
    assert http.get(f"{INFER}/jobs", params={"limit": 1}).json()["data"][0]["job_id"] == job["job_id"]
    error(http.get(f"{INFER}/jobs", params={"limit": 0}), 400)

    r = http.delete(f"{INFER}/jobs/{job['job_id']}")
    assert r.status_code == 200 and r.json() == {"job_id": job["job_id"], "deleted": True}
    assert error(http.get(job["result_url"]), 404)["code"] == "job_not_found"
    assert error(http.delete(f"{INFER}/jobs/{job['job_id']}"), 404)["code"] == "job_not_found"
    r = http.delete(f"{INFER}/jobs")
    assert r.status_code == 200 and r.json()["deleted"] >= 0

    e = error(http.post(f"{INFER}/generations", json={**body, "aspect_ratio": "7:5", "size": None}), 400)
    assert e["code"] == "unknown_aspect_ratio"


def test_enhance_prompt(http):
    r = http.post(f"{MODEL_PATH}/enhance-prompt", json={"prompt": "a cat"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["method"] == "template" and out["enhanced_prompt"].startswith("ohwx, a cat, watercolor")
    assert error(http.post(f"{MODEL_PATH}/enhance-prompt", json={"prompt": ""}), 400)["param"] == "prompt"


def test_secure_route(server, http):
    assert error(httpx.get(f"{server.url}{INFER}/secure-route"), 401)["code"] == "invalid_api_key"
    assert error(http.get(f"{INFER}/secure-route"), 403)["code"] == "admin_required"
    r = httpx.get(f"{server.url}{INFER}/secure-route", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200 and r.json()["principal"] == "admin"
