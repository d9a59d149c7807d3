"""The ModelsLab dialect (seed 004) through a real `imagegate serve`: the key in the body, values as strings and
yes/no, success or processing + fetch, future links, base64, a LoRA by name, its webhook, and its error envelope."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import msgspec
import pytest
from PIL import Image

from app.config import demo_model
from tests.e2e.conftest import Server, free_port
from tests.lora import make_lora
from tests.safety import make_checker

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"
KEY = "ml-secret-key"


class Receiver:
    """A webhook receiver on localhost that keeps what it is sent."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def ml(tmp_path_factory, demo_data_dir, server):
    data = tmp_path_factory.mktemp("modelslab")
    shutil.copytree(demo_data_dir / "models", data / "models")
    make_lora(data / "models" / MODEL, data / "adapters" / "ink.safetensors", 1)
    model = demo_model(str(data))
    model.adapters_dir = str(data / "adapters")
    model.safety_checker = str(make_checker(data / "checker"))  # flags every image
    env = {
        "IMAGEGATE_MODELS": json.dumps([msgspec.to_builtins(model)]),
        "IMAGEGATE_API_KEYS": json.dumps([{"id": "ml", "key_env": "ML_E2E_KEY"}]),
        "ML_E2E_KEY": KEY,
        "IMAGEGATE_WEBHOOK_ALLOWLIST": '["127.0.0.1"]',
        "IMAGEGATE_MODELSLAB_WAIT": "0.3",
    }
    srv = Server(data, env=env)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


BODY = {
    "key": KEY,
    "model_id": MODEL,
    "prompt": "a red fox",
    "negative_prompt": None,
    "width": "64",
    "height": "64",
    "samples": "1",
    "num_inference_steps": "4",
    "safety_checker": "no",
    "enhance_prompt": "no",
    "seed": "7",
    "guidance_scale": 7.5,
    "scheduler": "UniPCMultistepScheduler",
    "tomesd": "yes",
    "use_karras_sigmas": "yes",
    "clip_skip": "1",
    "webhook": None,
    "track_id": None,
    "base64": "no",
    "temp": "no",
}


def post(srv: Server, path: str, body: dict) -> httpx.Response:
    """A request as ModelsLab's clients make it: one that answers processing is fetched until it is done."""
    r = httpx.post(f"{srv.url}{path}", json=body, timeout=120)
    deadline = time.monotonic() + 60
    while r.status_code == 200 and isinstance(r.json(), dict) and r.json().get("status") == "processing":
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.1)
        r = httpx.post(r.json()["fetch_result"], json={"key": body.get("key")}, timeout=60)
    return r


def test_text2img_with_strings_and_flags_lora_by_name_and_base64(ml):
    r = post(ml, "/api/v6/images/text2img", {**BODY, "samples": "2"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "success" and isinstance(answer["id"], int)
    assert answer["meta"]["seed"] == 7 and answer["meta"]["n_samples"] == 2 and answer["meta"]["W"] == 64
    assert answer["meta"]["tomesd"] == "no"  # what was applied, not what was asked
    images = [httpx.get(u).content for u in answer["output"]]
    assert answer["proxy_links"] == answer["output"] and len(images) == 2 and images[0] != images[1]
    plain = images[0]
    # the same through the enterprise path and the official SDK's alias, as base64 data, with a LoRA by name
    r = post(ml, "/api/v1/enterprise/images/text2img", {**BODY, "base64": "yes"})
    assert base64.b64decode(r.json()["output"][0]) == plain  # same seed: the same image
    r = post(ml, "/api/v1/enterprise/text2img", {**BODY, "base64": True, "lora_model": "ink", "lora_strength": "0.9"})
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["output"][0]) != plain and r.json()["meta"]["lora"] == "ink"
    assert answer["nsfw_content_detected"] is False and answer["meta"]["safety_checker"] == "no"
    # the model's safety checker (this one flags everything), with the treatment asked for
    r = post(ml, "/api/v6/images/text2img", {**BODY, "safety_checker": "yes", "safety_checker_type": "pixelate"})
    checked = r.json()
    assert checked["nsfw_content_detected"] is True and checked["meta"]["safety_checker"] == "yes"
    pixelated = httpx.get(checked["output"][0]).content
    assert pixelated != plain and Image.open(io.BytesIO(pixelated)).size == (64, 64)
    # img2img with a base64 init image
    body = {**BODY, "init_image": base64.b64encode(plain).decode(), "strength": "0.6", "base64": "yes"}
    r = post(ml, "/api/v6/images/img2img", body)
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["output"][0]))).size == (64, 64)
    # the informational routes
    assert post(ml, "/api/v3/system_load", {"key": KEY}).json()["status"] == "ok"
    schedulers = post(ml, "/api/v1/enterprise/schedulers_list", {"key": KEY}).json()["schedulers"]
    assert "UniPCMultistepScheduler" in schedulers and "KarrasVeScheduler" not in schedulers
    assert post(ml, "/api/v4/dreambooth/model_list", {"key": KEY}).json()[0]["model_id"] == MODEL


def test_errors_come_in_its_envelope(ml):
    cases = [
        ({**BODY, "key": "wrong"}, 401, "API key"),
        ({**BODY, "prompt": ""}, 400, "prompt"),
        ({**BODY, "scheduler": "KarrasVeScheduler"}, 400, "deprecated"),
        ({**BODY, "scheduler": "DDIMInverseScheduler"}, 400, "inverts"),
        ({**BODY, "width": "2048"}, 400, "1024"),
        ({**BODY, "samples": 5}, 400, "samples"),
        ({**BODY, "safety_checker": "yes", "safety_checker_type": "sepia"}, 400, "safety_checker_type"),
        ({**BODY, "lora_model": "missing"}, 400, "missing"),
        ({**BODY, "model_id": "nope"}, 404, "Model not found"),
    ]
    for body, status, words in cases:
        r = post(ml, "/api/v6/images/text2img", body)
        assert r.status_code == status, (body, r.text)
        error = r.json()
        assert error["status"] == "error" and error["message"] == error["messege"], error
        assert words.lower() in error["message"].lower(), error


def test_a_job_that_outlives_the_wait_is_fetched_and_its_webhook_sent(ml):
    receiver = Receiver()
    try:
        hook = f"http://127.0.0.1:{receiver.port}/hook"
        body = {
            **BODY,
            "num_inference_steps": "30",
            "width": "128",
            "height": "128",
            "webhook": hook,
            "track_id": "t-1",
        }
        first = httpx.post(f"{ml.url}/api/v6/images/text2img", json=body, timeout=60).json()
        assert first["status"] == "processing", first  # 30 steps outlive the server's 0.3 s wait
        assert first["eta"] >= 0 and first["fetch_result"].endswith(f"/api/v6/images/fetch/{first['id']}")
        assert first["meta"]["track_id"] == "t-1" and first["output"] == []
        assert httpx.get(first["future_links"][0]).status_code == 404  # not there yet
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            fetched = httpx.post(first["fetch_result"], json={"key": KEY}, timeout=30).json()
            if fetched["status"] != "processing":
                break
            time.sleep(0.1)
        assert fetched["status"] == "success" and fetched["output"] == first["future_links"]
        assert httpx.get(fetched["output"][0]).status_code == 200
        by_body = httpx.post(f"{ml.url}/api/v6/images/fetch", json={"key": KEY, "request_id": str(first["id"])})
        assert by_body.json()["output"] == fetched["output"]
        while time.monotonic() < deadline and not receiver.received:
            time.sleep(0.05)
        (hooked,) = receiver.received
        assert hooked["status"] == "success" and hooked["id"] == first["id"] and hooked["track_id"] == "t-1"
        assert hooked["output"] == fetched["output"]
        missing = httpx.post(f"{ml.url}/api/v6/images/fetch/123456789012345", json={"key": KEY})
        assert missing.status_code == 404 and missing.json()["status"] == "error"
        other = httpx.post(f"{ml.url}/api/v6/images/fetch/{first['id']}", json={"key": "wrong"})
        assert other.status_code == 401
    finally:
        receiver.close()


def test_a_safety_checker_asked_of_a_model_without_one_is_refused_before_anything_runs(server):
    """The session's demo model has no checker: ModelsLab's safety_checker and /v1's are a 400 at once."""
    r = httpx.post(f"{server.url}/api/v6/images/text2img", json={**BODY, "key": "", "safety_checker": "yes"})
    assert r.status_code == 400 and "no safety checker" in r.json()["message"], r.text
    r = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"model": MODEL, "prompt": "a fox", "size": "64x64", "safety_checker": "blur"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "safety_checker", r.text
    jobs = httpx.get(f"{server.url}/v1/jobs").json()["data"]
    assert not [j for j in jobs if j["status"] in ("queued", "running")]  # nothing was queued for it
