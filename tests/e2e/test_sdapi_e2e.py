"""The AUTOMATIC1111 dialect (`/sdapi/v1`) through a real `imagegate serve`, with the request bodies Open WebUI and
SillyTavern send: models, samplers, options, txt2img, img2img with a mask, progress with a preview, interrupt."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"


def picture(b64: str) -> Image.Image:
    assert not b64.startswith("data:")  # A1111 sends bare base64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_open_webui_flow(server):
    """What Open WebUI's automatic1111 engine does: read the model from /options, list /sd-models, set the model by
    posting the options back whole, generate with batch_size, read images[] and info."""
    client = httpx.Client(base_url=server.url, timeout=120, headers={"authorization": ""})
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == MODEL
    models = client.get("/sdapi/v1/sd-models").json()
    assert [(m["title"], m["model_name"]) for m in models] == [(MODEL, MODEL)]
    assert client.post("/sdapi/v1/options", json={**options, "sd_model_checkpoint": models[0]["title"]}).json() is None
    body = {"prompt": "a red fox", "batch_size": 2, "width": 64, "height": 64, "steps": 4, "negative_prompt": "blur"}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["parameters"] == body
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [info["seed"], info["seed"] + 1] and info["sd_model_name"] == MODEL
    images = [picture(i) for i in answer["images"]]
    assert [(i.size, i.format) for i in images] == [((64, 64), "PNG")] * 2
    assert images[0].tobytes() != images[1].tobytes()


def test_sillytavern_flow_and_the_error_envelope(server):
    """SillyTavern forwards its own keys (url, auth), names the model in override_settings, a sampler and a
    schedule; the same seed gives the same image; what imagegate cannot do is refused in A1111's envelope."""
    client = httpx.Client(base_url=server.url, timeout=120)
    samplers = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert {s["name"] for s in client.get("/sdapi/v1/schedulers").json()} == {"automatic", "karras"}
    body = {
        "url": "http://127.0.0.1:7860",
        "auth": "",
        "prompt": "a fox in the snow",
        "negative_prompt": "",
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "steps": "4",
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "seed": 5,
        "restore_faces": False,
        "enable_hr": False,
        "override_settings": {"sd_model_checkpoint": MODEL, "forge_additional_modules": []},
        "override_settings_restore_afterwards": True,
        "send_images": True,
        "save_images": False,
    }
    first = client.post("/sdapi/v1/txt2img", json=body).json()
    again = client.post("/sdapi/v1/txt2img", json=body).json()
    assert json.loads(first["info"])["seed"] == 5 and first["images"] == again["images"]
    euler = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler", "scheduler": "automatic"})
    assert euler.json()["images"] != first["images"]
    refused = [
        ({**body, "sampler_name": "Foo"}, 400, "Sampler not found"),
        ({**body, "enable_hr": True}, 400, "not supported"),
        ({**body, "prompt": ""}, 400, "prompt"),
        ({**body, "width": 4096, "height": 4096}, 400, "4096"),
        ({**body, "prompt": "x <lora:nope:0.5>"}, 400, "nope"),
        ({**body, "override_settings": {"sd_model_checkpoint": "nope.safetensors [abc]"}}, 404, "nope"),
    ]
    for request, status, words in refused:
        r = client.post("/sdapi/v1/txt2img", json=request)
        assert r.status_code == status, (request, r.text)
        error = r.json()
        assert set(error) == {"error", "detail", "body", "errors"} and words in error["detail"], error


def test_img2img_with_a_mask(server):
    client = httpx.Client(base_url=server.url, timeout=120)
    source = client.post("/sdapi/v1/txt2img", json={"prompt": "a wall", "width": 64, "height": 64, "steps": 2})
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = io.BytesIO()
    mask.save(out, "PNG")
    init = source.json()["images"][0]
    body = {
        "prompt": "a window",
        "init_images": [f"data:image/png;base64,{init}"],
        "mask": base64.b64encode(out.getvalue()).decode(),
        "denoising_strength": 0.9,
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 3,
    }
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert "init_images" not in r.json()["parameters"] and "mask" not in r.json()["parameters"]
    edited = picture(r.json()["images"][0]).convert("RGB")
    before = picture(init).convert("RGB")
    assert edited.size == (64, 64)
    assert edited.getpixel((2, 2)) != edited.getpixel((32, 32)) or edited.tobytes() != before.tobytes()
    r = client.post("/sdapi/v1/img2img", json={**body, "init_images": []})
    assert r.status_code == 400 and "init_images" in r.json()["detail"]


def test_progress_shows_the_running_job_with_a_preview_and_interrupt_stops_it(server):
    client = httpx.Client(base_url=server.url, timeout=120)
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0
    answer: dict = {}

    def slow() -> None:
        body = {"prompt": "a slow fox", "width": 256, "height": 256, "steps": 90}
        answer["r"] = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)

    thread = threading.Thread(target=slow)
    thread.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["current_image"]:
            seen = progress
            break
        time.sleep(0.1)
    assert seen is not None, "no preview while the job ran"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 90 and seen["state"]["job_count"] == 1
    assert picture(seen["current_image"]).size == (256, 256)
    assert client.post("/sdapi/v1/interrupt").json() == {}
    thread.join(60)
    assert answer["r"].status_code == 200 and answer["r"].json()["images"] == []  # stopped: no images
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0
