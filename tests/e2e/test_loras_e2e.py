"""LoRA adapters through a real `imagegate serve` and the official SDK: sent to workers by digest, applied per job."""

from __future__ import annotations

import base64
import json
import shutil
import time

import httpx
import msgspec
import pytest

from app.config import demo_model
from tests.e2e.conftest import Server
from tests.lora import make_lora

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, demo_data_dir, server):
    data = tmp_path_factory.mktemp("loras")
    shutil.copytree(demo_data_dir / "models", data / "models")  # the session's demo model: no second build
    for name, seed in (("ink", 1), ("neon", 2)):
        make_lora(data / "models" / MODEL, data / "adapters" / f"{name}.safetensors", seed)
    model = demo_model(str(data))
    model.adapters_dir = str(data / "adapters")
    srv = Server(data, env={"IMAGEGATE_MODELS": json.dumps([msgspec.to_builtins(model)])})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def image(sdk, **extra) -> bytes:
    result = sdk.images.generate(model=MODEL, prompt="a red fox", size="64x64", extra_body={"seed": 3, **extra})
    return base64.b64decode(result.data[0].b64_json)


def test_adapters_through_the_sdk(lora_server):
    sdk = lora_server.sdk()
    assert httpx.get(f"{lora_server.url}/v1/models/{MODEL}").json()["lora"] is True
    listed = httpx.get(f"{lora_server.url}/v1/adapters").json()["data"]
    assert sorted(a["id"] for a in listed) == ["ink", "neon"] and {a["source"] for a in listed} == {"config"}
    base = image(sdk)
    ink = image(sdk, loras=[{"id": "ink"}])
    both = image(sdk, loras=[{"id": "ink", "scale": 0.5}, {"id": "neon", "scale": 0.8}])
    assert ink != base and both not in (base, ink)
    assert image(sdk, loras=[{"id": "ink", "scale": 0.0}]) == base  # scale 0 is no adapter
    assert image(sdk, loras=[{"id": "ink"}]) == ink  # same seed and adapter: same image
    assert image(sdk) == base  # and the adapter is off again without loras
    events = list(
        sdk.images.generate(
            model=MODEL,
            prompt="a red fox",
            size="64x64",
            stream=True,
            partial_images=1,
            extra_body={"seed": 3, "loras": [{"id": "ink"}]},
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert base64.b64decode(events[-1].b64_json) == ink
    with pytest.raises(Exception, match="does not exist"):
        image(sdk, loras=[{"id": "missing"}])


def batch_sizes(url: str) -> dict[str, float]:
    """imagegate_batch_size's count and sum for the demo model, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    out = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        for what in ("count", "sum"):
            if line.startswith(f"imagegate_batch_size_{what}{{") and f'model="{MODEL}"' in line:
                out[what] = float(line.rsplit(" ", 1)[1])
    return out


def test_requests_with_other_adapter_sets_never_share_a_batch(lora_server):
    """While one request runs, four queue: two with `ink`, two without. They run as two batches of two (each set
    with its own), never one of four, and the batch-size histogram says so."""
    from concurrent.futures import ThreadPoolExecutor

    def generate(loras: list | None, steps: int = 4, size: str = "64x64") -> int:
        body = {"model": MODEL, "prompt": "a fox", "size": size, "num_inference_steps": steps, "seed": 1}
        r = httpx.post(f"{lora_server.url}/v1/images/generations", json={**body, "loras": loras}, timeout=120)
        assert r.status_code == 200, r.text
        return r.status_code

    before = batch_sizes(lora_server.url)
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(generate, [{"id": "neon"}], 60, "256x256")  # busy for seconds while the rest queue
        time.sleep(0.5)
        rest = [pool.submit(generate, loras) for loras in ([{"id": "ink"}], None, [{"id": "ink"}], None)]
        assert first.result() == 200 and [f.result() for f in rest] == [200] * 4
    after = batch_sizes(lora_server.url)
    # each request observes the size of the batch it ran in: neon 1, then 2 for each of the four (one batch of four
    # would make it 4 each)
    assert after["count"] - before["count"] == 5
    assert after["sum"] - before["sum"] == 1 + 2 * 4


def test_lora_tags_in_an_automatic1111_prompt(lora_server):
    """`<lora:name:weight>` in an /sdapi prompt applies the adapter as `loras` does on /v1."""
    body = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4, "seed": 3}
    plain = httpx.post(f"{lora_server.url}/sdapi/v1/txt2img", json=body, timeout=120).json()["images"][0]
    tagged = httpx.post(
        f"{lora_server.url}/sdapi/v1/txt2img", json={**body, "prompt": "a red fox <lora:ink:0.8>"}, timeout=120
    )
    assert tagged.status_code == 200, tagged.text
    assert tagged.json()["images"][0] != plain
    assert json.loads(tagged.json()["info"])["prompt"] == "a red fox"  # the tag is not part of the prompt
