"""Input images of edits and variations: checked from their bytes, kept in temporary files, never trusted.

An upload is accepted when its bytes are a PNG, JPEG or WebP (whatever its name or content type says), it is within
the byte and pixel limits (the pixel count is read from the header, before anything is decoded), and it is whole:
a PNG's chunks all pass their CRC up to IEND, a JPEG decodes at 1/8 scale, a WebP's container is complete. None of
this holds the full-size pixels in the gateway; the worker decodes them. Width and height are reported as displayed,
after the EXIF orientation.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

import aiohttp
from PIL import Image, UnidentifiedImageError

from app.config import Settings
from app.errors import InvalidRequest
from app.protocol.images import ImageRef

SPOOL_BYTES = 1 << 20
"""Inputs larger than this live on disk, not in the gateway's memory."""

_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_CHUNK = 1 << 16


def sniff(head: bytes) -> str | None:
    """The image format from its first bytes: png, jpeg, webp, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass(eq=False)
class InputImage:
    """A checked input image in a file of its own; the file is the one the upload arrived in, or a spooled copy."""

    file: BinaryIO
    size: int
    format: str
    width: int
    height: int

    def read_all(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()


def inspect(file: BinaryIO, settings: Settings, param: str) -> InputImage:
    """Check an image file against the limits; blocking (run it in a thread).

    Raises:
        InvalidRequest: not an image of an accepted format, too large, too many pixels, corrupt or truncated.
    """
    file.seek(0, 2)
    size = file.tell()
    file.seek(0)
    if size > settings.max_image_bytes:
        raise InvalidRequest(
            f"The {param} is {size} bytes; the limit is {settings.max_image_bytes}.",
            param=param,
            code="image_too_large",
        )
    fmt = sniff(file.read(16))
    file.seek(0)
    if fmt is None:
        raise InvalidRequest(f"The {param} is not a PNG, JPEG or WebP image.", param=param, code="invalid_image_format")
    try:
        with Image.open(file, formats=[fmt.upper()]) as im:
            width, height = im.size
            if width * height > settings.max_image_pixels:
                raise InvalidRequest(
                    f"The {param} is {width}x{height} pixels; the limit is {settings.max_image_pixels} pixels.",
                    param=param,
                    code="image_too_large",
                )
            if _orientation(im) in _TRANSPOSED:
                width, height = height, width
            if fmt == "jpeg":
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # decode at 1/8 scale: 1/64 the memory
                im.load()
        if fmt == "png":
            file.seek(0)
            with Image.open(file, formats=["PNG"]) as png:
                png.verify()  # every chunk's CRC and the image data's end, without inflating the pixels
        elif fmt == "webp":
            _check_riff(file, size)
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, for headers far past any sane size
        raise InvalidRequest(
            f"The {param} has far too many pixels; the limit is {settings.max_image_pixels}.",
            param=param,
            code="image_too_large",
        ) from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
        raise InvalidRequest(
            f"The {param} could not be decoded: it is corrupt or truncated.", param=param, code="invalid_image"
        ) from None
    file.seek(0)
    return InputImage(file=file, size=size, format=fmt, width=width, height=height)


def _orientation(im: Image.Image) -> int | None:
    """The EXIF orientation from what the header gave; ``getexif()`` would decode a whole PNG to look further."""
    raw = im.info.get("exif")
    if im.format != "PNG":
        return im.getexif().get(_ORIENTATION)
    if not raw:
        return None
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(_ORIENTATION)


def _check_riff(file: BinaryIO, size: int) -> None:
    """A WebP's container is whole: its RIFF length matches the file and its first chunk is a VP8 bitstream.

    The pixels are decoded by the worker, not here, so the gateway's memory does not grow with the image.
    """
    file.seek(0)
    head = file.read(16)
    if (
        len(head) < 16
        or int.from_bytes(head[4:8], "little") + 8 != size
        or head[12:16] not in (b"VP8 ", b"VP8L", b"VP8X")
    ):
        raise ValueError("truncated or malformed WebP container")


def new_spool() -> BinaryIO:
    """A temporary file for an input: in memory up to :data:`SPOOL_BYTES`, then on disk (unnamed)."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # type: ignore[return-value]


def spool(data: bytes) -> BinaryIO:
    f = new_spool()
    f.write(data)
    f.seek(0)
    return f  # type: ignore[return-value]


def decode_data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise InvalidRequest(f"The {param} data URL must be base64-encoded (data:image/png;base64,...).", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"The {param} data URL is not valid base64.", param=param) from None


async def fetch(url: str, settings: Settings, param: str) -> BinaryIO:
    """Download an http(s) image URL from an allowed host into a temporary file, within the size and time limits.

    Redirects are not followed: a redirect could lead to a host the allow-list does not name.
    """
    host = urlsplit(url).hostname or ""
    if host.lower() not in {h.lower() for h in settings.image_url_allowlist}:
        raise InvalidRequest(
            f"Fetching images from '{host}' is not allowed; send the image as a data: URL or a file.", param=param
        )
    out = new_spool()
    limit = settings.max_image_bytes
    try:
        timeout = aiohttp.ClientTimeout(total=settings.image_url_timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            if resp.status != 200:
                raise InvalidRequest(f"Fetching the {param} URL answered HTTP {resp.status}.", param=param)
            if (resp.content_length or 0) > limit:
                raise InvalidRequest(f"The {param} URL's image is larger than {limit} bytes.", param=param)
            received = 0
            async for chunk in resp.content.iter_chunked(_CHUNK):
                received += len(chunk)
                if received > limit:
                    raise InvalidRequest(f"The {param} URL's image is larger than {limit} bytes.", param=param)
                out.write(chunk)
    except InvalidRequest:
        out.close()
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        out.close()
        raise InvalidRequest(f"Fetching the {param} URL failed: {type(e).__name__} {e}".strip(), param=param) from None
    out.seek(0)
    return out  # type: ignore[return-value]


async def from_ref(url: str | None, file_id: str | None, settings: Settings, param: str) -> InputImage:
    """An :class:`InputImage` from the JSON form's ``{"image_url": ...}`` (or a clear 400)."""
    if file_id is not None and url is None:
        raise InvalidRequest("file_id inputs are not supported; send an image_url (a data: URL).", param=param)
    if not url:
        raise InvalidRequest(f"The {param} needs an image_url.", param=param)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        file = spool(decode_data_url(url, param))
    elif scheme in ("http", "https"):
        file = await fetch(url, settings, param)
    else:
        raise InvalidRequest(f"The {param} URL must be a data: or http(s): URL.", param=param)
    return await checked(file, settings, param)


async def from_refs(
    refs: Sequence[ImageRef], mask: ImageRef | None, settings: Settings
) -> tuple[list[InputImage], InputImage | None]:
    """The images and mask of a JSON edit, checked (all closed again if one is refused)."""
    images: list[InputImage] = []
    try:
        for k, ref in enumerate(refs):
            images.append(await from_ref(ref.image_url, ref.file_id, settings, f"images[{k}]"))
        return images, (await from_ref(mask.image_url, mask.file_id, settings, "mask") if mask is not None else None)
    except BaseException:
        for i in images:
            i.close()
        raise


async def checked(file: BinaryIO, settings: Settings, param: str) -> InputImage:
    """Inspect ``file`` off the event loop; close it if it is refused."""
    try:
        return await asyncio.to_thread(inspect, file, settings, param)
    except BaseException:
        with contextlib.suppress(Exception):
            file.close()
        raise
