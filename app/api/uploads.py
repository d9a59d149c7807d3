"""Reading edit and variation requests: multipart (the SDKs' form) or JSON (OpenAI's newer edit form).

Multipart uploads stream into temporary files as they arrive (Litestar spools every part over 1 MiB to disk) and
Litestar closes them when the response ends. Scalars arrive as strings and are coerced with the same rules as JSON.
Files may come as ``image``, repeated ``image`` or ``image[]`` (what the SDKs send for a list, even of one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.datastructures import UploadFile

from app.api.errors import invalid_value
from app.config import Settings
from app.errors import InvalidRequest, PayloadTooLarge
from app.protocol.images import ImageEditJsonRequest, ImageEditRequest, ImageVariationRequest
from app.services.inputs import InputImage, checked, from_ref

S = TypeVar("S", bound=msgspec.Struct)

_FILE_FIELDS = ("image", "image[]", "mask", "mask[]")


@dataclass
class Upload:
    fields: Any
    images: list[InputImage]
    mask: InputImage | None = None


_LIST_FIELDS = ("fallbacks",)


def _convert(data: Any, cls: type[S]) -> S:
    try:
        return msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as e:
        raise invalid_value(str(e), None) from None


def _files(form: Any, names: tuple[str, ...], param: str) -> list[UploadFile]:
    found = [v for name in names for v in form.getall(name, [])]
    for v in found:
        if not isinstance(v, UploadFile):
            raise InvalidRequest(f"'{param}' must be a file upload, not a text field.", param=param)
    return found


async def _inspect_all(files: list[Any], settings: Settings, param: str) -> list[InputImage]:
    out: list[InputImage] = []
    try:
        for f in files:
            out.append(await checked(f, settings, param))
    except BaseException:
        for i in out:
            i.close()
        raise
    return out


async def _multipart(request: Request, settings: Settings, cls: type[S], *, with_mask: bool = True) -> Upload:
    form = await request.form()
    images = _files(form, ("image", "image[]"), "image")
    masks = _files(form, ("mask", "mask[]"), "mask") if with_mask else []
    if len(images) > settings.max_images:
        raise InvalidRequest(f"At most {settings.max_images} images may be sent.", param="image")
    if len(masks) > 1:
        raise InvalidRequest("Send at most one mask.", param="mask")
    scalars = {k: form.get(k) for k in form if k not in _FILE_FIELDS and isinstance(form.get(k), str)}
    values: dict[str, Any] = {k: v for k, v in scalars.items() if v != "" and k.removesuffix("[]") not in _LIST_FIELDS}
    for name in _LIST_FIELDS:  # repeated parts (`fallbacks` or `fallbacks[]`) make a list
        items = [v for key in (name, f"{name}[]") for v in form.getall(key, []) if isinstance(v, str) and v]
        if items:
            values[name] = items
    fields = _convert(values, cls)
    checked_images = await _inspect_all([u.file for u in images], settings, "image")
    try:
        mask = (await _inspect_all([masks[0].file], settings, "mask"))[0] if masks else None
    except BaseException:
        for i in checked_images:
            i.close()
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
    images: list[InputImage] = []
    mask = None
    try:
        for k, ref in enumerate(req.images):
            images.append(await from_ref(ref.image_url, ref.file_id, settings, f"images[{k}]"))
        if req.mask is not None:
            mask = await from_ref(req.mask.image_url, req.mask.file_id, settings, "mask")
    except BaseException:
        for i in images:
            i.close()
        raise
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
