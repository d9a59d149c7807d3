"""Traces end to end: a real `imagegate serve` and its worker export to an OTLP/HTTP receiver the test runs.

The demo model has two backends: an upstream that answers every generation with 500, and the local worker. Routing
is ``least_work``: with both idle, either may be tried first, so the test sends streamed requests (each with its own
client ``traceparent``) until one went to the failing upstream first and failed over (``imagegate_retries_total``
counts it), then checks that request's trace: the gateway's spans under the client's span, the failed attempt and
the successful one, and the worker's spans (another process, another service name) under the successful attempt.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import DEMO_MODEL, demo_model

from .conftest import Server
from .otlp import FailingUpstream, Receiver, Span

pytestmark = pytest.mark.e2e

STEPS = 3
ERROR, UNSET = 2, 0
SERVER = 2  # OTLP's SPAN_KIND_SERVER
GATEWAY_SPANS = {"auth", "admission", "backend broken", "backend local-cpu"}
WORKER_SPANS = {"POST /v1/generate", "queue", "pipeline", "denoising", "preview", "encode"}


@dataclass
class Traced:
    srv: Server
    receiver: Receiver
    upstream: FailingUpstream


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Iterator[Traced]:
    tmp = tmp_path_factory.mktemp("tracing")
    receiver, upstream = Receiver(), FailingUpstream()
    config = tmp / "imagegate.json"
    model = msgspec.to_builtins(demo_model(str(tmp)))
    config.write_text(
        json.dumps(
            {
                "models": [model],
                "upstreams": [{"name": "broken", "base_url": upstream.url, "models": {DEMO_MODEL: "any"}}],
                "routing": "least_work",
                "max_attempts": 2,
                "cooldown_failures": 1000,  # the failing upstream stays in the pool, tried first half the time
                "health_interval": 0.5,
            }
        )
    )
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    srv = None
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("OTEL_")]:
            mp.delenv(name)  # the defaults are under test (service names, sampler)
        srv = Server(tmp, "--config", str(config), env=env)
    try:
        srv.wait_ready(timeout=240)
        _wait_both_ready(srv.url)
        yield Traced(srv, receiver, upstream)
    finally:
        srv.stop()
        receiver.close()
        upstream.close()


def _wait_both_ready(url: str, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            states = {b["name"]: b["state"] for b in httpx.get(f"{url}/ready", timeout=5).json()["backends"]}
            if states == {"broken": "ready", "local-cpu": "ready"}:
                return
        time.sleep(0.2)
    raise AssertionError("the upstream and the local worker did not both become ready")


def retries(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "imagegate_retries_total" and s.labels.get("model") == DEMO_MODEL:
                return s.value
    return 0.0


def stream(url: str, traceparent: str) -> tuple[httpx.Response, list[str]]:
    body = {
        "model": DEMO_MODEL,
        "prompt": "a traced fox",
        "size": "64x64",
        "num_inference_steps": STEPS,
        "stream": True,
        "partial_images": 1,
    }
    headers = {"traceparent": traceparent, "tracestate": "client=e2e"}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, headers=headers, timeout=120) as r:
        text = r.read().decode()
    return r, [line[7:] for line in text.splitlines() if line.startswith("event: ")]


def failed_over_trace(t: Traced, tries: int = 16) -> tuple[str, str, httpx.Response]:
    """(trace id, client span id, response) of a streamed request that failed over; each try has its own trace."""
    for _ in range(tries):
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
        before = retries(t.srv.url)
        r, events = stream(t.srv.url, f"00-{trace_id}-{span_id}-01")
        assert r.status_code == 200 and events == ["image_generation.partial_image", "image_generation.completed"]
        if retries(t.srv.url) > before:
            return trace_id, span_id, r
    raise AssertionError(f"no request was tried on the failing upstream first in {tries} tries")


def complete(spans: list[Span]) -> bool:
    names = {s.name for s in spans}
    return {"POST /v1/images/generations", *GATEWAY_SPANS, *WORKER_SPANS} <= names


def test_a_failed_over_stream_is_one_trace_across_gateway_and_worker(traced):
    trace_id, client_span, response = failed_over_trace(traced)
    spans = traced.receiver.wait(trace_id, complete)
    by_id = {s.span_id: s for s in spans}

    [server] = [s for s in spans if s.name == "POST /v1/images/generations"]
    assert server.service == "imagegate" and server.kind == SERVER
    assert server.parent_id == client_span, "the server span is the child of the client's span"
    assert server.attributes["http.route"] == "/v1/images/generations"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["imagegate.request_id"] == response.headers["x-request-id"]

    under_server = sorted((s for s in spans if s.parent_id == server.span_id), key=lambda s: s.start)
    assert {s.name for s in under_server} == GATEWAY_SPANS, [s.name for s in under_server]
    attempts = [s for s in under_server if s.name.startswith("backend ")]
    assert [s.name for s in attempts] == ["backend broken", "backend local-cpu"], "the failing upstream first"
    failed, succeeded = attempts
    assert failed.status == ERROR and "500" in failed.status_message, failed
    assert [name for name, _ in failed.events] == ["exception"]
    assert failed.attributes["imagegate.attempt"] == 1 and failed.attributes["imagegate.backend"] == "broken"
    assert succeeded.status == UNSET and succeeded.attributes["imagegate.attempt"] == 2
    assert failed.end <= succeeded.start
    admission = next(s for s in under_server if s.name == "admission")
    assert admission.start <= failed.start and failed.end <= admission.end <= succeeded.end

    # The worker's spans: another process, under the successful attempt.
    [job] = [s for s in spans if s.name == "POST /v1/generate"]
    assert job.parent_id == succeeded.span_id and job.kind == SERVER
    worker = [s for s in spans if s.service == "imagegate-worker"]
    assert {s.name for s in worker} == WORKER_SPANS, sorted(s.name for s in worker)

    def ancestors(s: Span) -> list[str]:
        out = []
        while s.parent_id in by_id:
            s = by_id[s.parent_id]
            out.append(s.name)
        return out

    for s in worker:
        assert s.trace_id == trace_id
        if s is not job:
            assert "POST /v1/generate" in ancestors(s) and "backend local-cpu" in ancestors(s), (s.name, ancestors(s))
    named = {s.name: s for s in worker}
    assert named["denoising"].parent_id == named["pipeline"].span_id
    assert "denoising" in ancestors(named["preview"]) or "pipeline" in ancestors(named["preview"])
    steps = [attrs for name, attrs in named["denoising"].events if name == "step"]
    assert [a["step"] for a in steps] == list(range(1, STEPS + 1)) and all(a["total"] == STEPS for a in steps)
    assert named["pipeline"].attributes["imagegate.batch_size"] == 1
    assert named["queue"].end <= named["pipeline"].start
    assert named["encode"].start >= named["pipeline"].start
    assert all(s.service == "imagegate" for s in spans if s not in worker)

    # The access line of the request names its trace.
    log = traced.srv.log.read_text()
    assert f"trace_id={trace_id}" in log and f"request_id={response.headers['x-request-id']}" in log


def test_probes_make_no_spans_and_each_request_its_own_trace(traced):
    before = {s.trace_id for s in traced.receiver.spans}
    for _ in range(3):
        assert httpx.get(f"{traced.srv.url}/ready", timeout=10).status_code == 200
        assert httpx.get(f"{traced.srv.url}/health", timeout=10).status_code == 200
    r = httpx.get(f"{traced.srv.url}/v1/models", timeout=10)
    assert r.status_code == 200
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        new = [s for s in traced.receiver.spans if s.trace_id not in before]
        if any(s.name == "GET /v1/models" for s in new):
            break
        time.sleep(0.1)
    new = [s for s in traced.receiver.spans if s.trace_id not in before]
    roots = [s for s in new if not s.parent_id]
    assert [s.name for s in roots if s.service == "imagegate" and s.kind == SERVER] == ["GET /v1/models"], [
        s.name for s in roots
    ]
