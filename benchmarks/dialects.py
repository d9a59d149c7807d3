"""What each client dialect and each foreign backend adapter costs, against the OpenAI-compatible ones.

Measures, in one run (the variants interleaved round by round, medians):
- front ends: the gateway's time for one 64x64 generation through ``/v1/images/generations`` (the reference),
  the Hugging Face task route (``/hf/models/…``, image bytes back), the AUTOMATIC1111 route (``/sdapi/v1/txt2img``,
  a job waited for) and the ModelsLab route (``/api/v6/images/text2img``, a job waited for), in process against a
  stub backend that answers at once (:class:`~app.backends.fake.FakeBackend`): what the translation (and, for the
  two that run as jobs, the job layer) adds;
- backend adapters: one generation through the OpenAI upstream adapter (the reference), the Hugging Face endpoint
  adapter and the ModelsLab adapter, each against a local stub of its API that answers at once with a 64x64 PNG.

Usage: ``python benchmarks/dialects.py [--reps 200]``; writes ``benchmarks/results/dialects.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from litestar.testing import AsyncTestClient
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS

from app.asgi import create_app
from app.backends.fake import FakeBackend
from app.backends.foreign import upstream
from app.config import DEMO_MODEL, UpstreamConfig, load_settings
from app.worker.protocol import GenerationParams

FRONT_ENDS = {
    "openai": ("/v1/images/generations", {"model": DEMO_MODEL, "prompt": "a fox", "size": "64x64"}),
    "huggingface": (
        f"/hf/models/{DEMO_MODEL}",
        {"inputs": "a fox", "parameters": {"width": 64, "height": 64}},
    ),
    "automatic1111": ("/sdapi/v1/txt2img", {"prompt": "a fox", "width": 64, "height": 64}),
    "modelslab": (
        "/api/v6/images/text2img",
        {"key": "", "model_id": DEMO_MODEL, "prompt": "a fox", "width": "64", "height": "64", "samples": "1"},
    ),
}


def png() -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (64, 64), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


async def front_ends(reps: int) -> dict:
    data_dir = tempfile.mkdtemp(prefix="imagegate-bench-dialects-")
    overrides = {"data_dir": data_dir, "job_share": 1.0, "job_poll_interval": 0.05}
    settings = load_settings(environ={}, overrides=overrides)
    app = create_app(settings, backends=[(FakeBackend(models=[DEMO_MODEL]), [DEMO_MODEL])])
    times: dict[str, list[float]] = {name: [] for name in FRONT_ENDS}
    async with AsyncTestClient(app) as client:
        for path, body in FRONT_ENDS.values():  # warm up
            assert (await client.post(path, json=body)).status_code == 200
        for _ in range(reps):
            for name, (path, body) in FRONT_ENDS.items():
                t = time.perf_counter()
                r = await client.post(path, json=body)
                times[name].append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
    med = {name: statistics.median(v) * 1000 for name, v in times.items()}
    return {"ms": med, "ratio_to_openai": {name: m / med["openai"] for name, m in med.items()}}


async def adapters(reps: int) -> dict:
    image = png()

    async def openai(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"created": 0, "data": [{"b64_json": base64.b64encode(image).decode()}]})

    async def hf(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=image, content_type="image/png")

    async def modelslab(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "success", "id": 1, "output": [f"http://{request.host}/file.png"]})

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/png")

    app = web.Application()
    app.router.add_post("/v1/images/generations", openai)
    app.router.add_post("/hf", hf)
    app.router.add_post("/api/v6/images/text2img", modelslab)
    app.router.add_get("/file.png", file)
    server = TestServer(app)
    await server.start_server()
    root = f"http://127.0.0.1:{server.port}"
    models = {DEMO_MODEL: DEMO_MODEL}
    backends = {
        "openai": upstream(UpstreamConfig(name="openai", base_url=f"{root}/v1", models=models)),
        "hf_endpoint": upstream(UpstreamConfig(name="hf", base_url=f"{root}/hf", type="hf_endpoint", models=models)),
        "modelslab": upstream(UpstreamConfig(name="ml", base_url=f"{root}/api/v6", type="modelslab", models=models)),
    }
    params = GenerationParams(model=DEMO_MODEL, prompt="a fox", width=64, height=64, steps=4, guidance=7.0, seed=1)
    times: dict[str, list[float]] = {name: [] for name in backends}
    try:
        for _ in range(reps + 5):
            for name, backend in backends.items():
                t = time.perf_counter()
                events = [e async for e in backend.generate(params)]
                times[name].append(time.perf_counter() - t)
                assert type(events[-1]).__name__ == "Done", events[-1]
    finally:
        for backend in backends.values():
            await backend.close()
        await server.close()
    med = {name: statistics.median(v[5:]) * 1000 for name, v in times.items()}
    return {"ms": med, "ratio_to_openai": {name: m / med["openai"] for name, m in med.items()}}


async def main(reps: int) -> dict:
    return {"front_ends": await front_ends(reps), "backend_adapters": await adapters(reps), "reps": reps}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    results = asyncio.run(main(args.reps))
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dialects.json").write_text(json.dumps(results, indent=2) + "\n")
