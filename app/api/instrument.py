"""Per-request instrumentation in one ASGI wrapper: the HTTP metrics, and the gateway's own time per request.

The HTTP metrics (``imagegate_http_*``, by method, route template and status) are counted here rather than by
Litestar's Prometheus middleware: the same series, at a fraction of the cost, since each request reuses the metric
children of its route instead of building a request object and looking its labels up four times.
"""

from __future__ import annotations

import time

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter, Histogram

from app import metrics

HEADER = b"x-imagegate-overhead-ms"
APP_NAME = "imagegate"
UNCOUNTED_PATHS = frozenset({"/metrics"})
"""Scrapes are not requests worth counting (nor are CORS preflights)."""
DIALECTS = {
    "/v1/": "openai",
    "/hf/": "huggingface",
    "/sdapi/": "automatic1111",
    "/infer_api/": "infer_api",
    "/custom-models/": "custom_models",
    "/api/": "modelslab",
}
"""Route prefix -> the client API dialect its requests count under (``imagegate_dialect_requests_total``)."""


class _Series:
    """The metric children of one (method, route) and its statuses, made once."""

    __slots__ = ("by_status", "dialect", "in_progress", "labels")

    def __init__(self, method: str, path: str) -> None:
        self.labels = (method, path)
        self.in_progress = metrics.HTTP_IN_PROGRESS.labels(method, path, "200", APP_NAME)
        self.dialect = next((d for prefix, d in DIALECTS.items() if path.startswith(prefix)), None)
        self.by_status: dict[int, tuple[Counter, Histogram, Counter | None, Counter | None]] = {}

    def ended(self, status: int, seconds: float) -> None:
        """Count a request that ended with ``status`` after ``seconds``."""
        children = self.by_status.get(status)
        if children is None:
            values = (*self.labels, str(status), APP_NAME)
            errors = metrics.HTTP_ERRORS.labels(*values) if status >= 500 else None
            dialect = metrics.DIALECT_REQUESTS.labels(self.dialect, str(status)) if self.dialect else None
            children = self.by_status[status] = (
                metrics.HTTP_REQUESTS.labels(*values),
                metrics.HTTP_DURATION.labels(*values),
                errors,
                dialect,
            )
        requests, duration, errors, dialect = children
        requests.inc()
        duration.observe(seconds)
        if errors is not None:
            errors.inc()
        if dialect is not None:
            dialect.inc()


_series: dict[tuple[str, str], _Series] = {}


def instrument_middleware(app: ASGIApp) -> ASGIApp:
    """Count and time each HTTP request; tell its client and the overhead histogram what the gateway itself spent.

    The gateway's own time is the request's time minus what it spent waiting on backends and, while streaming, on
    its client. The header carries the figure when the response starts (for a stream: admission); the histogram
    gets the whole request's figure when it ends, for requests that reached a backend. The HTTP duration runs from
    routing to the last byte handed to the server.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        counted = scope["method"] != "OPTIONS" and scope["path"] not in UNCOUNTED_PATHS
        if counted:
            key = (scope["method"], scope.get("path_template", scope["path"]))
            series = _series.get(key)
            if series is None:
                series = _series[key] = _Series(*key)
            series.in_progress.inc()
        timing = metrics.RequestTiming()
        token = metrics.current_timing.set(timing)
        status = 200
        started = time.perf_counter()

        def own() -> float:
            return time.perf_counter() - started - timing.backend - timing.client

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                header = (HEADER, f"{own() * 1000:.3f}".encode())
                message = {**message, "headers": [*message.get("headers", ()), header]}  # type: ignore[typeddict-item]
                await send(message)
                return
            sent = time.perf_counter()
            await send(message)
            timing.client += time.perf_counter() - sent

        try:
            await app(scope, receive, timed_send)
        finally:
            metrics.current_timing.reset(token)
            if timing.used_backend:
                metrics.OVERHEAD_SECONDS.observe(own())
            if counted:
                series.in_progress.dec()
                series.ended(status, time.perf_counter() - started)

    return middleware
