"""The gateway's own time per request: the ``x-imagegate-overhead-ms`` header and the overhead histogram."""

from __future__ import annotations

import time

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics

HEADER = b"x-imagegate-overhead-ms"


def overhead_middleware(app: ASGIApp) -> ASGIApp:
    """Time each HTTP request minus what it spent waiting on backends and, while streaming, on its client.

    The header carries the figure when the response starts (for a stream: admission); the histogram gets the
    whole request's figure when it ends, for requests that reached a backend.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        timing = metrics.RequestTiming()
        token = metrics.current_timing.set(timing)
        started = time.perf_counter()

        def own() -> float:
            return time.perf_counter() - started - timing.backend - timing.client

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
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

    return middleware
