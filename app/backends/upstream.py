"""UpstreamBackend: serves models by proxying to a server speaking the OpenAI Images API.

The upstream may be another imagegate (``extensions = true`` also sends seed, steps, guidance, scheduler, negative
prompt and strength) or a vendor. Generations are ``POST /images/generations`` (JSON); edits ``POST /images/edits``
and variations ``POST /images/variations`` (multipart, the input files streamed from disk). A request with partial
images streams: the upstream's SSE events become :class:`~app.worker.protocol.Partial` and
:class:`~app.worker.protocol.Image` events as they arrive.

Failures follow the gateway's split: an upstream that says the client's request is bad (400, 404, 422) yields
``Failed(kind="invalid_request")``, which the client sees as a 400; an upstream that cannot be reached, times out,
refuses our key, is rate limited, fails (5xx) or breaks off a stream raises :class:`~app.errors.BackendFailed`,
which may be retried elsewhere and counts toward the backend's cooldown.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import aiohttp
import msgspec

from app.config import ConfigError, UpstreamConfig
from app.errors import BackendFailed
from app.worker.protocol import (
    TASKS,
    Base64,
    Done,
    Failed,
    GenerationParams,
    HealthInfo,
    Image,
    RelayedImage,
    RelayedPartial,
    Started,
    WorkerEvent,
)

INVALID_STATUSES = frozenset({400, 404, 422})
"""Upstream answers that mean the client's request is bad: shown to the client, never retried."""

BASIC_TASKS = ("text2img", "img2img", "inpaint")
"""What the OpenAI Images API can do; outpainting and background removal need imagegate's extensions."""

HEALTH_TIMEOUT = 10.0
CHUNK = 1 << 20
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EDIT_TYPES = {"outpaint": "outpainting", "background_removal": "background_removal"}


# -- the upstream's wire types (only the fields used; unknown ones are ignored) ------------------------------------


class _Details(msgspec.Struct):
    text_tokens: int | None = None


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    input_tokens_details: _Details | None = None

    def prompt_tokens(self) -> int:
        if self.input_tokens_details is not None and self.input_tokens_details.text_tokens is not None:
            return self.input_tokens_details.text_tokens
        return self.input_tokens or 0


class _Error(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _ErrorResponse(msgspec.Struct):
    error: _Error | str | None = None


class _Item(msgspec.Struct):
    b64_json: msgspec.Raw = msgspec.Raw()
    """The JSON token as it came (see :func:`_image`)."""
    url: str | None = None


class _Response(msgspec.Struct):
    data: list[_Item] = []
    usage: _Usage | None = None


class _Event(msgspec.Struct):
    type: str = ""
    b64_json: msgspec.Raw = msgspec.Raw()
    partial_image_index: int = 0
    image_index: int | None = None
    usage: _Usage | None = None
    error: _Error | str | None = None


_decode_response = msgspec.json.Decoder(_Response).decode
_decode_event = msgspec.json.Decoder(_Event).decode
_decode_error = msgspec.json.Decoder(_ErrorResponse).decode
_encode = msgspec.json.Encoder().encode

MALFORMED = (msgspec.DecodeError, msgspec.ValidationError, binascii.Error, ValueError)


_KEY = b'"b64_json"'
_END = object()
"""An SSE stream's ``[DONE]``."""
_SPACE = b" \t\r\n"


def _cut_images(buf: bytes, start: int, end: int) -> tuple[bytes, list[bytes | Base64]]:
    """The JSON in ``buf[start:end]`` with each ``b64_json`` string replaced by its ordinal, and those images.

    Each string becomes ``"0"``, ``"1"``, … (see :func:`_image`). The images are found by scanning at memchr speed,
    not by a JSON decoder walking megabytes: plain padded base64, what APIs send, stays a view into ``buf``
    (:class:`Base64`), so a relayed image is neither copied, decoded nor encoded again; anything else (escapes, no
    padding) is decoded leniently. Raises one of :data:`MALFORMED`.
    """
    pieces: list[bytes | memoryview] = []
    images: list[bytes | Base64] = []
    view = memoryview(buf)
    pos = scan = start  # copied up to, looked up to
    while (key := buf.find(_KEY, scan, end)) >= 0:
        at = key + len(_KEY)
        while at < end and buf[at] in _SPACE:
            at += 1
        if at >= end or buf[at] != 0x3A:  # not a key: a string that happens to read "b64_json"
            scan = at
            continue
        at += 1
        while at < end and buf[at] in _SPACE:
            at += 1
        if at >= end or buf[at] != 0x22:  # null, or not a string: the decoder sees it as it is
            scan = at
            continue
        close = buf.find(b'"', at + 1, end)
        if close < 0:
            raise ValueError("b64_json is an unterminated string")
        token = view[at : close + 1]
        if (close - at - 1) % 4 == 0 and buf.find(b"\\", at, close) < 0:
            images.append(Base64(token))
        else:
            value = msgspec.json.decode(token)
            value = "".join(value.split())
            images.append(binascii.a2b_base64(value + "=" * (-len(value) % 4)))
        pieces += (view[pos:at], b'"%d"' % (len(images) - 1))
        pos = scan = close + 1
    if not images:
        return bytes(view[start:end]), images
    pieces.append(view[pos:end])
    return b"".join(pieces), images


def _image(token: msgspec.Raw, images: list[bytes | Base64]) -> bytes | Base64 | None:
    """The image a ``b64_json`` field names after :func:`_cut_images`: None if absent or null."""
    view = memoryview(token)
    if not view or view == b"null":
        return None
    if view[0] != 0x22:
        raise ValueError("b64_json is not a string")
    return images[int(bytes(view[1:-1]))]


def _error_of(body: bytes) -> _Error:
    """The upstream's ``{"error": {...}}``, or its text as the message."""
    try:
        err = _decode_error(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        err = None
    if isinstance(err, _Error) and err.message:
        return err
    if isinstance(err, str) and err:
        return _Error(message=err)
    return _Error(message=body[:500].decode("utf-8", "replace").strip() or None)


def _sniff(head: bytes) -> str:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return "png"


def _describe(files: Sequence[BinaryIO]) -> list[tuple[int, str]]:
    """(size, format) of each attachment; blocking."""
    out = []
    for f in files:
        f.seek(0)
        fmt = _sniff(f.read(16))
        f.seek(0, os.SEEK_END)
        out.append((f.tell(), fmt))
    return out


def _field_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Multipart:
    """A multipart/form-data body of text fields and files, streamed: each file is read in 1 MiB chunks.

    Built by hand rather than with aiohttp's FormData because aiohttp closes file payloads once sent, and an
    attachment must stay open for a retry on another backend. The length is known up front: no chunked encoding.
    """

    def __init__(self, fields: Mapping[str, Any], files: Sequence[tuple[str, BinaryIO, int, str]]) -> None:
        self.boundary = uuid.uuid4().hex
        dash = b"--" + self.boundary.encode()
        head = bytearray()
        for name, value in fields.items():
            head += dash + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
            head += _field_value(value).encode() + b"\r\n"
        self._head = bytes(head)
        self._files: list[tuple[bytes, BinaryIO, int]] = []
        for name, f, size, fmt in files:
            filename = f"{name}.{'jpg' if fmt == 'jpeg' else fmt}"
            part = f'\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            part += f"Content-Type: {_MIME[fmt]}\r\n\r\n"
            self._files.append((dash + part.encode(), f, size))
        self._tail = dash + b"--\r\n"
        self.length = len(self._head) + sum(len(h) + size + 2 for h, _, size in self._files) + len(self._tail)
        self.content_type = f"multipart/form-data; boundary={self.boundary}"

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._head
        for head, f, size in self._files:
            yield head
            left = size
            await asyncio.to_thread(f.seek, 0)
            while left > 0:
                chunk = await asyncio.to_thread(f.read, min(CHUNK, left))
                if not chunk:
                    raise OSError("an input file is shorter than it was")
                left -= len(chunk)
                yield chunk
            yield b"\r\n"
        yield self._tail


class UpstreamBackend:
    """Runs jobs on an OpenAI-compatible Images API; one connection pool per upstream."""

    def __init__(self, config: UpstreamConfig, environ: Mapping[str, str] | None = None) -> None:
        self.name = config.name
        self.config = config
        self._base = config.base_url.rstrip("/")
        self._origin = urlsplit(self._base)[:2]
        self._auth: dict[str, str] = {}
        if config.api_key_env:
            key = (os.environ if environ is None else environ).get(config.api_key_env, "")
            if not key:
                raise ConfigError(
                    f"upstream {config.name!r}: the environment variable {config.api_key_env} (api_key_env) is not set"
                )
            self._auth = {"authorization": f"Bearer {key}"}
        self._json_headers = {**self._auth, "content-type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=config.timeout, sock_connect=config.timeout, sock_read=config.timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout)
        return self._session

    # -- requests -------------------------------------------------------------------------------------------------

    def _fields(self, params: GenerationParams, model: str) -> dict[str, Any]:
        """The fields of a generation or an edit."""
        fields: dict[str, Any] = {"model": model, "n": params.n}
        if params.prompt:
            fields["prompt"] = params.prompt
        if params.task != "background_removal":  # it keeps the image's size, which need not be on the size grid
            fields["size"] = f"{params.width}x{params.height}"
        if not (params.output_format == "png" and model.startswith("dall-e")):  # GPT-image only; png is the default
            fields["output_format"] = params.output_format
        if params.output_compression is not None:
            fields["output_compression"] = params.output_compression
        if not model.startswith("gpt-image"):  # GPT image models always answer b64 and refuse the field
            fields["response_format"] = "b64_json"
        if params.partial_images > 0:
            fields["stream"] = True
            fields["partial_images"] = params.partial_images
        if self.config.extensions:
            fields["seed"] = params.seed
            fields["num_inference_steps"] = params.steps
            fields["guidance_scale"] = params.guidance
            if params.negative_prompt:
                fields["negative_prompt"] = params.negative_prompt
            if params.scheduler:
                fields["scheduler"] = params.scheduler
            if params.clip_skip:
                fields["clip_skip"] = params.clip_skip + 1  # the API counts as AUTOMATIC1111 does
            if params.task != "text2img" and params.strength is not None:
                fields["strength"] = params.strength
        return fields

    def _variation_fields(self, params: GenerationParams, model: str) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": model, "n": params.n, "size": f"{params.width}x{params.height}"}
        if not model.startswith("gpt-image"):
            fields["response_format"] = "b64_json"
        if self.config.extensions:
            fields["seed"] = params.seed
            fields["output_format"] = params.output_format
        return fields

    async def _send(self, params: GenerationParams, attachments: Sequence[BinaryIO]) -> aiohttp.ClientResponse | Failed:
        """Send the job's request; a Failed when the upstream cannot run it at all."""
        model = self.config.models.get(params.model, params.model)
        if params.task == "text2img":
            body = _encode(self._fields(params, model))
            return await self._client().post(f"{self._base}/images/generations", data=body, headers=self._json_headers)
        if params.task in _EDIT_TYPES and not self.config.extensions:
            return Failed(
                message=f"The model '{params.model}' is served by an upstream that cannot do "
                f"{params.task.replace('_', ' ')}.",
                kind="invalid_request",
                param="type",
            )
        if not attachments:
            return Failed(message="An input image is required.", kind="invalid_request", param="image")
        described = await asyncio.to_thread(_describe, attachments[:2])
        files = [("image", attachments[0], *described[0])]
        if params.task == "img2img" and not params.prompt:  # a variation (request_id var_...)
            fields = self._variation_fields(params, model)
            path = "variations"
        else:
            fields = self._fields(params, model)
            if params.task in _EDIT_TYPES:
                fields["type"] = _EDIT_TYPES[params.task]
            if len(attachments) > 1:
                files.append(("mask", attachments[1], *described[1]))
            path = "edits"
        form = _Multipart(fields, files)
        headers = {**self._auth, "content-type": form.content_type, "content-length": str(form.length)}
        return await self._client().post(f"{self._base}/images/{path}", data=form.chunks(), headers=headers)

    async def generate(
        self, params: GenerationParams, attachments: Sequence[BinaryIO] = ()
    ) -> AsyncIterator[WorkerEvent]:
        if params.loras:  # the adapters are this gateway's files; an upstream knows none of them
            yield Failed(f"upstream {self.name} cannot apply this gateway's LoRA adapters", "invalid_request", "loras")
            return
        t0 = time.monotonic()
        try:
            resp = await self._send(params, attachments)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendFailed(f"upstream {self.name} is unreachable: {_what(e)}") from None
        if isinstance(resp, Failed):
            yield resp
            return
        finished = False
        try:
            if resp.status != 200:
                err = _error_of(await self._read(resp))
                if resp.status not in INVALID_STATUSES:
                    detail = f": {err.message}" if err.message else ""
                    raise BackendFailed(f"upstream {self.name} answered {resp.status}{detail}")
                finished = True
                message = err.message or f"The upstream {self.name} refused the request ({resp.status})."
                yield Failed(message=message, kind="invalid_request", param=err.param)
                return
            if resp.content_type != "text/event-stream":
                for event in await self._answer(params, resp):
                    yield event
            else:
                async with contextlib.aclosing(self._blocks(resp)) as blocks:  # the events inline: no hop of their own
                    started, done = False, set[int]()
                    async for block, lines in blocks:
                        event, prompt_tokens = self._event(params, block, lines, done)
                        if event is None:
                            continue
                        if event is _END:
                            break
                        if isinstance(event, Failed):
                            finished = True
                            yield event
                            return
                        if not started:
                            started = True
                            yield Started(queue_seconds=0.0, prompt_tokens=prompt_tokens)
                        yield event
                        if len(done) >= params.n:
                            break
                if len(done) < params.n:
                    raise BackendFailed(f"upstream {self.name} ended the stream after {len(done)} of {params.n} images")
            finished = True
            yield Done(seconds=time.monotonic() - t0)
        finally:
            if finished:
                resp.release()  # back to the pool if the answer was read to its end, else closed
            else:
                resp.close()  # the client went away or the stream broke: drop the connection, the upstream stops

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendFailed(f"upstream {self.name} broke off its answer: {_what(e)}") from None

    async def _answer(self, params: GenerationParams, resp: aiohttp.ClientResponse) -> list[WorkerEvent]:
        """One JSON answer: Started, then an Image per item."""
        body = await self._read(resp)
        try:
            skeleton, found = _cut_images(body, 0, len(body))
            answer = _decode_response(skeleton)
            images = [_image(item.b64_json, found) for item in answer.data]
        except MALFORMED as e:
            raise BackendFailed(f"upstream {self.name} sent a malformed answer: {e}") from None
        if not answer.data:
            raise BackendFailed(f"upstream {self.name} answered without images")
        missing = [i for i, data in enumerate(images) if data is None]
        if missing:
            fetched = await asyncio.gather(*(self._fetch(answer.data[i].url) for i in missing))
            for i, data in zip(missing, fetched, strict=True):
                images[i] = data
        started = Started(queue_seconds=0.0, prompt_tokens=answer.usage.prompt_tokens() if answer.usage else 0)
        return [started, *(Image(index=i, data=data, seed=params.seed + i) for i, data in enumerate(images))]  # type: ignore[arg-type]

    async def _fetch(self, url: str | None) -> bytes:
        if not url:
            raise BackendFailed(f"upstream {self.name} answered an image with neither b64_json nor url")
        same_origin = urlsplit(url)[:2] == self._origin  # the key goes nowhere but to the upstream itself
        try:
            async with self._client().get(url, headers=self._auth if same_origin else None) as r:
                if r.status != 200:
                    raise BackendFailed(f"upstream {self.name}: fetching an image URL answered {r.status}")
                return await r.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendFailed(f"upstream {self.name}: fetching an image URL failed: {_what(e)}") from None

    def _event(
        self, params: GenerationParams, block: bytes, lines: list[int], done: set[int]
    ) -> tuple[WorkerEvent | object | None, int]:
        """One SSE event of the upstream's stream: (the worker event, the prompt's tokens if it says).

        None for an event to skip, :data:`_END` for ``[DONE]``; a completed image's index is added to ``done``. An
        image event keeps its frame (:class:`RelayedPartial`, :class:`RelayedImage`) for the client's stream.
        """
        buf, start, end = _data(block, lines)
        if buf is None:
            return None, 0
        if end - start == 6 and buf.startswith(b"[DONE]", start):  # not a slice: that would copy a whole image
            return _END, 0
        try:
            skeleton, found = _cut_images(buf, start, end)
            event = _decode_event(skeleton)
            image = _image(event.b64_json, found)
        except MALFORMED as e:
            raise BackendFailed(f"upstream {self.name} sent a malformed event: {e}") from None
        if event.error or event.type == "error":
            err = event.error if isinstance(event.error, _Error) else _Error(message=event.error or None)
            invalid = err.type == "invalid_request_error"
            failed = Failed(
                message=(err.message or "the upstream's stream failed")
                if invalid
                else f"upstream {self.name}: {err.message or 'the stream failed'}",
                kind="invalid_request" if invalid else "internal",
                param=err.param if invalid else None,
            )
            return failed, 0
        partial = event.type.endswith(".partial_image")
        if not (partial or event.type.endswith(".completed")):
            return None, 0
        if image is None:
            raise BackendFailed(f"upstream {self.name} sent a {event.type} event without b64_json")
        # OpenAI's events carry no image index: images then come one after the other.
        index = event.image_index if event.image_index is not None else len(done)
        # Passed on as it came only where the gateway would send the same: plain base64, and the image's index in
        # the event (or no other image to tell it from).
        relayed = isinstance(image, Base64) and (event.image_index is not None or params.n == 1)
        frame = _frame(block, buf, start, end, event.type) if relayed else b""
        tokens = event.usage.prompt_tokens() if event.usage else 0
        if partial:
            return RelayedPartial(index, event.partial_image_index, image, frame=frame), tokens  # type: ignore[arg-type]
        done.add(index)
        return RelayedImage(index, image, params.seed + index, frame=frame), tokens  # type: ignore[arg-type]

    async def _blocks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[bytes, list[int]]]:
        """The SSE stream's events as they came, each with its blank line, and the offset of each newline in it.

        A block is a chunk as it came, else one copy of its pieces; only newlines are looked for.
        """
        parts: list[memoryview] = []
        size = 0  # bytes of the current block in parts
        lines: list[int] = []
        line_start = 0  # the current line's offset in the block
        while True:
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                raise BackendFailed(f"upstream {self.name} broke off the stream: {_what(e)}") from None
            if not chunk:
                return  # an unterminated last event is dropped, as the SSE format has it
            view = memoryview(chunk)
            begin = pos = 0  # the block's start in this chunk, the scan's
            while (nl := chunk.find(b"\n", pos)) >= 0:
                at = size + nl - begin
                length = at - line_start
                before = chunk[nl - 1] if nl > begin else (parts[-1][-1] if parts else 0)
                lines.append(at)
                line_start, pos = at + 1, nl + 1
                if length == 0 or (length == 1 and before == 0x0D):  # a blank line ends the event
                    if begin == 0 and pos == len(chunk) and not parts:
                        block = chunk
                    else:
                        parts.append(view[begin:pos])
                        block = b"".join(parts)
                    if len(lines) > 1:
                        yield block, lines
                    parts, size, lines, line_start, begin = [], 0, [], 0, pos
            if begin < len(chunk):
                parts.append(view[begin:])
                size += len(chunk) - begin

    # -- health ---------------------------------------------------------------------------------------------------

    async def health(self) -> HealthInfo:
        """``GET /models``: a reachable upstream that accepts our key is ready (a 404 too: some vendors lack it)."""
        try:
            async with self._client().get(
                f"{self._base}/models",
                headers=self._auth,
                timeout=aiohttp.ClientTimeout(total=min(self.config.timeout, HEALTH_TIMEOUT)),
            ) as resp:
                if not (200 <= resp.status < 300 or resp.status == 404):
                    message = _error_of(await resp.read()).message
                    detail = f": {message}" if message else ""
                    raise BackendFailed(f"upstream {self.name} health check answered {resp.status}{detail}")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendFailed(f"upstream {self.name} is unreachable: {_what(e)}") from None
        tasks = list(TASKS if self.config.extensions else BASIC_TASKS)
        return HealthInfo(
            status="ready",
            device="upstream",
            models=list(self.config.models),
            tasks={model: tasks for model in self.config.models},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _data(block: bytes, lines: list[int]) -> tuple[bytes | None, int, int]:
    """(buffer, start, end) of an SSE event's ``data``; (None, 0, 0) for an event without (a comment, a keep-alive).

    The buffer is ``block`` itself for one ``data:`` line, else the lines joined by newlines.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for nl in lines[:-1]:  # the last one ends the blank line
        end = nl - 1 if nl > start and block[nl - 1] == 0x0D else nl
        if block.startswith(b"data:", start):
            at = start + 6 if block[start + 5 : start + 6] == b" " else start + 5
            spans.append((at, end))
        start = nl + 1
    if not spans:
        return None, 0, 0
    if len(spans) == 1:
        return block, *spans[0]
    joined = b"\n".join(block[a:b] for a, b in spans)
    return joined, 0, len(joined)


def _frame(block: bytes, buf: bytes, start: int, end: int, event_type: str) -> bytes:
    """The event's SSE frame as the gateway sends it: ``block`` itself when it is one already."""
    head = b"event: %b\ndata: " % event_type.encode()
    if buf is block and end == len(block) - 2 and block.startswith(head) and start == len(head):
        return block
    return b"".join((head, memoryview(buf)[start:end], b"\n\n"))


def _what(e: BaseException) -> str:
    return str(e) or type(e).__name__
