"""The one place that frames Server-Sent Events, as OpenAI does: ``event: <type>`` then ``data: <json>``.

No ``id:`` lines (the Python SDK's decoder then yields empty events after keep-alive comments), no ``[DONE]``.
A failure after the 200 becomes an ``error`` event with a top-level ``error`` object, and the stream ends.

The response is a small ASGI app of its own rather than a streaming-response class: the stream runs in the
request's task, and one watcher task per stream waits for the client's disconnect (which cancels the stream, and so
the job), sends keep-alive comments while nothing else is sent, and ends a stream whose client has read nothing for
:data:`SEND_TIMEOUT`. An event an upstream already framed (:class:`~app.protocol.images.Framed`) goes out as it
came; every other event is encoded straight into its frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError, Cancelled, ErrorEvent
from app.protocol.images import JSON, Framed

log = logging.getLogger("imagegate.sse")

SEND_TIMEOUT = 60.0
"""A client that reads nothing for this long is treated as gone, and its job is stopped."""
PING = b": ping\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and the like pass each event on as it comes
]


def frame(event_type: str, payload: msgspec.Struct) -> bytearray:
    """The event's frame, its JSON encoded in place (images are copied once, into the frame)."""
    buf = bytearray(b"event: %b\ndata: " % event_type.encode())
    JSON.encode_into(payload, buf, -1)
    buf += b"\n\n"
    return buf


def _error_frame(error: ApiError) -> bytearray:
    return frame("error", ErrorEvent(error=error.body()))


class Events(Protocol):
    """Events with a ``type`` (an image request's, a job's), closed when the response ends however it ends."""

    def __aiter__(self) -> AsyncIterator[Any]: ...
    async def aclose(self) -> None: ...


def _failure(error: BaseException) -> bytearray | None:
    """The ``error`` event that ends a stream whose events failed; None when it ends silently (a cancellation)."""
    if isinstance(error, Cancelled):
        return None
    if isinstance(error, ApiError):
        return _error_frame(error)
    log.error("stream failed", exc_info=error)
    return _error_frame(ApiError("The server had an error while processing your request."))


def event_stream(events: Events, ping_interval: float) -> ASGIApp:
    """An ASGI app streaming ``events`` as SSE with keep-alive comments; it always closes ``events``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        stream = asyncio.current_task()
        assert stream is not None
        last_write = loop.time()
        sending = False
        gone = False

        def stop() -> None:
            nonlocal gone
            gone = True
            stream.cancel()

        async def watch() -> None:
            """Wait for the client's disconnect; meanwhile keep the stream alive and watch its sends."""
            tick = min(ping_interval or SEND_TIMEOUT, SEND_TIMEOUT / 4)
            while True:
                try:
                    async with asyncio.timeout(tick):
                        message = await receive()
                except TimeoutError:
                    idle = loop.time() - last_write
                    if sending and idle > SEND_TIMEOUT:
                        return stop()  # the client reads nothing
                    if ping_interval and not sending and idle >= ping_interval:
                        try:
                            async with asyncio.timeout(SEND_TIMEOUT):
                                await send({"type": "http.response.body", "body": PING, "more_body": True})
                        except TimeoutError:
                            return stop()
                    continue
                if message["type"] == "http.disconnect":
                    return stop()

        async def write(message: Message) -> None:
            nonlocal sending, last_write
            sending = True
            await send(message)
            sending = False
            last_write = loop.time()

        watcher = loop.create_task(watch())
        iterator = aiter(events)
        try:
            await write({"type": "http.response.start", "status": 200, "headers": HEADERS})
            while True:
                try:
                    event = await anext(iterator)
                except StopAsyncIteration:
                    break
                except Exception as e:
                    if (chunk := _failure(e)) is not None:
                        await write({"type": "http.response.body", "body": chunk, "more_body": True})
                    break
                chunk = event.frame if type(event) is Framed else frame(event.type, event)
                await write({"type": "http.response.body", "body": chunk, "more_body": True})
            await write({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone or stream.uncancel():
                raise  # cancelled from outside: not the client's doing
        finally:
            watcher.cancel()
            await events.aclose()

    return app
