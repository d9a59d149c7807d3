"""The Grafana dashboard and the alert rules of deploy/ against the /metrics of a real `imagegate serve`.

/metrics is Litestar's PrometheusController over prometheus_client's default registry (one gateway process; the
multiprocess collector is used only when PROMETHEUS_MULTIPROC_DIR is set, which imagegate never does). That registry
writes the ``# HELP``/``# TYPE`` lines of every declared metric even while a labelled one has no series yet, so the
names are checked against the families the ``# TYPE`` lines announce: metrics that only get series after rarer events
(webhook deliveries, worker restarts, cooldowns, fallbacks, auth failures) count as exposed without provoking them.
One streamed generation first gives the request path's metrics real series, which are checked as samples.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.unit.test_deploy import series_names, used_names

from .conftest import Server

MODEL = "imagegate-demo"

pytestmark = pytest.mark.e2e

TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)", re.M)


def scrape(server: Server) -> str:
    response = httpx.get(f"{server.url}/metrics", timeout=30)
    assert response.status_code == 200
    return response.text


def exposed(text: str) -> set[str]:
    """Every series name the scrape's families can expose."""
    return {name for family, kind in TYPE_LINE.findall(text) for name in series_names(family, kind)}


def samples(text: str) -> dict[str, list[tuple[str, float]]]:
    """Series name -> (labels, value) of each sample in the scrape."""
    out: dict[str, list[tuple[str, float]]] = {}
    for name, labels, value in SAMPLE.findall(text):
        out.setdefault(name, []).append((labels or "", float(value)))
    return out


@pytest.fixture(scope="module")
def metrics_text(server: Server) -> str:
    """/metrics after one streamed generation with a partial image, so the request path's metrics have series."""
    events = list(
        server.sdk().images.generate(
            model=MODEL,
            prompt="a dashboard fox",
            size="64x64",
            stream=True,
            partial_images=1,
            extra_body={"num_inference_steps": 2},
        )
    )
    assert events[-1].type == "image_generation.completed"
    return scrape(server)


@pytest.mark.parametrize("user", ["dashboard", "alerts"])
def test_every_metric_used_is_exposed(metrics_text, user):
    used = used_names()[user]
    missing = used - exposed(metrics_text)
    assert not missing, f"the {user} use metrics the server's /metrics does not expose: {sorted(missing)}"


def test_the_request_path_has_series(metrics_text):
    got = samples(metrics_text)

    def value(name: str, *fragments: str) -> float:
        matching = [v for labels, v in got.get(name, []) if all(f in labels for f in fragments)]
        assert matching, f"no sample of {name} with {fragments}"
        return sum(matching)

    route = 'path="/v1/images/generations"'
    model = f'model="{MODEL}"'
    assert value("imagegate_http_requests_total", route, 'status_code="200"') >= 1
    assert value("imagegate_http_request_duration_seconds_count", route) >= 1
    assert value("imagegate_dialect_requests_total", 'dialect="openai"') >= 1
    assert value("imagegate_images_total", model, 'outcome="success"') >= 1
    assert value("imagegate_gateway_overhead_seconds_count") >= 1
    for histogram in (
        "imagegate_time_to_first_partial_image_seconds",
        "imagegate_generation_duration_seconds",
        "imagegate_queue_wait_seconds",
        "imagegate_batch_size",
        "imagegate_denoising_step_seconds",
    ):
        assert value(f"{histogram}_count", model) >= 1, histogram
        assert value(f"{histogram}_bucket", model, 'le="+Inf"') >= 1, histogram
    assert value("imagegate_workers_up", model) >= 1
    assert value("imagegate_queue_depth", model) == 0
    assert value("imagegate_backend_up") >= 1
    assert value("imagegate_backend_state", 'state="ready"') >= 1
    assert value("imagegate_backend_requests_total") >= 1
    # zero from the start, so the alerts' rates and the dashboard's panels see them before any failure
    for name in ("failures_total", "cooldowns_total", "in_flight"):
        assert f"imagegate_backend_{name}" in got, name
