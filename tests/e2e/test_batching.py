"""Dynamic batching through a real `imagegate serve` on the demo model, driven by the official SDK."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Server

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"
SEEDS = (11, 22, 33, 44)
# Long enough for four concurrent requests to reach the worker while the first waits; each request sent alone
# waits it out too.
WINDOW_MS = 1500


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("batching"), "--batch-window-ms", str(WINDOW_MS))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def batch_sizes(server: Server) -> dict[str, float]:
    """The ``imagegate_batch_size`` histogram of the demo model: le bound -> count, plus ``count`` and ``sum``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        if family.name == "imagegate_batch_size":
            for sample in family.samples:
                if sample.labels.get("model") == MODEL:
                    key = sample.labels.get("le") or sample.name.rsplit("_", 1)[1]
                    out[key] = sample.value
    return out


def generate(server: Server, seed: int) -> np.ndarray:
    result = server.sdk().images.generate(
        model=MODEL, prompt=f"a fox {seed}", size="64x64", extra_body={"seed": seed, "num_inference_steps": 6}
    )
    data = base64.b64decode(result.data[0].b64_json)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_concurrent_requests_share_a_pipeline_call_and_make_the_images_they_make_alone(batching_server):
    before = batch_sizes(batching_server)
    alone = {seed: generate(batching_server, seed) for seed in SEEDS}
    after_alone = batch_sizes(batching_server)
    assert after_alone["count"] - before.get("count", 0) == len(SEEDS)
    assert after_alone["sum"] - before.get("sum", 0) == len(SEEDS)  # each ran alone

    with ThreadPoolExecutor(len(SEEDS)) as pool:
        together = dict(zip(SEEDS, pool.map(lambda seed: generate(batching_server, seed), SEEDS), strict=True))
    after = batch_sizes(batching_server)
    assert after["count"] - after_alone["count"] == len(SEEDS)
    assert after["1.0"] == after_alone["1.0"]  # no request of the four ran alone
    assert after["sum"] - after_alone["sum"] == len(SEEDS) ** 2  # all four shared one call

    for seed in SEEDS:
        assert np.abs(together[seed] - alone[seed]).max() <= 3
    assert np.abs(alone[SEEDS[0]] - alone[SEEDS[1]]).max() > 20  # the comparison above can tell seeds apart
