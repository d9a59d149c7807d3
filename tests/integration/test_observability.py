"""Request ids, the access log line and the request's spans, in process (fake backends, an in-memory exporter)."""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app import logs, telemetry
from app.backends.fake import FakeBackend
from tests.helpers import InOrder, restored_logging

from .conftest import make_client

GENERATIONS = "/v1/images/generations"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
_ids = itertools.count()


def _n(prefix: str) -> str:
    return f"obs-{prefix}-{next(_ids)}"


def _model(name: str) -> dict:
    return {"name": name, "path": f"/m/{name}", "default_size": "64x64", "default_steps": 3}


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Every log line of the test as JSON, through the real handler; the root logger is restored afterwards."""
    buf = io.StringIO()
    with restored_logging():
        logs.setup("debug", "json", stream=buf)
        yield buf


def parsed(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert telemetry.setup(telemetry.GATEWAY, exporter=exporter)
    try:
        yield exporter
    finally:
        telemetry.shutdown()
    assert telemetry.ENABLED is False


def test_a_client_request_id_is_echoed_and_a_bad_one_replaced(tmp_path):
    model = _n("m")
    with make_client(tmp_path, [(FakeBackend(_n("b")), [model])], models=[_model(model)]) as tc:
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p"}, headers={"x-request-id": "client-42.a:b_c"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "client-42.a:b_c"
        for bad in ("x" * 129, "has space", "semi;colon", ""):
            r = tc.post(GENERATIONS, json={"model": model, "prompt": "p"}, headers={"x-request-id": bad})
            assert r.status_code == 200
            assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 16
        generated = {tc.get("/v1/models").headers["x-request-id"] for _ in range(3)}
        assert len(generated) == 3, "each request gets its own id"
        # Every kind of answer carries it: an error, a refusal of the router, a stream.
        assert tc.post(GENERATIONS, json={"model": model, "prompt": "p", "size": "1x1"}).headers["x-request-id"]
        r = tc.get("/no/such/route", headers={"x-request-id": "lost-1"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "lost-1"
        assert tc.delete("/v1/models").headers["x-request-id"]
        body = {"model": model, "prompt": "p", "stream": True, "partial_images": 1}
        with tc.stream("POST", GENERATIONS, json=body, headers={"x-request-id": "stream-1"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-request-id"] == "stream-1"
            r.read()


def test_one_access_line_per_request_with_its_fields_and_the_failover_warning_carries_the_request_id(
    tmp_path, log_lines
):
    model = _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    with make_client(tmp_path, [(bad, [model]), (good, [model])], models=[_model(model)]) as tc:
        tc.app.state.pool.policy = InOrder()
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p"}, headers={"x-request-id": "req-failover-1"})
        assert r.status_code == 200
        assert tc.get("/health").status_code == 200
        assert tc.get("/metrics").status_code == 200
        assert tc.get("/v1/models", headers={"x-request-id": "req-models-1"}).status_code == 200
    lines = parsed(log_lines)
    access = [line for line in lines if line["logger"] == "imagegate.access"]
    assert [a["request_id"] for a in access] == ["req-failover-1", "req-models-1"], "probes and scrapes: no line"
    first = access[0]
    assert first["event"] == "request" and first["level"] == "info" and first["timestamp"].endswith("Z")
    assert first["principal"] == "anonymous"
    assert first["model"] == model
    assert (first["method"], first["route"], first["status"]) == ("POST", GENERATIONS, 200)
    assert first["backend"] == good.name, "the backend of the last attempt"
    assert first["duration_ms"] >= first["overhead_ms"] >= 0
    assert "trace_id" not in first, "tracing is off"
    assert access[1]["model"] is None and access[1]["backend"] is None and access[1]["route"] == "/v1/models"
    moved = [line for line in lines if line["logger"] == "imagegate.failover"]
    assert moved and all(line["request_id"] == "req-failover-1" for line in moved), moved
    assert "moves to" in moved[0]["event"]


def test_the_spans_of_a_failed_over_stream(tmp_path, spans):
    model = _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    with make_client(tmp_path, [(bad, [model]), (good, [model])], models=[_model(model)]) as tc:
        tc.app.state.pool.policy = InOrder()
        body = {"model": model, "prompt": "p", "stream": True, "partial_images": 1}
        headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=1", "x-request-id": "traced-1"}
        with tc.stream("POST", GENERATIONS, json=body, headers=headers) as r:
            assert r.status_code == 200
            r.read()
        assert tc.get("/health").status_code == 200
    finished = spans.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in finished} == {CLIENT_TRACE}, "no span for the probe"
    [server] = [s for s in finished if s.kind == SpanKind.SERVER]
    assert server.name == f"POST {GENERATIONS}"
    assert format(server.parent.span_id, "016x") == CLIENT_SPAN and server.parent.is_remote
    assert server.context.trace_state.get("vendor") == "1"
    assert server.attributes["http.route"] == GENERATIONS
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["imagegate.request_id"] == "traced-1"
    assert server.attributes["imagegate.backend"] == good.name
    children = sorted((s for s in finished if s.parent and s.parent.span_id == server.context.span_id), key=_start)
    assert [s.name for s in children] == ["auth", "admission", f"backend {bad.name}", f"backend {good.name}"]
    auth, admission, failed, succeeded = children
    assert auth.attributes["imagegate.principal"] == "anonymous"
    assert failed.status.status_code == StatusCode.ERROR and "fake failure" in (failed.status.description or "")
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.attributes["imagegate.attempt"] == 1 and succeeded.attributes["imagegate.attempt"] == 2
    assert succeeded.status.status_code == StatusCode.UNSET and succeeded.attributes["imagegate.batch_size"] == 1
    assert admission.end_time <= succeeded.end_time and admission.end_time >= failed.end_time
    assert server.end_time >= succeeded.end_time


def _start(span) -> int:
    return span.start_time
