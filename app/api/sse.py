"""The one place that frames Server-Sent Events, as OpenAI does: ``event: <type>`` then ``data: <json>``.

No ``id:`` lines (the Python SDK's decoder then yields empty events after keep-alive comments), no ``[DONE]``.
A failure after the 200 becomes an ``error`` event with a top-level ``error`` object, and the stream ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec
from litestar.types import ASGIApp, Receive, Scope, Send
from sse_starlette import EventSourceResponse

from app.errors import ApiError, Cancelled, ErrorEvent
from app.protocol.images import encode_json

log = logging.getLogger("imagegate.sse")

SEND_TIMEOUT = 60.0
"""A client that reads nothing for this long is treated as gone, and its job is stopped."""


def frame(event_type: str, payload: msgspec.Struct) -> bytes:
    return b"".join((b"event: ", event_type.encode(), b"\ndata: ", encode_json(payload), b"\n\n"))  # one copy


def _error_frame(error: ApiError) -> bytes:
    return frame("error", ErrorEvent(error=error.body()))


class Events(Protocol):
    """Events with a ``type`` (an image request's, a job's), closed when the response ends however it ends."""

    def __aiter__(self) -> AsyncIterator[Any]: ...
    async def aclose(self) -> None: ...


def event_stream(events: Events, ping_interval: float) -> ASGIApp:
    """An ASGI app streaming ``events`` as SSE with keep-alive comments; it always closes ``events``."""

    async def frames():
        try:
            async for event in events:
                yield frame(event.type, event)
        except Cancelled:
            return
        except ApiError as e:
            yield _error_frame(e)
        except Exception:
            log.exception("stream failed")
            yield _error_frame(ApiError("The server had an error while processing your request."))

    response = EventSourceResponse(
        frames(), ping=ping_interval, sep="\n", send_timeout=SEND_TIMEOUT, headers={"cache-control": "no-cache"}
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await response(scope, receive, send)  # type: ignore[arg-type]
        finally:
            await events.aclose()

    return app
