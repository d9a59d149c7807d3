"""The Hugging Face endpoint and ModelsLab backends against local stubs that speak those wire formats exactly."""

from __future__ import annotations

import base64
import io

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image as PILImage

from app.backends.fake import FakeBackend
from app.backends.foreign import HFEndpointBackend, ModelsLabBackend, upstream
from app.backends.upstream import UpstreamBackend
from app.config import UpstreamConfig
from app.errors import BackendFailed
from app.worker.protocol import Done, Failed, GenerationParams, Image, Started
from tests.integration.conftest import make_client

MODEL = "imagegate-demo"
KEY = "upstream-secret"
SEEN = web.AppKey("seen", list)


def answer(response: web.Response):
    """A route handler that always gives ``response``."""

    async def handler(request: web.Request) -> web.Response:
        return response

    return handler


def picture(fmt: str, colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (8, 8), colour).save(out, fmt)
    return out.getvalue()


def params(**kw) -> GenerationParams:
    base = {"model": MODEL, "prompt": "a fox", "width": 64, "height": 64, "steps": 4, "guidance": 7.0, "seed": 11}
    return GenerationParams(**{**base, **kw})


async def events(backend, p: GenerationParams) -> list:
    return [e async for e in backend.generate(p)]


@pytest.fixture
async def stub():
    """A server whose routes each test sets; it records every request."""
    app = web.Application()
    app[SEEN] = []
    server = TestServer(app)
    yield app, server
    await server.close()


def config(server: TestServer, path: str, **kw) -> UpstreamConfig:
    base = {"name": "foreign", "base_url": f"http://127.0.0.1:{server.port}{path}", "models": {MODEL: "remote-model"}}
    return UpstreamConfig(**{**base, "api_key_env": "FOREIGN_KEY", **kw})


async def test_hf_task_endpoint_one_request_per_image_and_a_loading_endpoint_is_waited_for(stub):
    app, server = stub
    loading = [True]

    async def task(request: web.Request) -> web.Response:
        app[SEEN].append(({k.lower(): v for k, v in request.headers.items()}, await request.json()))
        if loading[0]:  # scaling up from zero: the backend waits estimated_time and tries again
            loading[0] = False
            return web.json_response({"error": "Model is currently loading", "estimated_time": 0.2}, status=503)
        return web.Response(body=picture("PNG"), content_type="image/png")

    app.router.add_post("/", task)
    app.router.add_get("/", answer(web.Response(text="Ok")))
    await server.start_server()
    backend = upstream(config(server, "/", type="hf_endpoint"), {"FOREIGN_KEY": KEY})
    assert isinstance(backend, HFEndpointBackend)
    try:
        got = await events(backend, params(n=2, negative_prompt="blur"))
        assert isinstance(got[0], Started) and isinstance(got[-1], Done)
        assert [(e.index, e.seed) for e in got if isinstance(e, Image)] == [(0, 11), (1, 12)]
        assert len(app[SEEN]) == 3  # the 503, then one per image
        headers, body = app[SEEN][-1]
        assert headers["authorization"] == f"Bearer {KEY}" and headers["accept"] == "image/png"
        assert headers["x-scale-up-timeout"] == "600"
        assert body == {
            "inputs": "a fox",
            "parameters": {
                "height": 64,
                "width": 64,
                "num_inference_steps": 4,
                "guidance_scale": 7.0,
                "seed": 12,
                "negative_prompt": "blur",
            },
        }
        assert (await backend.health()).status == "ready"
    finally:
        await backend.close()


async def test_hf_handler_endpoint_and_its_errors(stub):
    app, server = stub
    answers = [
        web.json_response({"image": base64.b64encode(picture("JPEG")).decode()}),
        web.json_response({"error": "height must be a multiple of 8"}, status=400),
        web.json_response({"error": "CUDA out of memory"}, status=400),
        web.json_response({"error": "unknown error"}, status=500),
    ]

    async def handler(request: web.Request) -> web.Response:
        app[SEEN].append(await request.json())
        return answers.pop(0)

    app.router.add_post("/", handler)
    app.router.add_get("/health", answer(web.Response(status=503)))
    await server.start_server()
    backend = HFEndpointBackend(config(server, "/", type="hf_endpoint", mode="handler"), {"FOREIGN_KEY": KEY})
    try:
        got = await events(backend, params())
        (image,) = [e for e in got if isinstance(e, Image)]
        assert PILImage.open(io.BytesIO(image.data)).format == "PNG"  # the JPEG it sent, as PNG was asked for
        assert app[SEEN][0] == {
            "inputs": "a fox",
            "height": 64,
            "width": 64,
            "guidance_scale": 7.0,
            "inference_steps": 4,
        }
        refused = await events(backend, params())
        assert isinstance(refused[-1], Failed) and refused[-1].kind == "invalid_request"
        assert "multiple of 8" in refused[-1].message
        oom = await events(backend, params())
        assert isinstance(oom[-1], Failed) and oom[-1].kind == "out_of_memory"
        with pytest.raises(BackendFailed, match="500"):
            await events(backend, params())
        assert (await backend.health()).status == "loading"  # 503 on health: warming, not failed
        from app.worker.protocol import LoraRef

        lora = await events(backend, params(loras=(LoraRef("d" * 64, 1.0),)))
        assert isinstance(lora[-1], Failed) and lora[-1].param == "loras"  # never sent: the stub has no answers left
    finally:
        await backend.close()


async def test_modelslab_processing_is_fetched_and_links_that_404_at_first_are_tried_again(stub):
    app, server = stub
    base = "http://127.0.0.1:{port}"
    state = {"fetches": 0, "link_misses": 1}

    async def text2img(request: web.Request) -> web.Response:
        app[SEEN].append(await request.json())
        port = request.url.port
        return web.json_response(
            {
                "status": "processing",
                "id": 42,
                "eta": 0.1,
                "fetch_result": f"{base.format(port=port)}/api/v6/images/fetch/42",
                "output": [],
            }
        )

    async def fetch(request: web.Request) -> web.Response:
        app[SEEN].append(await request.json())
        state["fetches"] += 1
        if state["fetches"] < 2:
            return web.json_response({"status": "processing", "output": "", "messege": "try again later."})
        port = request.url.port
        links = [f"{base.format(port=port)}/files/{i}.png" for i in range(2)]
        return web.json_response({"status": "success", "id": 42, "output": links})

    async def file(request: web.Request) -> web.Response:
        if state["link_misses"]:
            state["link_misses"] -= 1
            return web.Response(status=404, text="<!DOCTYPE html>")
        return web.Response(body=picture("PNG"), content_type="image/png")

    app.router.add_post("/api/v6/images/text2img", text2img)
    app.router.add_post("/api/v6/images/fetch/42", fetch)
    app.router.add_get("/files/{name}", file)
    app.router.add_post("/api/v3/system_load", answer(web.json_response({"queue_num": 0, "status": "ok"})))
    await server.start_server()
    backend = upstream(config(server, "/api/v6", type="modelslab", poll_interval=0.05), {"FOREIGN_KEY": KEY})
    assert isinstance(backend, ModelsLabBackend)
    try:
        got = await events(backend, params(n=2, scheduler="dpmpp_2m_karras", output_format="jpeg"))
        images = [e for e in got if isinstance(e, Image)]
        assert [e.seed for e in images] == [11, 12] and isinstance(got[-1], Done), got
        assert PILImage.open(io.BytesIO(images[0].data)).format == "JPEG"
        sent = app[SEEN][0]
        assert sent["key"] == KEY and sent["model_id"] == "remote-model" and sent["samples"] == 2
        assert sent["scheduler"] == "DPMSolverMultistepScheduler" and sent["use_karras_sigmas"] is True
        assert sent["safety_checker"] is False and sent["enhance_prompt"] is False  # no upstream defaults leak in
        assert app[SEEN][1] == {"key": KEY} and state["fetches"] == 2
        assert (await backend.health()).status == "ready"
    finally:
        await backend.close()


async def test_modelslab_errors(stub):
    app, server = stub
    answers = [
        web.json_response({"status": "error", "message": "Model not found"}, status=400),
        web.json_response({"status": "error", "messege": "Server is busy"}),
        web.json_response({"status": "error", "message": "Queue full", "retry_after": 30}, status=429),
    ]

    async def text2img(request: web.Request) -> web.Response:
        return answers.pop(0)

    app.router.add_post("/api/v6/images/text2img", text2img)
    await server.start_server()
    backend = ModelsLabBackend(config(server, "/api/v6", type="modelslab"), {"FOREIGN_KEY": KEY})
    try:
        refused = await events(backend, params())
        assert isinstance(refused[-1], Failed) and refused[-1].kind == "invalid_request"
        failed = await events(backend, params())
        assert isinstance(failed[-1], Failed) and "Server is busy" in failed[-1].message
        with pytest.raises(BackendFailed, match="429"):
            await events(backend, params())
    finally:
        await backend.close()


def test_a_failing_foreign_backend_fails_over_to_another(tmp_path):
    """Through the gateway: the HF endpoint answers 500; the pool moves the request to the other backend."""
    import asyncio
    import threading

    seen = []
    loop = asyncio.new_event_loop()

    async def broken(request: web.Request) -> web.Response:
        seen.append(1)
        return web.json_response({"error": "unknown error"}, status=500)

    app = web.Application()
    app.router.add_post("/", broken)
    server = TestServer(app, loop=loop)
    loop.run_until_complete(server.start_server())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        hf = HFEndpointBackend(
            UpstreamConfig(
                name="hf", base_url=f"http://127.0.0.1:{server.port}/", type="hf_endpoint", models={MODEL: MODEL}
            )
        )
        fake = FakeBackend(name="fake", models=[MODEL])
        sent = 0
        with make_client(tmp_path, [(hf, [MODEL]), (fake, [MODEL])], routing="least_work") as client:
            # Two idle backends tie, and ties are broken at random: send until the HF endpoint has had its turn.
            while not seen and sent < 64:
                r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64"})
                assert r.status_code == 200, r.text
                sent += 1
        assert seen and fake.completed == sent
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_openai_upstreams_are_still_the_default():
    assert isinstance(
        upstream(UpstreamConfig(name="u", base_url="http://x/v1", models={MODEL: MODEL})), UpstreamBackend
    )
