"""LoRA adapters through a real `imagegate serve` and the official SDK: sent to workers by digest, applied per job."""

from __future__ import annotations

import base64
import json
import shutil

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
