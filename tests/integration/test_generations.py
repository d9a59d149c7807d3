"""Generations through the real HTTP stack and the official SDK, served by a fake backend."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys

import httpx
import msgspec
import openai
import pytest
from litestar.testing import AsyncTestClient
from PIL import Image

from app.asgi import create_app
from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL, load_settings
from app.worker.protocol import Base64, Partial, RelayedImage, RelayedPartial
from app.worker.protocol import Image as WorkerImage
from tests.helpers import sample

from .conftest import BASE, make_client


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_generate_b64_with_the_sdk(sdk, fake):
    result = sdk.images.generate(model=DEMO_MODEL, prompt="a red fox", size="128x64", n=2)
    assert [png_size(d.b64_json) for d in result.data] == [(128, 64), (128, 64)]
    assert result.size == "128x64" and result.output_format == "png" and result.background == "opaque"
    assert result.usage.output_tokens == 2 * (128 // 16) * (64 // 16)
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    assert fake.last_params.n == 2 and fake.last_params.partial_images == 0


def test_model_may_be_omitted_when_one_is_served(client):
    r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


def test_url_response_is_signed_and_downloadable(sdk, client):
    result = sdk.images.generate(model=DEMO_MODEL, prompt="p", size="64x64", response_format="url")
    url = httpx.URL(result.data[0].url)
    assert result.data[0].b64_json is None
    got = client.get(url.raw_path.decode())
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    forged = url.raw_path.decode().replace("signature=", "signature=0")
    missing = client.get(forged)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_stream_with_the_sdk(sdk):
    events = list(sdk.images.generate(model=DEMO_MODEL, prompt="p", size="64x64", stream=True, partial_images=3, n=2))
    types = [e.type for e in events]
    assert types.count("image_generation.partial_image") == 6
    assert types[-2:] == ["image_generation.completed"] * 2
    partial_indexes = [(e.model_extra["image_index"], e.partial_image_index) for e in events[:-2]]
    assert sorted(partial_indexes) == [(i, k) for i in range(2) for k in range(3)]
    completed = events[-1]
    assert completed.usage.output_tokens == 16 and completed.size == "64x64"


def test_stream_wire_format(client):
    with client.stream(
        "POST", "/v1/images/generations", json={"prompt": "p", "size": "64x64", "stream": True, "partial_images": 1}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    frames = [f for f in body.split("\n\n") if f]
    assert [f.split("\n")[0] for f in frames] == [
        "event: image_generation.partial_image",
        "event: image_generation.completed",
    ]
    assert all(f.split("\n")[1].startswith('data: {"type":"image_generation.') for f in frames)
    assert "id:" not in body and "[DONE]" not in body


def test_failure_after_the_first_event_is_an_error_event(tmp_path):
    broken = FakeBackend(fail="after_partial")
    with make_client(tmp_path, [(broken, [DEMO_MODEL])]) as tc:
        sdk = openai.OpenAI(base_url=f"{BASE}/v1", api_key="x", http_client=tc, max_retries=0)
        stream = sdk.images.generate(prompt="p", size="64x64", stream=True, partial_images=2)
        first = next(iter(stream))
        assert first.type == "image_generation.partial_image"
        with pytest.raises(openai.APIError, match="closed the stream"):
            list(stream)


def test_failure_before_anything_is_sent_is_a_plain_http_error(tmp_path):
    with make_client(tmp_path, [(FakeBackend(fail="before"), [DEMO_MODEL])]) as tc:
        r = tc.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "worker_failed"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "64x64"}, "prompt"),
        ({"prompt": "p", "n": 11}, "n"),
        ({"prompt": "p", "n": "two"}, "n"),
        ({"prompt": "p", "size": "63x64"}, "size"),
        ({"prompt": "p", "partial_images": 4, "stream": True}, "partial_images"),
        ({"prompt": "p", "output_format": "gif"}, "output_format"),
        ({"prompt": "p", "scheduler": "nope"}, "scheduler"),
        ({"prompt": "p", "num_inference_steps": 101}, "num_inference_steps"),
        ({"prompt": "p", "num_inference_steps": 10**30}, "num_inference_steps"),
        ({"prompt": "p", "guidance_scale": 1e300}, "guidance_scale"),
        ({"prompt": "p", "guidance_scale": "inf"}, "guidance_scale"),
        ({"prompt": "p", "guidance_scale": "nan"}, "guidance_scale"),
        ({"prompt": "p", "seed": 2**64}, "seed"),
        ({"prompt": "p", "background": "transparent"}, "background"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_validation_errors_name_the_field(sdk, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.post("/images/generations", body=body, cast_to=object)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error"
    assert set(err.value.body) == {"message", "type", "param", "code"}


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "something_new": {"a": 1}})
    assert r.status_code == 200


def test_unknown_model_is_not_found(sdk):
    with pytest.raises(openai.NotFoundError) as err:
        sdk.images.generate(model="dall-e-9", prompt="p")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_framework_errors_use_the_openai_shape(client):
    for r, status in (
        (client.get("/v1/nothing-here"), 404),
        (client.get("/v1/images/generations"), 405),
        (
            client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}),
            400,
        ),
    ):
        assert r.status_code == status
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_full_queue_answers_429_at_once(tmp_path):
    slow = FakeBackend(step_delay=0.05)
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path)})
    settings.models[0].max_queue = 1
    app = create_app(settings, backends=[(slow, [DEMO_MODEL])])
    # The test client runs the lifespan; requests go through httpx's in-loop transport so they overlap.
    async with (
        AsyncTestClient(app, base_url=BASE),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as tc,
    ):
        pool = app.state.pool
        body = {"prompt": "p", "size": "64x64", "num_inference_steps": 20}
        running = [asyncio.create_task(tc.post("/v1/images/generations", json=body)) for _ in range(2)]
        await asyncio.sleep(0.1)
        rejected = await tc.post("/v1/images/generations", json=body)
        assert rejected.status_code == 429
        assert rejected.json()["error"]["code"] == "queue_full"
        assert int(rejected.headers["retry-after"]) >= 1
        assert [r.status_code for r in await asyncio.gather(*running)] == [200, 200]
        assert pool.members[0].outstanding == 0


def test_no_ready_worker_is_503(tmp_path):
    with make_client(tmp_path, []) as tc:
        r = tc.post("/v1/images/generations", json={"prompt": "p"})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert tc.get("/ready").status_code == 503
        assert tc.get("/health").status_code == 200


def test_models_ready_and_metrics(client, sdk):
    assert [m.id for m in sdk.models.list()] == [DEMO_MODEL]
    assert sdk.models.retrieve(DEMO_MODEL).id == DEMO_MODEL
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["models"] == {DEMO_MODEL: 1}
    before = sample("imagegate_images_total", model=DEMO_MODEL, outcome="success")
    sdk.images.generate(prompt="p", size="64x64", n=3)
    assert sample("imagegate_images_total", model=DEMO_MODEL, outcome="success") == before + 3
    text = client.get("/metrics").text
    for name in (
        "imagegate_http_requests_total",
        'path="/v1/images/generations"',
        "imagegate_generation_duration_seconds_bucket",
        "imagegate_queue_wait_seconds_bucket",
        "imagegate_queue_depth",
        "imagegate_workers_up",
    ):
        assert name in text
    assert "a red fox" not in text


def test_gateway_never_imports_torch():
    code = (
        "import sys, app.asgi, app.cli, app.services.images, app.backends.worker, app.pool.supervisor;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_keep_alive_comments_while_waiting(tmp_path):
    slow = FakeBackend(step_delay=0.05)
    with make_client(tmp_path, [(slow, [DEMO_MODEL])], sse_ping_interval=0.02) as tc:
        body = {"prompt": "p", "size": "64x64", "stream": True, "num_inference_steps": 10}
        with tc.stream("POST", "/v1/images/generations", json=body) as r:
            text = r.read().decode()
    assert text.startswith(": ping")
    assert "event: image_generation.completed" in text
    assert "id:" not in text


class RelayingBackend(FakeBackend):
    """A backend whose images arrive as base64 text, as an upstream API's do."""

    async def generate(self, params, attachments=()):
        async for event in super().generate(params, attachments):
            if isinstance(event, WorkerImage | Partial):
                event = msgspec.structs.replace(event, data=Base64(b'"' + base64.b64encode(event.data) + b'"'))
            yield event


class FramingBackend(FakeBackend):
    """A backend whose image events come with the SSE frame an upstream sent, marked so the client can tell."""

    def __init__(self, *a, event_prefix: str = "image_generation", **kw) -> None:
        super().__init__(*a, **kw)
        self.event_prefix = event_prefix

    async def generate(self, params, attachments=()):
        async for event in super().generate(params, attachments):
            if isinstance(event, WorkerImage | Partial):
                token = b'"' + base64.b64encode(event.data) + b'"'
                kind = "partial_image" if isinstance(event, Partial) else "completed"
                head = f'event: {self.event_prefix}.{kind}\ndata: {{"type":"{self.event_prefix}.{kind}",'.encode()
                frame = head + b'"b64_json":' + token + b',"from":"upstream"}\n\n'
                data = Base64(memoryview(frame)[len(head) + 11 : len(head) + 11 + len(token)])
                if isinstance(event, Partial):
                    event = RelayedPartial(event.image_index, event.partial_index, data, frame=frame)
                else:
                    event = RelayedImage(event.index, data, event.seed, frame=frame)
            yield event


@pytest.mark.parametrize(("upstream_prefix", "passed_on"), [("image_generation", True), ("image_edit", False)])
def test_an_upstreams_frames_go_to_the_client_as_they_came(tmp_path, upstream_prefix, passed_on):
    backend = FramingBackend(models=[DEMO_MODEL], event_prefix=upstream_prefix)
    body = {"prompt": "p", "size": "64x64", "seed": 7, "stream": True, "partial_images": 1}
    with make_client(tmp_path, [(backend, [DEMO_MODEL])]) as tc:
        text = tc.post("/v1/images/generations", json=body).text
        answer = tc.post("/v1/images/generations", json={**body, "stream": False}).json()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    if passed_on:  # the frame the upstream sent, byte for byte
        assert all(e["from"] == "upstream" and set(e) == {"type", "b64_json", "from"} for e in events)
    else:  # not the event this client asked for: the gateway's own, with the same image
        assert all("from" not in e and e["size"] == "64x64" for e in events)
    assert events[-1]["b64_json"] == answer["data"][0]["b64_json"] and png_size(answer["data"][0]["b64_json"])


def test_base64_from_an_upstream_reaches_the_client_as_it_came(tmp_path):
    relay, plain = RelayingBackend(models=[DEMO_MODEL]), FakeBackend(models=[DEMO_MODEL])
    body = {"prompt": "p", "size": "64x64", "seed": 7}
    answers = {}
    for name, backend in (("relay", relay), ("plain", plain)):
        with make_client(tmp_path / name, [(backend, [DEMO_MODEL])]) as tc:
            b64 = tc.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
            streamed = tc.post("/v1/images/generations", json={**body, "stream": True, "partial_images": 1}).text
            url = tc.post("/v1/images/generations", json={**body, "response_format": "url"}).json()["data"][0]["url"]
            stored = tc.get(httpx.URL(url).raw_path.decode()).content
            answers[name] = (b64, streamed.count('"b64_json":"' + b64 + '"'), stored)
    assert answers["relay"] == answers["plain"], "same JSON, same events, same stored file either way"
    b64, completed_events, stored = answers["relay"]
    assert completed_events == 1 and base64.b64decode(b64) == stored and png_size(b64) == (64, 64)
