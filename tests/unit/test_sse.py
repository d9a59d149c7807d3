"""SSE framing: ``event:``/``data:`` frames, errors as ``error`` events, and the event stream always closed."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from litestar import get
from litestar.testing import create_test_client
from litestar.types import ASGIApp

from app.api.sse import event_stream, frame
from app.errors import BackendFailed, Cancelled, InvalidRequest


class _Event(msgspec.Struct):
    type: str
    value: int
    text: str = ""


def test_frame_format_exactly():
    assert frame("image_generation.partial_image", _Event(type="x", value=1)) == (
        b'event: image_generation.partial_image\ndata: {"type":"x","value":1,"text":""}\n\n'
    )


def test_frame_has_no_id_and_one_data_line():
    out = frame("e", _Event(type="e", value=2, text="line1\nline2"))
    assert b"id:" not in out
    lines = out.split(b"\n")
    assert lines[0] == b"event: e"
    assert lines[1].startswith(b"data: ")
    assert lines[2:] == [b"", b""]  # the newline inside the text is JSON-escaped, not a second data line
    assert json.loads(lines[1][len(b"data: ") :]) == {"type": "e", "value": 2, "text": "line1\nline2"}


class _FakeEventStream:
    """Quacks like app.services.images.EventStream: async-iterable, with an async aclose."""

    def __init__(self, events: list[_Event], error: BaseException | None = None, after_error: int = 0) -> None:
        self.events = events
        self.error = error
        self.after_error = after_error
        self.closed = 0
        self.yielded = 0

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for event in self.events:
            self.yielded += 1
            yield event
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed += 1


_STREAMS: dict[str, _FakeEventStream] = {}

_CASES = {
    "ok": lambda: _FakeEventStream([_Event(type="a.partial", value=1), _Event(type="a.completed", value=2)]),
    "empty": lambda: _FakeEventStream([]),
    "api_error": lambda: _FakeEventStream(
        [_Event(type="a.partial", value=1)], InvalidRequest("the fake says no", param="prompt")
    ),
    "backend": lambda: _FakeEventStream([_Event(type="a.partial", value=1)], BackendFailed("worker died")),
    "cancelled": lambda: _FakeEventStream([_Event(type="a.partial", value=1)], Cancelled("client left")),
    "crash": lambda: _FakeEventStream([_Event(type="a.partial", value=1)], RuntimeError("secret detail")),
}


@get("/stream/{case:str}")
async def _stream(case: str) -> ASGIApp:
    events = _CASES[case]()
    _STREAMS[case] = events
    return event_stream(events, ping_interval=15.0)


@pytest.fixture(scope="module")
def client():
    with create_test_client([_stream], logging_config=None) as c:
        yield c


def _frames(text: str) -> list[tuple[str, dict]]:
    """Parse an SSE body strictly: every block is exactly an event line and a data line."""
    assert text.endswith("\n\n") or text == ""
    out = []
    for block in text.split("\n\n")[:-1]:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ")
        assert data_line.startswith("data: ")
        out.append((event_line[len("event: ") :], json.loads(data_line[len("data: ") :])))
    return out


def test_events_are_framed_in_order(client):
    response = client.get("/stream/ok")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.text == (
        'event: a.partial\ndata: {"type":"a.partial","value":1,"text":""}\n\n'
        'event: a.completed\ndata: {"type":"a.completed","value":2,"text":""}\n\n'
    )
    assert "id:" not in response.text
    assert "[DONE]" not in response.text
    assert _STREAMS["ok"].closed == 1


def test_empty_stream(client):
    response = client.get("/stream/empty")
    assert response.status_code == 200
    assert response.text == ""
    assert _STREAMS["empty"].closed == 1


def test_api_error_mid_stream_becomes_error_event_and_ends(client):
    response = client.get("/stream/api_error")
    assert response.status_code == 200
    frames = _frames(response.text)
    assert [name for name, _ in frames] == ["a.partial", "error"]
    assert frames[-1][1] == {
        "type": "error",
        "error": {"message": "the fake says no", "type": "invalid_request_error", "param": "prompt", "code": None},
    }
    assert _STREAMS["api_error"].closed == 1


def test_backend_failure_mid_stream(client):
    frames = _frames(client.get("/stream/backend").text)
    assert frames[-1] == (
        "error",
        {
            "type": "error",
            "error": {"message": "worker died", "type": "server_error", "param": None, "code": "worker_failed"},
        },
    )
    assert len(frames) == 2
    assert _STREAMS["backend"].closed == 1


def test_cancelled_ends_the_stream_silently(client):
    response = client.get("/stream/cancelled")
    assert response.status_code == 200
    assert [name for name, _ in _frames(response.text)] == ["a.partial"]
    assert "error" not in response.text
    assert _STREAMS["cancelled"].closed == 1


def test_unexpected_exception_becomes_generic_server_error(client):
    response = client.get("/stream/crash")
    frames = _frames(response.text)
    assert [name for name, _ in frames] == ["a.partial", "error"]
    error = frames[-1][1]["error"]
    assert error["type"] == "server_error"
    assert "secret" not in response.text
    assert _STREAMS["crash"].closed == 1


def _scope() -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


class _EndlessEventStream(_FakeEventStream):
    async def _iterate(self):
        while True:
            self.yielded += 1
            yield _Event(type="tick", value=self.yielded)
            await asyncio.sleep(0.001)


async def test_client_disconnect_closes_the_events():
    events = _EndlessEventStream([])
    sent: list[dict] = []
    disconnect = asyncio.Event()

    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if sum(1 for m in sent if m["type"] == "http.response.body") >= 3:
            disconnect.set()

    app = event_stream(events, ping_interval=15.0)
    await asyncio.wait_for(app(_scope(), receive, send), timeout=5)
    assert events.closed == 1
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 200


async def test_send_failure_still_closes_the_events():
    events = _EndlessEventStream([])

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.body":
            raise OSError("connection reset")

    app = event_stream(events, ping_interval=15.0)
    with pytest.raises(OSError, match="connection reset"):
        await asyncio.wait_for(app(_scope(), receive, send), timeout=5)
    assert events.closed == 1
