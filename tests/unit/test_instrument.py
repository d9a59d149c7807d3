"""The instrumentation wrapper on its own: an inner ASGI app that looks at the metrics while it runs."""

from __future__ import annotations

from app.api.instrument import HEADER, instrument_middleware
from tests.helpers import sample

PATH = "/unit/{thing}"


def http_sample(name: str, status: int = 200, method: str = "POST") -> float:
    labels = {"method": method, "path": PATH, "status_code": str(status), "app_name": "imagegate"}
    return sample(f"imagegate_http_{name}", **labels)


async def call(app, method: str = "POST", path: str = "/unit/1") -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "path_template": PATH, "headers": []}
    await app(scope, receive, send)
    return sent


def responder(status: int, seen: list[float]):
    async def app(scope, receive, send) -> None:
        seen.append(http_sample("requests_in_progress"))
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def test_a_request_is_in_progress_while_it_runs_then_counted_by_its_status():
    seen: list[float] = []
    before = {s: (http_sample("requests_total", s), http_sample("requests_error_total", s)) for s in (201, 502)}
    sent = await call(instrument_middleware(responder(201, seen)))
    await call(instrument_middleware(responder(502, seen)))
    assert seen == [1, 1], "each request counts as in progress while it runs"
    assert http_sample("requests_in_progress") == 0
    assert http_sample("requests_total", 201) == before[201][0] + 1
    assert http_sample("requests_error_total", 201) == before[201][1]
    assert http_sample("requests_total", 502) == before[502][0] + 1
    assert http_sample("requests_error_total", 502) == before[502][1] + 1, "5xx answers count as errors"
    assert http_sample("request_duration_seconds_count", 201) >= 1
    start = sent[0]
    assert start["status"] == 201 and (b"content-type", b"text/plain") in start["headers"]
    assert any(name == HEADER for name, _ in start["headers"])


async def test_preflights_and_scrapes_are_not_counted():
    for method, path in (("OPTIONS", "/unit/1"), ("GET", "/metrics")):
        before = http_sample("requests_total", method=method)
        await call(instrument_middleware(responder(200, [])), method=method, path=path)
        assert http_sample("requests_total", method=method) == before
