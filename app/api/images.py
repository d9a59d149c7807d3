"""``/v1/images/*``: decode, hand to the service, return JSON or an SSE stream. No logic lives here.

Each handler takes one dependency, the service (settings come from it): Litestar resolves two or more dependencies
of a handler concurrently, in a task group per request, which costs more than the rest of the handler.
"""

from __future__ import annotations

from litestar import Controller, MediaType, Request, Response, post
from litestar.types import ASGIApp

from app.api import sse, uploads
from app.api.disconnect import unless_disconnected
from app.protocol.images import ImageGenerateRequest, ImagesResponse, encode_json
from app.services.images import ImageService


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _json(result: ImagesResponse) -> ASGIApp:
    return Response(encode_json(result), media_type=MediaType.JSON)  # type: ignore[return-value]


class ImagesController(Controller):
    path = "/v1/images"

    @post("/generations", status_code=200, operation_id="imageGeneration")
    async def generations(self, request: Request, data: ImageGenerateRequest, images: ImageService) -> ASGIApp:
        if data.stream:
            return sse.event_stream(await images.stream(data, request.user), images.settings.sse_ping_interval)
        return _json(await unless_disconnected(request, images.generate(data, base_url(request), request.user)))


class UploadsController(Controller):
    """Edits and variations; ``create_app`` sets their body limit from ``max_upload_size``."""

    path = "/v1/images"

    @post("/edits", status_code=200, operation_id="imageEdit")
    async def edits(self, request: Request, images: ImageService) -> ASGIApp:
        edit = await uploads.read_edit(request, images.settings)
        if edit.fields.stream:
            stream = await images.edit_stream(edit.fields, edit.images, edit.mask, request.user)
            return sse.event_stream(stream, images.settings.sse_ping_interval)
        work = images.edit(edit.fields, edit.images, edit.mask, base_url(request), request.user)
        return _json(await unless_disconnected(request, work))

    @post("/variations", status_code=200, operation_id="imageVariation")
    async def variations(self, request: Request, images: ImageService) -> ASGIApp:
        upload = await uploads.read_variation(request, images.settings)
        work = images.variation(upload.fields, upload.images, base_url(request), request.user)
        return _json(await unless_disconnected(request, work))
