"""The Hugging Face dialect through a real `imagegate serve`: the real `huggingface_hub` client, seed 003's
`requests` example, a model still loading (503 with estimated_time, or held), and the `{"error"}` envelope."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time

import httpx
import pytest
import requests
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"
KEY = "hf-secret-key"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, demo_data_dir, server):
    """A server with one API key, hit before its worker is ready (the first test sees the model loading)."""
    data = tmp_path_factory.mktemp("hf")
    shutil.copytree(demo_data_dir / "models", data / "models")
    keys = json.dumps([{"id": "hf", "key_env": "HF_E2E_KEY"}])
    srv = Server(data, env={"IMAGEGATE_API_KEYS": keys, "HF_E2E_KEY": KEY})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{srv.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield srv
    finally:
        srv.stop()


def test_a_loading_model_answers_503_with_estimated_time_or_holds_the_request(keyed):
    auth = {"authorization": f"Bearer {KEY}"}
    body = {"inputs": "a red fox", "parameters": {"width": 64, "height": 64, "num_inference_steps": 2}}
    r = httpx.post(f"{keyed.url}/hf/models/{MODEL}", json=body, headers=auth, timeout=30)
    assert r.status_code == 503, r.text  # the worker is still loading the model
    assert r.json()["estimated_time"] > 0 and "error" in r.json()
    r = httpx.post(
        f"{keyed.url}/hf/models/{MODEL}",
        json=body,
        headers={**auth, "x-wait-for-model": "true", "accept": "image/png"},
        timeout=120,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)


def test_errors_come_in_the_error_envelope(keyed):
    keyed.wait_ready()
    url = f"{keyed.url}/hf/models/{MODEL}"
    auth = {"authorization": f"Bearer {KEY}"}
    cases = [
        ({"inputs": "x"}, {"authorization": "Bearer wrong"}, 401),
        ({"parameters": {"width": 64}}, auth, 400),  # no prompt
        ({"inputs": "x", "parameters": {"scheduler": "KarrasVeScheduler"}}, auth, 400),
        ({"inputs": "x", "parameters": {"width": 4096, "height": 4096}}, auth, 400),
        ({"inputs": "x", "parameters": {"width": 64}}, auth, 400),  # one side only
    ]
    for body, headers, status in cases:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"], r.json()
    assert "inputs" in httpx.post(url, json={"parameters": {}}, headers=auth).json()["error"]
    r = httpx.post(f"{keyed.url}/hf/models/nope", json={"inputs": "x"}, headers=auth)
    assert r.status_code == 404 and "nope" in r.json()["error"]
    # the other dialects refuse a bad key in their own envelopes too
    r = httpx.get(f"{keyed.url}/sdapi/v1/options", headers={"authorization": "Basic d3Jvbmc6a2V5"})
    assert r.status_code == 401 and set(r.json()) == {"error", "detail", "body", "errors"}
    r = httpx.post(f"{keyed.url}/api/v6/images/text2img", json={"key": "wrong", "model_id": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["status"] == "error"


def test_the_real_inference_client_and_seed_003s_requests_example(server):
    client = InferenceClient(base_url=f"{server.url}/hf/models/{MODEL}", api_key="unused")
    image = client.text_to_image(
        "a red fox", width=128, height=64, num_inference_steps=2, seed=3, negative_prompt="blur", guidance_scale=5
    )
    assert image.size == (128, 64) and image.format == "PNG"  # InferenceClient asks for image/png
    again = client.text_to_image(
        "a red fox", width=128, height=64, num_inference_steps=2, seed=3, negative_prompt="blur", guidance_scale=5
    )
    assert again.tobytes() == image.tobytes()  # the seed is honoured
    with pytest.raises(HfHubHTTPError, match="multiples of 16"):
        client.text_to_image("a red fox", width=100, height=64)
    # numbers as strings, the older target_size, and JPEG for */*
    r = httpx.post(
        f"{server.url}/hf/models/{MODEL}",
        json={"inputs": "a fox", "parameters": {"target_size": {"width": "64", "height": "64"}, "seed": "7"}},
        headers={"accept": "*/*"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"

    # seed 003, as its documentation shows it
    url = f"{server.url}/hf/endpoints/{MODEL}"
    token = "unused"
    request_data = {
        "inputs": "Positve prompt",
        "negative_prompt": "Negative prompt goes here",
        "height": 64,
        "width": 64,
        "guidance_scale": 7.5,
        "inference_steps": 4,
    }
    headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
    response = requests.post(url, json=request_data, headers=headers, timeout=60)
    decoded = Image.open(io.BytesIO(base64.b64decode(response.json()["image"])))
    assert decoded.format == "JPEG" and decoded.size == (64, 64)
    # the same endpoint through InferenceClient: it asks for image/png and nests the parameters
    endpoint = InferenceClient(base_url=url, api_key="unused")
    assert endpoint.text_to_image("a fox", width=64, height=64, num_inference_steps=2).size == (64, 64)
    assert httpx.get(f"{url}/health").text == "Ok"
