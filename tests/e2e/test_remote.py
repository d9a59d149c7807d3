"""A gateway with no local worker, in front of an `imagegate worker` reached over TCP with a shared token."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from .conftest import Server, free_port

pytestmark = pytest.mark.e2e

TOKEN = "worker-secret-for-tests"


def test_gateway_routes_to_a_remote_worker(tmp_path):
    port = free_port()
    config = tmp_path / "imagegate.toml"
    config.write_text(
        f"""
worker_token = "{TOKEN}"

[[models]]
name = "remote-demo"
path = "{tmp_path / "models" / "remote-demo"}"
demo = true
devices = []
remote_workers = ["127.0.0.1:{port}"]
default_size = "64x64"
size_multiple = 16
default_steps = 4
preview = "vae"
preview_downscale = 1
"""
    )
    worker_cmd = [sys.executable, "-m", "app", "worker", "--device", "cpu", "--listen", f"127.0.0.1:{port}"]
    worker_cmd += ["--config", str(config), "--model", "remote-demo"]
    worker = subprocess.Popen(worker_cmd, stdout=(tmp_path / "worker.log").open("wb"), stderr=subprocess.STDOUT)
    (tmp_path / "gw").mkdir()
    srv = Server(tmp_path / "gw", "--config", str(config))
    try:
        srv.wait_ready(timeout=180)
        assert srv.workers() == [], "the gateway must not spawn a local worker for a remote-only model"
        ready = httpx.get(f"{srv.url}/ready").json()
        assert ready["backends"][0]["name"] == f"remote-127.0.0.1:{port}"
        events = list(srv.sdk().images.generate(model="remote-demo", prompt="far away", stream=True, partial_images=1))
        assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
        # Without the token the worker refuses jobs.
        assert httpx.post(f"http://127.0.0.1:{port}/v1/generate", content=b"").status_code == 401
        # A worker that goes away takes its backend out of the pool.
        worker.terminate()
        worker.wait(timeout=30)
        deadline = time.monotonic() + 15
        while httpx.get(f"{srv.url}/ready").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = httpx.post(f"{srv.url}/v1/images/generations", json={"prompt": "p"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    finally:
        srv.stop()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
