"""Per-request instrumentation in one ASGI wrapper: request id, metrics, own time, server span, access log line.

The HTTP metrics (``imagegate_http_*``, by method, route template and status) are counted here rather than by
Litestar's Prometheus middleware: the same series, at a fraction of the cost, since each request reuses the metric
children of its route instead of building a request object and looking its labels up four times.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterable

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter, Histogram

from app import logs, metrics, telemetry

HEADER = b"x-imagegate-overhead-ms"
REQUEST_ID_HEADER = b"x-request-id"
SCOPE_REQUEST_ID = "imagegate.request_id"
"""Where the request id is kept in the ASGI scope (the error handler of unrouted requests looks for it)."""
APP_NAME = "imagegate"
UNCOUNTED_PATHS = frozenset({"/metrics"})
"""Scrapes are not requests worth counting (nor are CORS preflights)."""
UNOBSERVED_PATHS = frozenset({"/metrics", "/health", "/ready"})
"""Scrapes and probes get no access log line and no span (nor do CORS preflights)."""
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

access_log = logging.getLogger("imagegate.access")


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's ``x-request-id`` if it is a plain token (1-128 of ``A-Z a-z 0-9 . _ : -``), else a new one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _CLIENT_REQUEST_ID.fullmatch(value):
                return value.decode()
            break
    return secrets.token_hex(8)


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

    Each request gets an id (the client's ``x-request-id`` when it is a plain token, else a new one), sent back as
    ``x-request-id`` and bound to every log line logged while it runs; with tracing on, a server span (child of the
    client's ``traceparent``, if any) covers it. When it ends, one ``imagegate.access`` line at INFO says who asked
    for what and how it went.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        route = scope.get("path_template", path)
        rid = request_id(scope["headers"])
        scope[SCOPE_REQUEST_ID] = rid  # type: ignore[literal-required]
        echoed = (REQUEST_ID_HEADER, rid.encode())
        counted = method != "OPTIONS" and path not in UNCOUNTED_PATHS
        observed = method != "OPTIONS" and path not in UNOBSERVED_PATHS
        if counted:
            key = (method, route)
            series = _series.get(key)
            if series is None:
                series = _series[key] = _Series(*key)
            series.in_progress.inc()
        timing = metrics.RequestTiming()
        token = metrics.current_timing.set(timing)
        bound = logs.bind_request(rid)
        traced = telemetry.server_span(method, route, scope["headers"], rid) if telemetry.ENABLED and observed else None
        status = 200
        started = time.perf_counter()

        def own() -> float:
            return time.perf_counter() - started - timing.backend - timing.client

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                header = (HEADER, f"{own() * 1000:.3f}".encode())
                message = {**message, "headers": [*message.get("headers", ()), header, echoed]}  # type: ignore[typeddict-item]
                await send(message)
                return
            sent = time.perf_counter()
            await send(message)
            timing.client += time.perf_counter() - sent

        try:
            await app(scope, receive, timed_send)
        finally:
            ended = time.perf_counter()
            metrics.current_timing.reset(token)
            own_seconds = ended - started - timing.backend - timing.client
            if timing.used_backend:
                metrics.OVERHEAD_SECONDS.observe(own_seconds)
            if counted:
                series.in_progress.dec()
                series.ended(status, ended - started)
            principal = getattr(scope.get("user"), "id", None)
            trace_id = None
            if traced is not None:
                trace_id = telemetry.end_server_span(traced, status, principal, timing.model, timing.backend_name)
            if observed and access_log.isEnabledFor(logging.INFO):
                fields = {
                    "request_id": rid,
                    "principal": principal,
                    "model": timing.model,
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round((ended - started) * 1000, 3),
                    "overhead_ms": round(own_seconds * 1000, 3),
                    "backend": timing.backend_name,
                }
                if trace_id is not None:
                    fields["trace_id"] = trace_id
                access_log.info("request", extra=fields)
            logs.unbind(bound)

    return middleware
