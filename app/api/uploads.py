"""Reading edit and variation requests: multipart (the SDKs' form) or JSON (OpenAI's newer edit form).

Multipart bodies are parsed as they stream in, by the push parser Litestar itself uses (``multipart``), so that
every part has its own limit: an image part goes to a temporary file (on disk past 1 MiB) and is refused as soon as
it passes ``max_image_bytes``; a text field is held in memory up to :data:`MAX_FIELD_BYTES`; parts the request
does not know are skipped unread. An image part is an image whether or not it has a filename (``curl -F image=<f``
sends none), since images are checked from their bytes anyway. Text fields are decoded by their charset (UTF-8 when
none is named) and coerced with the same rules as JSON. Files may come as ``image``, repeated ``image`` or
``image[]`` (what the SDKs send for a list, even of one). Every temporary file is closed on every path out.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import msgspec
from litestar import Request
from litestar.exceptions import InternalServerException
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser

from app.api.errors import invalid_value
from app.config import Settings
from app.errors import Cancelled, InvalidRequest, PayloadTooLarge
from app.protocol.images import ImageEditJsonRequest, ImageEditRequest, ImageVariationRequest
from app.services.inputs import InputImage, checked, from_refs, new_spool

S = TypeVar("S", bound=msgspec.Struct)

MAX_PARTS = 200
"""Parts one multipart body may have: every field once, ``max_images`` images and room for repeated lists."""
MAX_FIELD_BYTES = 256 * 1024
"""Largest text field: a 32,000-character prompt is at most 128 KB of UTF-8."""

_IMAGE_FIELDS = ("image", "image[]")
_MASK_FIELDS = ("mask", "mask[]")
_LIST_FIELDS = ("fallbacks", "webhook_events")
_JSON_FIELDS = ("loras",)


@dataclass
class Upload:
    fields: Any
    images: list[InputImage]
    mask: InputImage | None = None

    def close(self) -> None:
        for i in [*self.images, *([self.mask] if self.mask else [])]:
            i.close()


def _convert(data: Any, cls: type[S]) -> S:
    try:
        return msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as e:
        raise invalid_value(str(e), None) from None


@dataclass
class _Part:
    """The part being received: its field name and where its bytes go."""

    name: str
    filename: str | None = None
    charset: str | None = None
    file: BinaryIO | None = None
    text: bytearray | None = None
    size: int = 0


@dataclass
class _Form:
    """The parts of a multipart body that the request reads, as they arrive."""

    files: dict[str, tuple[str, ...]]
    """Parameter name -> the part names that carry its files."""
    text_fields: frozenset[str]
    settings: Settings
    uploads: dict[str, list[BinaryIO]] = field(default_factory=dict)
    text: dict[str, list[str]] = field(default_factory=dict)

    def param_of(self, name: str) -> str | None:
        return next((param for param, names in self.files.items() if name in names), None)

    def start(self, segment: MultipartSegment) -> _Part | None:
        """Where the part that ``segment`` heads goes; None for a part the request does not read."""
        name = segment.name or ""
        if self.param_of(name) is not None:
            return _Part(name, filename=segment.filename, file=new_spool())
        if name.removesuffix("[]") in self.text_fields:
            return _Part(name, charset=segment.charset, text=bytearray())
        return None

    def write(self, part: _Part, data: bytes) -> None:
        part.size += len(data)
        if part.file is not None:
            param = self.param_of(part.name)
            if part.size > self.settings.max_image_bytes:
                part.file.close()
                raise InvalidRequest(
                    f"The {param} is over {self.settings.max_image_bytes} bytes, the limit.",
                    param=param,
                    code="image_too_large",
                )
            part.file.write(data)
        elif part.text is not None:
            if part.size > MAX_FIELD_BYTES:
                raise InvalidRequest(f"The '{part.name}' field is over {MAX_FIELD_BYTES} bytes.", param=part.name)
            part.text += data

    def finish(self, part: _Part) -> None:
        if part.file is not None:
            if not part.size and not part.filename:  # a browser form's empty file input: nothing was chosen
                part.file.close()
                return
            part.file.seek(0)
            self.uploads.setdefault(self.param_of(part.name) or part.name, []).append(part.file)
        elif part.text:
            self.text.setdefault(part.name.removesuffix("[]"), []).append(_decode(part))

    def close(self) -> None:
        for files in self.uploads.values():
            for f in files:
                with contextlib.suppress(Exception):
                    f.close()


def _decode(part: _Part) -> str:
    charset = part.charset or "utf-8"
    try:
        return bytes(part.text or b"").decode(charset)
    except LookupError:  # no such codec, or not a text encoding (hex, rot13, ...)
        raise InvalidRequest(
            f"The '{part.name}' field's charset {charset!r} is not a text encoding; send UTF-8.", param=part.name
        ) from None
    except (UnicodeError, ValueError):
        raise InvalidRequest(f"The '{part.name}' field is not valid {charset} text.", param=part.name) from None


async def _read_form(request: Request, form: _Form) -> None:
    """Stream the body into ``form``; on any failure close what it holds and raise an API error."""
    boundary = request.content_type[1].get("boundary")
    if not boundary:
        raise InvalidRequest("A multipart/form-data body needs a boundary in its Content-Type header.")
    part: _Part | None = None
    try:
        with PushMultipartParser(boundary.encode(), max_segment_count=MAX_PARTS) as parser:
            async for chunk in request.stream():
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        part = form.start(event)
                    elif event:
                        if part is not None:
                            form.write(part, event)
                    elif part is not None:
                        form.finish(part)
                        part = None
    except BaseException as e:
        if part is not None and part.file is not None:
            part.file.close()
        form.close()
        if isinstance(e, ParserLimitReached):
            raise InvalidRequest(f"A multipart body may have at most {MAX_PARTS} parts of short headers.") from None
        if isinstance(e, ParserError):
            raise InvalidRequest(f"The multipart/form-data body is malformed: {e}") from None
        if isinstance(e, InternalServerException):  # Litestar's word for a client gone mid-body
            raise Cancelled("The client went away before the body ended.") from None
        raise


async def _multipart(request: Request, settings: Settings, cls: type[S], *, with_mask: bool = True) -> Upload:
    files = {"image": _IMAGE_FIELDS, **({"mask": _MASK_FIELDS} if with_mask else {})}
    form = _Form(files, frozenset(f.name for f in msgspec.structs.fields(cls)), settings)
    await _read_form(request, form)
    try:
        images, masks = form.uploads.get("image", []), form.uploads.get("mask", [])
        if len(images) > settings.max_images:
            raise InvalidRequest(f"At most {settings.max_images} images may be sent.", param="image")
        if len(masks) > 1:
            raise InvalidRequest("Send at most one mask.", param="mask")
        values: dict[str, Any] = {}
        for name, items in form.text.items():
            if name in _LIST_FIELDS:  # repeated parts (`fallbacks` or `fallbacks[]`) make a list
                values[name] = items
            elif name in _JSON_FIELDS and len(items) == 1:  # a list of objects travels as one JSON text part
                try:
                    values[name] = json.loads(items[0])
                except ValueError:
                    raise InvalidRequest(f"The '{name}' field must be a JSON array.", param=name) from None
            elif len(items) > 1:
                raise InvalidRequest(f"The '{name}' field was sent {len(items)} times; send it once.", param=name)
            else:
                values[name] = items[0]
        fields = _convert(values, cls)
        checked_images = [await checked(f, settings, "image") for f in images]
        mask = await checked(masks[0], settings, "mask") if masks else None
    except BaseException:
        form.close()  # the checked images' files too: they are the same files
        raise
    return Upload(fields, checked_images, mask)


def json_edit_limit(settings: Settings) -> int:
    """A JSON edit is held in memory: room for one image and one mask as base64 data URLs, and the fields."""
    return settings.max_image_bytes * 2 * 4 // 3 + 1_000_000


async def _read_capped(request: Request, limit: int) -> bytes:
    if int(request.headers.get("content-length") or 0) > limit:
        raise PayloadTooLarge(f"A JSON edit may be at most {limit} bytes; send large images as multipart.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"A JSON edit may be at most {limit} bytes; send large images as multipart.")
    return bytes(body)


async def _json(request: Request, settings: Settings) -> Upload:
    try:
        req = msgspec.json.decode(await _read_capped(request, json_edit_limit(settings)), type=ImageEditJsonRequest)
    except msgspec.ValidationError as e:
        raise invalid_value(str(e), None) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {e}") from None
    if len(req.images) > settings.max_images:
        raise InvalidRequest(f"At most {settings.max_images} images may be sent.", param="images")
    images, mask = await from_refs(req.images, req.mask, settings)
    return Upload(req, images, mask)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_edit(request: Request, settings: Settings) -> Upload:
    """The fields, checked images and mask of an edit, in either form."""
    media = _media_type(request)
    if media == "multipart/form-data":
        return await _multipart(request, settings, ImageEditRequest)
    if media == "application/json":
        return await _json(request, settings)
    raise InvalidRequest("Send edits as multipart/form-data (or JSON with image URLs).")


async def read_variation(request: Request, settings: Settings) -> Upload:
    if _media_type(request) != "multipart/form-data":
        raise InvalidRequest("Send variations as multipart/form-data with an 'image' file.")
    return await _multipart(request, settings, ImageVariationRequest, with_mask=False)
