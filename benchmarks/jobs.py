"""What a durable job costs, and how fast the queue and the webhook sender go.

Measures, in one run:
- on the demo model through a real ``imagegate serve`` (256x256, 20 steps): the submit latency (the 202) and the
  time until an async job's ``succeeded`` event, against the same synchronous request, interleaved (ratio of
  medians);
- the queue alone, in process with stub backends that answer at once (``FakeBackend``, 8 of them, ``job_share``
  1): jobs per second from submit to ``succeeded`` (submit, claim with a lease, run, store the image, complete),
  on the embedded SQLite;
- the webhook sender: deliveries per second from the outbox to a local receiver that verifies each signature.

Usage: ``python benchmarks/jobs.py [--reps 7] [--jobs 400] [--hooks 1000]``; writes ``benchmarks/results/jobs.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from aiohttp import web
from litestar.testing import AsyncTestClient
from standardwebhooks import Webhook

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, start_server, stop

from app.asgi import create_app
from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL, load_settings
from app.services.webhooks import WebhookSender
from app.services.webhooks_delivery import new_secret, session
from app.store.db import Database
from app.store.jobs import SERVER, JobStore, new_delivery

BODY = {"model": DEMO_MODEL, "prompt": "a red fox", "size": "256x256", "num_inference_steps": 20, "seed": 1}


def demo(reps: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="imagegate-bench-jobs-"))
    proc, url, _ = start_server(data_dir)
    sync_s, async_s, submit_ms = [], [], []
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            client.post("/v1/images/generations", json=BODY)  # warm
            for _ in range(reps):
                t = time.perf_counter()
                assert client.post("/v1/images/generations", json=BODY).status_code == 200
                sync_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                r = client.post("/v1/images/generations", json=BODY, headers={"prefer": "respond-async"})
                submit_ms.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 202
                with client.stream("GET", f"/v1/jobs/{r.json()['id']}/events") as s:
                    for line in s.iter_lines():
                        if line == "event: image.job.succeeded":
                            break
                async_s.append(time.perf_counter() - t)
    finally:
        stop(proc)
    return {
        "sync_s": statistics.median(sync_s),
        "async_until_succeeded_s": statistics.median(async_s),
        "ratio": statistics.median(async_s) / statistics.median(sync_s),
        "submit_ms_p50": statistics.median(submit_ms),
        "submit_ms_max": max(submit_ms),
        "reps": reps,
    }


async def queue(jobs: int) -> dict:
    data_dir = tempfile.mkdtemp(prefix="imagegate-bench-queue-")
    settings = load_settings(environ={}, overrides={"data_dir": data_dir, "job_share": 1.0})
    backends = [(FakeBackend(name=f"stub{i}", models=[DEMO_MODEL]), [DEMO_MODEL]) for i in range(8)]
    app = create_app(settings, backends=backends)
    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 1}
    async with AsyncTestClient(app, base_url="http://bench") as client:
        t = time.perf_counter()
        for _ in range(jobs):
            r = await client.post("/v1/images/generations", json=body, headers={"prefer": "respond-async"})
            assert r.status_code == 202
        submitted = time.perf_counter() - t
        store: JobStore = app.state.jobs.store
        while True:
            counts, _, _ = await asyncio.to_thread(store.stats)
            if counts.get(("image.generation", "succeeded"), 0) == jobs:
                break
            await asyncio.sleep(0.05)
        total = time.perf_counter() - t
    return {
        "jobs": jobs,
        "submits_per_s": jobs / submitted,
        "jobs_per_s_end_to_end": jobs / total,
        "seconds": total,
    }


async def webhooks(count: int) -> dict:
    secret = new_secret()
    verified = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal verified
        Webhook(secret).verify(await request.read(), dict(request.headers))
        verified += 1
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    data_dir = tempfile.mkdtemp(prefix="imagegate-bench-hooks-")
    settings = load_settings(environ={}, overrides={"data_dir": data_dir, "webhook_allowlist": ["127.0.0.1"]})
    db = Database(settings.database())
    store = JobStore(db)
    store.rotate_secret(SERVER, secret, time.time(), 0)
    now = time.time()
    payload = json.dumps({"type": "image.job.succeeded", "data": {"id": "job_x", "status": "succeeded"}}).encode()
    rows = [
        new_delivery(f"job_{i}", "anonymous", f"http://127.0.0.1:{port}/hook", "x", payload, now) for i in range(count)
    ]
    store.enqueue(rows)
    sender = WebhookSender(settings, store)
    t = time.perf_counter()
    async with session(settings.webhook_allowlist, settings.webhook_timeout) as http:
        while await sender.send_due(http):
            pass
    seconds = time.perf_counter() - t
    db.close()
    await runner.cleanup()
    return {"deliveries": count, "verified": verified, "per_s": count / seconds, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--hooks", type=int, default=1000)
    args = parser.parse_args()
    results = {"queue": asyncio.run(queue(args.jobs)), "webhooks": asyncio.run(webhooks(args.hooks))}
    print(json.dumps(results, indent=2))
    results["demo"] = demo(args.reps)
    print(json.dumps(results["demo"], indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "jobs.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
