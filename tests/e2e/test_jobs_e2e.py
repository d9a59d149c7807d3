"""Asynchronous jobs through a real `imagegate serve` on the demo model: raw HTTP, kill -9, webhooks across restarts."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter

import httpx
import pytest
from aiohttp import web
from standardwebhooks import Webhook

from tests.e2e.conftest import Server, free_port

pytestmark = pytest.mark.e2e

ASYNC = {"prefer": "respond-async"}
MODEL = "imagegate-demo"


def wait_job(url: str, job_id: str, statuses=("succeeded", "failed", "cancelled", "expired"), timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck: {job}")


def test_async_generation_over_raw_http(server):
    r = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"model": MODEL, "prompt": "a red fox", "size": "64x64", "num_inference_steps": 6, "partial_images": 1},
        headers=ASYNC,
        timeout=30,
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", timeout=120) as s:
        kinds = [line[7:] for line in s.iter_lines() if line.startswith("event: ")]
    assert kinds[:2] == ["image.job.queued", "image.job.started"] and kinds[-1] == "image.job.succeeded"
    assert "image.job.partial_image" in kinds and "image.job.progress" in kinds
    done = httpx.get(f"{server.url}/v1/jobs/{job['id']}").json()
    image = httpx.get(done["result"]["data"][0]["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert httpx.post(f"{server.url}/v1/jobs/{job['id']}/cancel").status_code == 409
    assert httpx.delete(f"{server.url}/v1/jobs/{job['id']}").json()["deleted"] is True


class Hook:
    """A webhook receiver started and stopped at will on one port, verifying every delivery's signature."""

    def __init__(self) -> None:
        self.port = free_port()
        self.secret = ""
        self.received: list[dict] = []
        self.bad = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            payload = Webhook(self.secret).verify(raw, dict(request.headers))
        except Exception:
            self.bad += 1
            return web.Response(status=400)
        self.received.append({"webhook_id": request.headers["webhook-id"], **payload})
        return web.Response(status=204)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def kill_hard(srv: Server) -> None:
    """kill -9 of the gateway and of its workers: nothing gets to clean up."""
    workers = srv.workers()
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)


def test_kill_9_loses_no_job_runs_none_twice_and_webhooks_survive(tmp_path, demo_data_dir, server):
    # the demo model the session's server made, so this test does not build another
    shutil.copytree(demo_data_dir / "models", tmp_path / "models")
    hook = Hook()
    args = ["--job-lease", "2", "--job-poll-interval", "0.2", "--webhook-allowlist", "127.0.0.1"]
    env = {"IMAGEGATE_WEBHOOK_RETRY_SCHEDULE": "[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"}
    first = Server(tmp_path, *args, env=env)
    port = first.port
    try:
        first.wait_ready()
        hook.secret = httpx.post(f"{first.url}/v1/webhooks/secret").json()["secret"]
        ids = []
        for k in range(6):
            fields = {"model": MODEL, "prompt": f"fox {k}", "size": "128x128", "num_inference_steps": 40}
            if k == 0:
                fields.update(webhook_url=f"http://127.0.0.1:{hook.port}/hook", webhook_events=["completed"])
            r = httpx.post(f"{first.url}/v1/images/generations", json=fields, headers=ASYNC, timeout=30)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        wait_job(first.url, ids[0])  # its webhook fails: nothing listens yet
        running = wait_job(first.url, ids[1], statuses=("running",))
        assert running["attempts"] == 1
        statuses = Counter(httpx.get(f"{first.url}/v1/jobs/{i}").json()["status"] for i in ids)
        assert statuses["queued"] >= 2, statuses
    finally:
        kill_hard(first)
    hook.start()
    second = Server(tmp_path, *args, env=env, port=port)
    try:
        second.wait_ready()
        jobs = [wait_job(second.url, i) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 6
        assert jobs[1]["attempts"] == 2  # it was running when the gateway died: run again
        for job in jobs:
            assert httpx.get(job["result"]["data"][0]["url"]).status_code == 200
        deadline = time.monotonic() + 30
        while not hook.received:
            assert time.monotonic() < deadline, "the webhook was lost across the restart"
            time.sleep(0.1)
        assert hook.bad == 0 and hook.received[0]["data"]["id"] == ids[0]
        assert hook.received[0]["type"] == "image.job.succeeded"
    finally:
        second.stop()
        hook.close()
    db = sqlite3.connect(tmp_path / "imagegate.db")
    try:  # every job completed exactly once
        ends = Counter(job_id for (job_id,) in db.execute("SELECT job_id FROM job_events WHERE type = 'succeeded'"))
        assert ends == Counter(ids)
        outbox = db.execute("SELECT status, attempts FROM webhook_outbox").fetchall()
        assert len(outbox) == 1 and outbox[0][0] == "delivered" and outbox[0][1] >= 2
    finally:
        db.close()
