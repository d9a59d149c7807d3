"""A stub OpenAI Images API: fixed delay, fixed answer, as cheap as a Python server gets (raw asyncio + httptools).

The benchmarks' stand-in for an image backend, reached directly and through every gateway under test. The path
prefix selects the answer, so one stub serves every variant and each gateway is configured with one base URL per
variant::

    POST /{payload}/{delay_ms}/v1/images/generations     payload: small | large | stamp
    GET  /{payload}/{delay_ms}/v1/models                 (a gateway's health probe)
    GET  /health

- ``small``: the b64 of a valid 4x4 PNG (a ~400-byte JSON body); ``large``: the b64 of a valid ~1.5 MB noise PNG
  (a 2,000,000-character ``b64_json``, the size of a 1024x1024 gpt-image answer); ``stamp``: like ``small``, but
  every image carries, in a PNG ``tEXt`` chunk named ``emit``, the stub's ``time.monotonic_ns()`` at the moment
  the event was written (the clock is system-wide, so a client on the same host can compute the delivery delay of
  each event, whatever the gateway in between does to the JSON around the image).
- Non-streamed requests are answered ``delay_ms`` after the request arrived, with one pre-built
  ``ImagesResponse``.
- ``"stream": true`` requests get ``text/event-stream`` (chunked): ``partial_images`` (default 0) events
  ``image_generation.partial_image`` then one ``image_generation.completed`` event (with ``usage``), spread evenly
  over ``delay_ms``: partial k at ``delay*(k+1)/(partial_images+1)``, completed at ``delay``; no ``[DONE]``, as
  OpenAI does. The whole request takes the same ``delay_ms`` streamed or not.

Run: ``python benchmarks/stub.py --port P`` (prints ``ready`` once it listens); uvloop when available.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import random
import resource
import struct
import sys
import time
import zlib

import httptools
import msgspec

EVENT_PARTIAL = "image_generation.partial_image"
EVENT_COMPLETED = "image_generation.completed"
USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 12},
    "output_tokens": 4160,
    "total_tokens": 4172,
}


def png(width: int, height: int, rows: bytes, *, text: bytes | None = None, level: int = 9) -> bytes:
    """A valid RGB PNG from raw scanlines (each row: filter byte + 3*width bytes), with an optional tEXt chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if text is not None:
        out += chunk(b"tEXt", b"emit\x00" + text)
    return out + chunk(b"IDAT", zlib.compress(rows, level)) + chunk(b"IEND", b"")


def small_png() -> bytes:
    rows = b"".join(b"\x00" + bytes((x * 60, y * 60, 128)) * 1 for y in range(4) for x in range(4))
    return png(4, 4, rows)


def large_png(b64_chars: int = 2_000_000) -> bytes:
    """Random noise stored uncompressed: a PNG whose base64 is ``b64_chars`` long (to a few bytes)."""
    width = 1024
    row = 1 + 3 * width
    overhead = 8 + 25 + 12 + 11 + 12  # signature, IHDR, IDAT framing, zlib framing, IEND
    target = b64_chars * 3 // 4
    height = max(1, math.ceil((target - overhead) / (row + 5 / 65535 * row)))
    rng = random.Random(0)
    rows = b"".join(b"\x00" + rng.randbytes(3 * width) for _ in range(int(height)))
    return png(width, int(height), rows, level=0)


_STAMP_ROWS = b"".join(b"\x00" + bytes((200, 40, 90)) * 4 for _ in range(4))
_STAMP_IDAT = zlib.compress(_STAMP_ROWS, 9)


def stamped_png(now_ns: int) -> bytes:
    """A 4x4 PNG carrying ``emit=<now_ns>`` in a tEXt chunk (built fast: the pixels are compressed once)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
        + chunk(b"tEXt", b"emit\x00" + str(now_ns).encode())
        + chunk(b"IDAT", _STAMP_IDAT)
        + chunk(b"IEND", b"")
    )


def emit_time_ns(image: bytes) -> int | None:
    """The stub's emit time carried by a stamped PNG, or None."""
    i = image.find(b"tEXtemit\x00")
    if i < 4:
        return None
    length = struct.unpack(">I", image[i - 4 : i])[0]
    return int(image[i + 9 : i + 4 + length])


_encode = msgspec.json.Encoder().encode


class _Req(msgspec.Struct):
    stream: bool = False
    partial_images: int | None = None
    n: int | None = 1


_decode_req = msgspec.json.Decoder(_Req).decode


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _response_bytes(status: bytes, ctype: bytes, body: bytes) -> bytes:
    return (
        (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype + b"\r\ncontent-length: " + str(len(body)).encode())
        + b"\r\n\r\n"
        + body
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def _event(kind: str, fields: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode({"type": kind, **fields}) + b"\n\n"


class Payload:
    """The pre-built answers of one payload kind."""

    def __init__(self, name: str, image: bytes | None) -> None:
        self.name = name
        self.image = image
        self.b64 = _b64(image) if image is not None else ""
        created = int(time.time())
        self.json_response = _response_bytes(
            b"200 OK",
            b"application/json",
            _encode(
                {
                    "created": created,
                    "data": [{"b64_json": self.b64}],
                    "background": "opaque",
                    "output_format": "png",
                    "quality": "medium",
                    "size": "1024x1024",
                    "usage": USAGE,
                }
            ),
        )
        self._partials: dict[int, bytes] = {}
        self._completed = self._event_chunk(EVENT_COMPLETED, self.b64, None) if image is not None else b""

    def _event_chunk(self, kind: str, b64: str, index: int | None) -> bytes:
        fields: dict = {
            "b64_json": b64,
            "created_at": int(time.time()),
            "size": "1024x1024",
            "quality": "medium",
            "background": "opaque",
            "output_format": "png",
        }
        if index is None:
            fields["usage"] = USAGE
        else:
            fields["partial_image_index"] = index
        return _chunk(_event(kind, fields))

    def partial(self, index: int) -> bytes:
        if self.image is None:
            return self._event_chunk(EVENT_PARTIAL, _b64(stamped_png(time.monotonic_ns())), index)
        if index not in self._partials:
            self._partials[index] = self._event_chunk(EVENT_PARTIAL, self.b64, index)
        return self._partials[index]

    def completed(self) -> bytes:
        if self.image is None:
            return self._event_chunk(EVENT_COMPLETED, _b64(stamped_png(time.monotonic_ns())), None)
        return self._completed

    def json_answer(self) -> bytes:
        if self.image is None:
            body = _encode(
                {
                    "created": int(time.time()),
                    "data": [{"b64_json": _b64(stamped_png(time.monotonic_ns()))}],
                    "usage": USAGE,
                }
            )
            return _response_bytes(b"200 OK", b"application/json", body)
        return self.json_response


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
MODELS = _response_bytes(
    b"200 OK", b"application/json", b'{"object":"list","data":[{"id":"stub-model","object":"model"}]}'
)
OK = _response_bytes(b"200 OK", b"application/json", b'{"status":"ok"}')
NOT_FOUND = _response_bytes(b"404 Not Found", b"application/json", b'{"error":{"message":"not found"}}')
BAD = _response_bytes(
    b"400 Bad Request", b"application/json", b'{"error":{"message":"bad request","type":"invalid_request_error"}}'
)


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.open_connections = 0
        self.max_connections = 0


class StubProtocol(asyncio.Protocol):
    """One client connection; answers are written in request order after each request's delay."""

    def __init__(self, payloads: dict[str, Payload], stats: Stats) -> None:
        self.payloads = payloads
        self.stats = stats
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.method = b""
        self.body: list[bytes] = []
        self.timers: set[asyncio.TimerHandle] = set()
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.stats.open_connections += 1
        self.stats.max_connections = max(self.stats.max_connections, self.stats.open_connections)

    def connection_lost(self, exc) -> None:
        self.stats.open_connections -= 1
        self.transport = None
        for t in self.timers:
            t.cancel()
        self.timers.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(BAD)
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.method = self.parser.get_method()
        self.handle(self.url.split(b"?", 1)[0], b"".join(self.body))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def later(self, delay: float, fn, *args) -> None:
        handle: asyncio.TimerHandle

        def run() -> None:
            self.timers.discard(handle)
            fn(*args)

        handle = self.loop.call_later(delay, run)
        self.timers.add(handle)

    def handle(self, path: bytes, body: bytes) -> None:
        if path == b"/health":
            self.write(OK)
            return
        parts = path.strip(b"/").split(b"/")
        # {payload}/{delay_ms}/v1/...
        if len(parts) < 4 or parts[2] != b"v1":
            self.write(NOT_FOUND)
            return
        payload = self.payloads.get(parts[0].decode())
        try:
            delay = int(parts[1]) / 1000
        except ValueError:
            payload = None
        rest = b"/".join(parts[3:])
        if payload is None:
            self.write(NOT_FOUND)
        elif rest == b"models":
            self.write(MODELS)
        elif rest == b"images/generations" and self.method == b"POST":
            try:
                req = _decode_req(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.write(BAD)
                return
            self.stats.requests += 1
            if req.stream:
                self.stream(payload, delay, req.partial_images or 0)
            elif delay > 0:
                self.later(delay, self.answer, payload)
            else:
                self.answer(payload)
        else:
            self.write(NOT_FOUND)

    def answer(self, payload: Payload) -> None:
        self.write(payload.json_answer())

    def stream(self, payload: Payload, delay: float, partials: int) -> None:
        self.stats.streams += 1
        self.write(SSE_HEAD)
        for k in range(partials):
            self.later(delay * (k + 1) / (partials + 1), self._partial, payload, k)
        self.later(delay, self._complete, payload)

    def _partial(self, payload: Payload, k: int) -> None:
        self.write(payload.partial(k))

    def _complete(self, payload: Payload) -> None:
        self.write(payload.completed() + b"0\r\n\r\n")


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(host: str, port: int) -> None:
    payloads = {
        "small": Payload("small", small_png()),
        "large": Payload("large", large_png()),
        "stamp": Payload("stamp", None),
    }
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(payloads, stats), host, port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    raise_nofile()
    try:
        run(serve(args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


def run(coro):
    """``uvloop.run`` where uvloop is installed, else ``asyncio.run``."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    main()
