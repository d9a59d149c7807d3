"""UpstreamBackend against an in-process stub of the OpenAI Images API (aiohttp.web on a random port)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.backends.upstream import MALFORMED, UpstreamBackend, _cut_images, _data, _decode_response, _image
from app.config import ConfigError, UpstreamConfig
from app.errors import BackendFailed
from app.worker import protocol
from app.worker.protocol import (
    Done,
    Failed,
    GenerationParams,
    Image,
    Partial,
    RelayedImage,
    RelayedPartial,
    Started,
    WorkerEvent,
)

KEY = "sk-upstream-test"
BIG = os.urandom(300_000)  # spans many socket reads, so SSE lines arrive in pieces


def image_bytes(index: int) -> bytes:
    return b"final-%d-" % index + (BIG if index == 0 else b"small")


def partial_bytes(index: int, partial: int) -> bytes:
    return b"partial-%d-%d" % (index, partial)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


USAGE = {
    "input_tokens": 9,
    "output_tokens": 256,
    "total_tokens": 265,
    "input_tokens_details": {"text_tokens": 7, "image_tokens": 2},
}


@dataclass
class Stub:
    """Answers like OpenAI; ``mode`` picks a misbehaviour, ``requests`` records what arrived."""

    mode: str = "ok"
    status: int = 200
    models_status: int = 200
    with_index: bool = True
    crlf: bool = False
    usage: dict[str, Any] | None = field(default_factory=lambda: dict(USAGE))
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=10_000_000)
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_post("/v1/images/edits", self.edits)
        app.router.add_post("/v1/images/variations", self.variations)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/files/{index}", self.file)
        return app

    async def generations(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": request.path, "headers": dict(request.headers), "json": body})
        return await self.answer(request, body, "image_generation")

    async def edits(self, request: web.Request) -> web.StreamResponse:
        fields, files = await self.form(request)
        self.requests.append({"path": request.path, "headers": dict(request.headers), "fields": fields, "files": files})
        return await self.answer(request, fields, "image_edit")

    async def variations(self, request: web.Request) -> web.StreamResponse:
        fields, files = await self.form(request)
        self.requests.append({"path": request.path, "headers": dict(request.headers), "fields": fields, "files": files})
        return await self.answer(request, fields, "image_generation")

    @staticmethod
    async def form(request: web.Request) -> tuple[dict[str, str], dict[str, tuple[bytes, str, str]]]:
        fields: dict[str, str] = {}
        files: dict[str, tuple[bytes, str, str]] = {}
        reader = await request.multipart()
        async for part in reader:
            data = await part.read()  # type: ignore[union-attr]
            if part.filename:  # type: ignore[union-attr]
                files[part.name] = (bytes(data), part.headers["content-type"], part.filename)  # type: ignore[union-attr,index]
            else:
                fields[part.name] = data.decode()  # type: ignore[union-attr,index]
        return fields, files

    async def models(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "headers": dict(request.headers)})
        if self.models_status != 200:
            return web.json_response({"error": {"message": "models says no"}}, status=self.models_status)
        return web.json_response({"object": "list", "data": [{"id": "up-model", "object": "model"}]})

    async def file(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "headers": dict(request.headers)})
        return web.Response(body=image_bytes(int(request.match_info["index"])), content_type="image/png")

    async def answer(self, request: web.Request, body: dict[str, Any], prefix: str) -> web.StreamResponse:
        if self.status != 200:
            error = {"message": f"upstream says {self.status}", "type": "invalid_request_error", "param": "size"}
            return web.json_response({"error": error}, status=self.status)
        if self.mode == "hang":
            await asyncio.sleep(30)
        n = int(body.get("n", 1))
        stream = body.get("stream") in (True, "true")
        if not stream:
            if self.mode == "url":
                data = [{"url": f"{self.url}/files/{i}"} for i in range(n)]
            else:
                data = [{"b64_json": b64(image_bytes(i))} for i in range(n)]
            answer: dict[str, Any] = {"created": 1, "data": data}
            if self.usage is not None:
                answer["usage"] = self.usage
            return web.json_response(answer)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        nl = "\r\n" if self.crlf else "\n"

        async def send(event: dict[str, Any]) -> None:
            if not self.with_index:
                event.pop("image_index", None)
            text = f"event: {event['type']}{nl}data: {json.dumps(event)}{nl}{nl}"
            await resp.write(text.encode())

        partials = int(body.get("partial_images", 0))
        await resp.write(f": keep-alive{nl}{nl}".encode())
        for i in range(n):
            for j in range(partials):
                await send(
                    {
                        "type": f"{prefix}.partial_image",
                        "b64_json": b64(partial_bytes(i, j)),
                        "partial_image_index": j,
                        "image_index": i,
                    }
                )
                if self.mode == "cut":
                    return resp  # the stream ends before any completed event
                if self.mode == "abort":
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if self.mode == "slow":
                    return await self.wait_for_disconnect(resp, nl)
            if self.mode == "error_event":
                error = {"message": "the model broke", "type": "server_error", "param": None, "code": None}
                await send({"type": "error", "error": error})
                return resp
            await send(
                {"type": f"{prefix}.completed", "b64_json": b64(image_bytes(i)), "image_index": i, "usage": USAGE}
            )
        await resp.write_eof()
        return resp

    async def wait_for_disconnect(self, resp: web.StreamResponse, nl: str) -> web.StreamResponse:
        """Keep the stream open until the client goes away (aiohttp cancels the handler, or the write fails)."""
        try:
            for _ in range(200):
                await asyncio.sleep(0.05)
                await resp.write(f": ping{nl}{nl}".encode())
        except (ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return resp


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    s = Stub()
    server = TestServer(s.app(), host="127.0.0.1")
    await server.start_server()
    s.url = str(server.make_url("")).rstrip("/")
    try:
        yield s
    finally:
        await server.close()


def config(stub: Stub, **kw: Any) -> UpstreamConfig:
    defaults: dict[str, Any] = {
        "name": "up",
        "base_url": f"{stub.url}/v1",
        "api_key_env": "UPSTREAM_KEY",
        "models": {"served": "up-model"},
        "timeout": 5.0,
    }
    return UpstreamConfig(**{**defaults, **kw})


@contextlib.asynccontextmanager
async def backend(stub: Stub, **kw: Any) -> AsyncIterator[UpstreamBackend]:
    b = UpstreamBackend(config(stub, **kw), environ={"UPSTREAM_KEY": KEY})
    try:
        yield b
    finally:
        await b.close()


def params(**kw: Any) -> GenerationParams:
    defaults: dict[str, Any] = {
        "model": "served",
        "prompt": "a red fox",
        "width": 256,
        "height": 128,
        "steps": 12,
        "guidance": 6.5,
        "seed": 42,
        "request_id": "img_1",
    }
    return GenerationParams(**{**defaults, **kw})


async def run(b: UpstreamBackend, p: GenerationParams, attachments: list[Any] | None = None) -> list[WorkerEvent]:
    return [e async for e in b.generate(p, attachments or [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- generations -------------------------------------------------------------------------------------------------


async def test_generation_maps_the_model_sends_the_key_and_yields_images(stub):
    async with backend(stub) as b:
        events = await run(b, params(n=2))
    assert [type(e) for e in events] == [Started, Image, Image, Done]
    assert events[0].prompt_tokens == 7
    assert [(e.index, protocol.image_bytes(e.data), e.seed) for e in events[1:3]] == [
        (0, image_bytes(0), 42),
        (1, image_bytes(1), 43),
    ]
    assert all(isinstance(e.data, protocol.Base64) for e in events[1:3]), "plain base64 is passed on as it came"
    (req,) = stub.requests
    assert req["path"] == "/v1/images/generations"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert req["json"] == {
        "model": "up-model",
        "prompt": "a red fox",
        "n": 2,
        "size": "256x128",
        "output_format": "png",
        "response_format": "b64_json",
    }


async def test_generation_with_extensions_sends_the_diffusion_fields(stub):
    async with backend(stub, extensions=True) as b:
        p = params(negative_prompt="blurry", scheduler="euler", output_format="webp", output_compression=80)
        await run(b, p)
    sent = stub.requests[0]["json"]
    assert sent["seed"] == 42 and sent["num_inference_steps"] == 12 and sent["guidance_scale"] == 6.5
    assert sent["negative_prompt"] == "blurry" and sent["scheduler"] == "euler"
    assert sent["output_format"] == "webp" and sent["output_compression"] == 80
    assert "strength" not in sent


async def test_gpt_image_models_get_no_response_format_and_no_key_without_api_key_env(stub):
    async with backend(stub, models={"served": "gpt-image-1"}, api_key_env="") as b:
        await run(b, params())
    req = stub.requests[0]
    assert req["json"]["model"] == "gpt-image-1" and "response_format" not in req["json"]
    assert "Authorization" not in req["headers"]


async def test_prompt_tokens_fall_back_to_input_tokens_then_zero(stub):
    stub.usage = {"input_tokens": 5}
    async with backend(stub) as b:
        assert (await run(b, params()))[0].prompt_tokens == 5
        stub.usage = None
        assert (await run(b, params()))[0].prompt_tokens == 0


IMG = bytes(range(256)) * 3 + b"x"  # 769 bytes: its base64 ends in "=="


@pytest.mark.parametrize(
    ("token", "passed_on"),
    [
        (b'"' + base64.b64encode(IMG) + b'"', True),  # what APIs send: kept as it came
        (b'"' + base64.b64encode(IMG).rstrip(b"=") + b'"', False),  # no padding: decoded leniently
        (b'"' + base64.encodebytes(IMG).replace(b"\n", b"\\n") + b'"', False),  # escaped line breaks
        (b'"' + base64.b64encode(IMG).replace(b"/", b"\\/") + b'"', False),  # escaped slashes
    ],
)
def test_an_image_token_is_passed_on_when_plain_and_decoded_otherwise(token, passed_on):
    # A string that reads "b64_json" and key spacing must not fool the scan.
    body = b'{"data": [{"revised_prompt": "b64_json", "b64_json" : ' + token + b'}], "note": "\\"b64_json\\": x"}'
    skeleton, images = _cut_images(body, 0, len(body))
    assert json.loads(skeleton) == {"data": [{"revised_prompt": "b64_json", "b64_json": "0"}], "note": '"b64_json": x'}
    (data,) = images
    assert isinstance(data, protocol.Base64) is passed_on
    assert protocol.image_bytes(data) == IMG
    if passed_on:
        assert data.json.obj is body, "a view into the answer, not a copy"
    assert _image(_decode_response(skeleton).data[0].b64_json, images) is data


@pytest.mark.parametrize("item", [b'{"url": "u"}', b'{"b64_json": null}', b'{"b64_json": 12}', b'{"b64_json": "AA"'])
def test_an_absent_non_string_or_broken_image_token(item):
    body = b'{"data": [' + item + b"]}"
    if item.endswith(b"12}") or item.endswith(b'"AA"'):
        with pytest.raises(MALFORMED):
            skeleton, images = _cut_images(body, 0, len(body))
            _image(_decode_response(skeleton).data[0].b64_json, images)
        return
    skeleton, images = _cut_images(body, 0, len(body))
    assert images == [] and _image(_decode_response(skeleton).data[0].b64_json, images) is None


async def test_url_answers_are_fetched(stub):
    stub.mode = "url"
    async with backend(stub) as b:
        events = await run(b, params(n=2))
    assert [protocol.image_bytes(e.data) for e in events if isinstance(e, Image)] == [image_bytes(0), image_bytes(1)]
    fetched = [r for r in stub.requests if r["path"].startswith("/files/")]
    assert sorted(r["path"] for r in fetched) == ["/files/0", "/files/1"]


def test_a_missing_key_variable_fails_at_construction(stub):
    with pytest.raises(ConfigError, match="UPSTREAM_KEY"):
        UpstreamBackend(config(stub), environ={})


# -- streams -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("with_index", "crlf"), [(True, False), (True, True), (False, True)])
async def test_a_stream_yields_partials_and_images_as_they_come(stub, with_index, crlf):
    stub.with_index, stub.crlf = with_index, crlf
    async with backend(stub) as b:
        events = await run(b, params(n=2, partial_images=2))
    assert stub.requests[0]["json"]["stream"] is True and stub.requests[0]["json"]["partial_images"] == 2
    assert isinstance(events[0], Started) and isinstance(events[-1], Done)
    body = [
        ("Partial", e.image_index, e.partial_index, protocol.image_bytes(e.data))
        if isinstance(e, Partial)
        else ("Image", e.index, e.seed, protocol.image_bytes(e.data))
        for e in events[1:-1]
    ]
    assert body == [
        ("Partial", 0, 0, partial_bytes(0, 0)),
        ("Partial", 0, 1, partial_bytes(0, 1)),
        ("Image", 0, 42, image_bytes(0)),
        ("Partial", 1, 0, partial_bytes(1, 0)),
        ("Partial", 1, 1, partial_bytes(1, 1)),
        ("Image", 1, 43, image_bytes(1)),
    ]
    for e in events[1:-1]:
        assert isinstance(e, RelayedPartial | RelayedImage)
        if not with_index:  # two images and no index in the events: the gateway's own events must tell them apart
            assert e.frame == b""
            continue
        # The frame the client gets: the upstream's own bytes (re-framed only where its line ends differ).
        head, data, end = e.frame.split(b"\n", 2)
        assert end == b"\n" and head == b"event: " + json.loads(data[6:])["type"].encode()
        assert isinstance(e.data, protocol.Base64) and (e.data.json.obj is e.frame) is not crlf


class _Chunks:
    """A response whose body arrives in the given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.content = self
        self.chunks = chunks

    async def readany(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


SSE = (
    b": keep-alive\n\n\r\n"
    b'event: a.partial_image\r\ndata: {"type": "a.partial_image"}\r\n\r\n'
    b'event: a.completed\ndata: {"type":\ndata: "a.completed"}\n\n'
    b"data: [DONE]\n\n"
    b"data: unterminated"
)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 40, len(SSE)])
async def test_sse_blocks_are_cut_alike_however_the_chunks_fall(size):
    b = UpstreamBackend(UpstreamConfig(name="up", base_url="http://127.0.0.1:9/v1", models={"m": "m"}))
    chunks = [SSE[i : i + size] for i in range(0, len(SSE), size)]
    got = []
    async for block, lines in b._blocks(_Chunks(chunks)):  # type: ignore[arg-type]
        buf, start, end = _data(block, lines)
        got.append((block, None if buf is None else bytes(buf[start:end])))
    assert got == [
        (b": keep-alive\n\n", None),
        (b'event: a.partial_image\r\ndata: {"type": "a.partial_image"}\r\n\r\n', b'{"type": "a.partial_image"}'),
        (b'event: a.completed\ndata: {"type":\ndata: "a.completed"}\n\n', b'{"type":\n"a.completed"}'),
        (b"data: [DONE]\n\n", b"[DONE]"),
    ]


async def test_an_error_event_is_a_failure(stub):
    stub.mode = "error_event"
    async with backend(stub) as b:
        events = await run(b, params(partial_images=1))
    assert isinstance(events[-1], Failed) and events[-1].kind == "internal"
    assert "the model broke" in events[-1].message and "up" in events[-1].message
    assert not any(isinstance(e, Done) for e in events)


@pytest.mark.parametrize("mode", ["cut", "abort"])
async def test_a_stream_that_ends_before_its_images_is_a_backend_failure(stub, mode):
    stub.mode = mode
    async with backend(stub) as b:
        got: list[WorkerEvent] = []
        with pytest.raises(BackendFailed, match="upstream up"):
            async for e in b.generate(params(partial_images=2)):
                got.append(e)
    assert [type(e) for e in got] == [Started, RelayedPartial]


async def test_closing_the_stream_early_closes_the_upstream_request(stub):
    stub.mode = "slow"
    async with backend(stub) as b:
        events = b.generate(params(partial_images=2))
        assert isinstance(await anext(events), Started)
        assert isinstance(await anext(events), Partial)
        assert not stub.disconnected.is_set()
        await events.aclose()
        await asyncio.wait_for(stub.disconnected.wait(), timeout=5)


# -- edits and variations ----------------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3 << 20)  # larger than one 1 MiB read
MASK = b"\x89PNG\r\n\x1a\n" + b"mask" * 100
JPEG = b"\xff\xd8\xff\xe0" + os.urandom(1000)


async def test_an_edit_streams_its_files_as_multipart(stub):
    with tempfile.TemporaryFile() as image:
        image.write(PNG)
        mask = io.BytesIO(MASK)
        mask.read()  # the backend reads attachments from the start, wherever they stand
        async with backend(stub, extensions=True) as b:
            p = params(task="inpaint", strength=1.0, request_id="edit_1", image_bytes=len(PNG), mask_bytes=len(MASK))
            events = await run(b, p, [image, mask])
        assert not image.closed and not mask.closed, "inputs stay open: a retry elsewhere reads them again"
    assert [type(e) for e in events] == [Started, Image, Done]
    req = stub.requests[0]
    assert req["path"] == "/v1/images/edits" and req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert req["files"]["image"] == (PNG, "image/png", "image.png")
    assert req["files"]["mask"] == (MASK, "image/png", "mask.png")
    fields = req["fields"]
    assert fields["model"] == "up-model" and fields["prompt"] == "a red fox" and fields["size"] == "256x128"
    assert fields["strength"] == "1.0" and fields["seed"] == "42" and "type" not in fields


async def test_an_edit_without_extensions_sends_openai_fields_only(stub):
    async with backend(stub) as b:
        p = params(task="img2img", strength=0.75, request_id="edit_2", image_bytes=len(JPEG))
        events = await run(b, p, [io.BytesIO(JPEG)])
    assert isinstance(events[1], Image)
    req = stub.requests[0]
    assert req["files"] == {"image": (JPEG, "image/jpeg", "image.jpg")}
    assert set(req["fields"]) == {"model", "prompt", "n", "size", "output_format", "response_format"}


async def test_a_streamed_edit_uses_the_edit_events(stub):
    async with backend(stub) as b:
        p = params(task="img2img", strength=0.5, request_id="edit_3", partial_images=1, image_bytes=len(JPEG))
        events = await run(b, p, [io.BytesIO(JPEG)])
    assert stub.requests[0]["fields"]["stream"] == "true"
    assert [type(e) for e in events] == [Started, RelayedPartial, RelayedImage, Done]


async def test_outpainting_needs_extensions(stub):
    p = params(task="outpaint", strength=1.0, request_id="edit_4", image_bytes=len(JPEG))
    async with backend(stub) as b:
        (failed,) = await run(b, p, [io.BytesIO(JPEG)])
    assert isinstance(failed, Failed) and failed.kind == "invalid_request" and "outpaint" in failed.message
    assert stub.requests == []
    async with backend(stub, extensions=True) as b:
        events = await run(b, p, [io.BytesIO(JPEG)])
    assert isinstance(events[1], Image) and stub.requests[0]["fields"]["type"] == "outpainting"


async def test_a_variation_posts_to_variations(stub):
    async with backend(stub, extensions=True) as b:
        p = params(prompt="", task="img2img", strength=0.6, request_id="var_1", image_bytes=len(PNG))
        events = await run(b, p, [io.BytesIO(PNG)])
    assert [type(e) for e in events] == [Started, Image, Done]
    req = stub.requests[0]
    assert req["path"] == "/v1/images/variations" and req["files"]["image"][0] == PNG
    assert req["fields"] == {
        "model": "up-model",
        "n": "1",
        "size": "256x128",
        "response_format": "b64_json",
        "seed": "42",
        "output_format": "png",
    }


# -- failures ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_a_refused_request_is_the_clients_error(stub, status):
    stub.status = status
    async with backend(stub) as b:
        events = await run(b, params())
    assert events == [Failed(message=f"upstream says {status}", kind="invalid_request", param="size")]


@pytest.mark.parametrize("status", [401, 403, 429, 500, 503])
async def test_upstream_trouble_is_a_backend_failure(stub, status):
    stub.status = status
    async with backend(stub) as b:
        with pytest.raises(BackendFailed, match=f"upstream up answered {status}") as e:
            await run(b, params())
    assert e.value.status == 502  # in particular, never the upstream's 401


async def test_an_unreachable_upstream_is_a_backend_failure():
    cfg = UpstreamConfig(name="gone", base_url=f"http://127.0.0.1:{free_port()}/v1", models={"served": "m"})
    b = UpstreamBackend(cfg)
    try:
        with pytest.raises(BackendFailed, match="upstream gone is unreachable"):
            await run(b, params())
        with pytest.raises(BackendFailed, match="upstream gone is unreachable"):
            await b.health()
    finally:
        await b.close()


async def test_a_silent_upstream_times_out(stub):
    stub.mode = "hang"
    async with backend(stub, timeout=0.3) as b:
        with pytest.raises(BackendFailed, match="upstream up"):
            await asyncio.wait_for(run(b, params()), timeout=5)


# -- health ------------------------------------------------------------------------------------------------------


async def test_health_lists_models_and_tasks(stub):
    async with backend(stub, models={"served": "up-model", "other": "x"}) as b:
        info = await b.health()
    assert info.status == "ready" and info.device == "upstream" and info.models == ["served", "other"]
    assert info.tasks == {"served": ["text2img", "img2img", "inpaint"], "other": ["text2img", "img2img", "inpaint"]}
    (req,) = stub.requests
    assert req["path"] == "/v1/models" and req["headers"]["Authorization"] == f"Bearer {KEY}"
    async with backend(stub, extensions=True) as b:
        info = await b.health()
    assert info.tasks["served"] == ["text2img", "img2img", "inpaint", "outpaint", "background_removal"]


async def test_health_counts_a_missing_models_route_as_reachable(stub):
    stub.models_status = 404
    async with backend(stub) as b:
        assert (await b.health()).status == "ready"


@pytest.mark.parametrize("status", [401, 500])
async def test_health_fails_on_a_bad_key_or_a_server_error(stub, status):
    stub.models_status = status
    async with backend(stub) as b:
        with pytest.raises(BackendFailed, match=f"health check answered {status}"):
            await b.health()
