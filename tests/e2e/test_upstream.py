"""A gateway whose model is served by an upstream: a second imagegate, reached through its OpenAI-compatible API.

Instance B is the session's demo server; instance A has no worker of its own and proxies its model to B with
imagegate's extensions, so seeds, steps and schedulers travel and A's answers are B's, byte for byte.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from app.config import DEMO_MODEL

from .conftest import Server

pytestmark = pytest.mark.e2e

PROXIED = "proxied-demo"


@pytest.fixture(scope="module")
def gateway(server: Server, tmp_path_factory) -> Iterator[Server]:
    """Instance A: one model with no devices, served by the upstream ``b`` (the demo server)."""
    data = tmp_path_factory.mktemp("upstream-gw")
    config = data / "imagegate.toml"
    config.write_text(
        f"""
health_interval = 0.5

[[models]]
name = "{PROXIED}"
devices = []
default_size = "256x256"
size_multiple = 16
default_steps = 20
default_scheduler = "ddim"
schedulers = ["ddim", "euler", "lcm"]  # lcm: allowed here, not by B's demo model

[[upstreams]]
name = "b"
base_url = "{server.url}/v1"
extensions = true
timeout = 120
models = {{ {PROXIED} = "{DEMO_MODEL}" }}
"""
    )
    srv = Server(data, "--config", str(config))
    try:
        srv.wait_ready(timeout=60)
        yield srv
    finally:
        srv.stop()


def png(size=(96, 64), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_the_upstream_is_a_ready_backend_and_no_worker_runs(gateway):
    assert gateway.workers() == [], "a model served by an upstream needs no local worker"
    backends = httpx.get(f"{gateway.url}/ready").json()["backends"]
    assert [(b["name"], b["state"]) for b in backends] == [("b", "ready")]


def test_a_generation_through_the_upstream_is_the_upstreams_own(gateway, server):
    common = {"prompt": "a lighthouse", "size": "64x64", "extra_body": {"seed": 1234, "num_inference_steps": 4}}
    via_a = gateway.sdk().images.generate(model=PROXIED, **common)
    direct = server.sdk().images.generate(model=DEMO_MODEL, **common)
    assert via_a.data[0].b64_json == direct.data[0].b64_json  # same seed and fields: the same bytes
    assert Image.open(io.BytesIO(base64.b64decode(via_a.data[0].b64_json))).size == (64, 64)
    assert via_a.size == "64x64" and via_a.usage.input_tokens_details.text_tokens > 0
    other = gateway.sdk().images.generate(
        model=PROXIED, **{**common, "extra_body": {"seed": 99, "num_inference_steps": 4}}
    )
    assert other.data[0].b64_json != via_a.data[0].b64_json  # the seed reached B


def test_a_streamed_generation_streams_through(gateway):
    stream = gateway.sdk().images.generate(
        model=PROXIED,
        prompt="a lighthouse at night",
        size="64x64",
        stream=True,
        partial_images=2,
        extra_body={"seed": 7, "num_inference_steps": 6},
    )
    events = list(stream)
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (64, 64)
    assert events[0].b64_json != events[2].b64_json


def test_an_edit_through_the_upstream(gateway, server):
    common = {"prompt": "make it blue", "size": "64x64", "extra_body": {"seed": 5, "num_inference_steps": 4}}
    via_a = gateway.sdk().images.edit(model=PROXIED, image=("fox.png", png(), "image/png"), **common)
    direct = server.sdk().images.edit(model=DEMO_MODEL, image=("fox.png", png(), "image/png"), **common)
    assert via_a.data[0].b64_json == direct.data[0].b64_json  # the upload reached B intact, with its fields


def test_the_upstreams_refusal_is_the_clients_400(gateway):
    r = httpx.post(
        f"{gateway.url}/v1/images/generations",
        json={"model": PROXIED, "prompt": "p", "size": "64x64", "scheduler": "lcm"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "scheduler" and "lcm" in error["message"]
