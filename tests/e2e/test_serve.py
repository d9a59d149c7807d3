"""The official openai SDK against a real `imagegate serve` on the embedded demo model."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from app.worker.protocol import DIFFUSION_SCHEDULERS

from .conftest import Server, alive

MODEL = "imagegate-demo"

pytestmark = pytest.mark.e2e


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB"), dtype=np.float64)


def test_generate_b64(sdk):
    result = sdk.images.generate(model=MODEL, prompt="a red fox", size="128x64")
    assert len(result.data) == 1
    image = decode(result.data[0].b64_json)
    assert image.format == "PNG" and image.size == (128, 64)
    assert result.usage.input_tokens > 0 and result.usage.output_tokens == 8 * 4


def test_generate_url(sdk):
    result = sdk.images.generate(model=MODEL, prompt="a red fox", size="64x64", response_format="url")
    got = httpx.get(result.data[0].url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)


def test_generate_n2_jpeg(sdk):
    result = sdk.images.generate(model=MODEL, prompt="two foxes", size="64x64", n=2, output_format="jpeg")
    images = [decode(d.b64_json) for d in result.data]
    assert [im.format for im in images] == ["JPEG", "JPEG"]
    assert result.data[0].b64_json != result.data[1].b64_json


def test_stream_without_partials(sdk):
    events = list(sdk.images.generate(model=MODEL, prompt="a fox", size="64x64", stream=True, partial_images=0))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert decode(events[0].b64_json).size == (64, 64)


def test_stream_partials_show_progress(sdk):
    events = list(
        sdk.images.generate(
            model=MODEL, prompt="a red fox", size="256x256", stream=True, partial_images=2, extra_body={"seed": 7}
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = pixels(events[-1].b64_json)
    errors = [((pixels(e.b64_json) - final) ** 2).mean() for e in events[:2]]
    # Previews decode the predicted clean image: each is at least as close to the final as the one before, and far
    # closer than the final is to a flat grey picture of the same mean.
    assert errors[1] <= errors[0] + 1.0
    assert errors[-1] < 0.1 * ((final - final.mean()) ** 2).mean()


@pytest.mark.parametrize("scheduler", DIFFUSION_SCHEDULERS)
def test_same_seed_same_image(sdk, scheduler):
    def run(seed, n=1):
        extra = {"seed": seed, "num_inference_steps": 4, "scheduler": scheduler}
        return sdk.images.generate(model=MODEL, prompt="a fox", size="64x64", n=n, extra_body=extra)

    a, b, c = run(42), run(42), run(43)
    assert a.data[0].b64_json == b.data[0].b64_json
    assert a.data[0].b64_json != c.data[0].b64_json
    # In a batch too: image 1 of seed 41 is the image of seed 42.
    assert np.abs(pixels(run(41, n=2).data[1].b64_json) - pixels(a.data[0].b64_json)).max() <= 2


def test_seed_of_image_i_is_seed_plus_i(sdk):
    pair = sdk.images.generate(
        model=MODEL, prompt="a fox", size="64x64", n=2, extra_body={"seed": 100, "num_inference_steps": 4}
    )
    alone = sdk.images.generate(
        model=MODEL, prompt="a fox", size="64x64", extra_body={"seed": 101, "num_inference_steps": 4}
    )
    assert np.abs(pixels(pair.data[1].b64_json) - pixels(alone.data[0].b64_json)).max() <= 2


def test_validation_error(sdk):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(model=MODEL, prompt="a fox", size="100x100")
    assert err.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(model=MODEL, prompt="a fox", extra_body={"scheduler": "karras_ve"})
    assert err.value.body["param"] == "scheduler"


def test_curl_style_request(server):
    r = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"model": MODEL, "prompt": "a red fox", "size": "64x64", "stream": True, "partial_images": 1},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith("event: image_generation.partial_image\ndata: {")


def metric(server: Server, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{wanted}}} not found")


def test_disconnect_cancels_the_work(server, sdk):
    cancelled_before = metric(server, "imagegate_images_total", model=MODEL, outcome="cancelled")
    long_job = sdk.images.generate(
        model=MODEL,
        prompt="a long job",
        size="256x256",
        stream=True,
        partial_images=3,
        extra_body={"num_inference_steps": 100},
    )
    first = next(iter(long_job))  # after step 25 of 100: about 75 steps (5+ s) of work remain
    assert first.type == "image_generation.partial_image"
    long_job.response.close()
    start = time.monotonic()
    sdk.images.generate(model=MODEL, prompt="next", size="64x64", extra_body={"num_inference_steps": 2})
    waited = time.monotonic() - start
    assert waited < 2.5, f"the next request waited {waited:.1f}s: the abandoned job kept the worker busy"
    deadline = time.monotonic() + 5
    while metric(server, "imagegate_images_total", model=MODEL, outcome="cancelled") == cancelled_before:
        assert time.monotonic() < deadline, "the cancellation was not counted"
        time.sleep(0.05)


def test_disconnect_cancels_a_non_streamed_request(server, sdk):
    cancelled_before = metric(server, "imagegate_images_total", model=MODEL, outcome="cancelled")
    body = {"model": MODEL, "prompt": "a long job", "size": "256x256", "num_inference_steps": 100}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=httpx.Timeout(5, read=1.5))
    start = time.monotonic()
    sdk.images.generate(model=MODEL, prompt="next", size="64x64", extra_body={"num_inference_steps": 2})
    waited = time.monotonic() - start
    assert waited < 2.5, f"the next request waited {waited:.1f}s: the abandoned job kept the worker busy"
    assert metric(server, "imagegate_images_total", model=MODEL, outcome="cancelled") == cancelled_before + 1


def test_worker_restart_and_clean_shutdown(tmp_path):
    srv = Server(tmp_path)
    try:
        srv.wait_ready()
        [worker] = srv.workers()
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/ready").status_code == 200:
            assert time.monotonic() < deadline, "the dead worker still counts as ready"
            time.sleep(0.05)
        srv.wait_ready(timeout=120)
        [restarted] = srv.workers()
        assert restarted != worker
        assert metric(srv, "imagegate_worker_restarts_total", backend="local-cpu") == 1
        result = srv.sdk().images.generate(model=MODEL, prompt="after restart", size="64x64")
        assert decode(result.data[0].b64_json).size == (64, 64)
    finally:
        srv.stop()
    # uvicorn re-raises the SIGTERM it handled after a graceful shutdown, so -15 is a clean exit here.
    assert srv.proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in srv.log.read_text()
    assert not alive(restarted), "the worker outlived the gateway"


def test_demo_model_command_writes_a_loadable_pipeline(tmp_path):
    target = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "app", "demo-model", str(target)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder"):
        assert list((target / part).glob("*.safetensors")), part
    assert (target / "tokenizer" / "tokenizer.json").is_file()
