"""``/v1/images/*``: decode, hand to the service, return JSON or an SSE stream. No logic lives here."""

from __future__ import annotations

import msgspec
from litestar import Controller, MediaType, Request, Response, post
from litestar.types import ASGIApp

from app.api import sse
from app.api.disconnect import unless_disconnected
from app.protocol.images import ImageGenerateRequest
from app.services.images import ImageService

_encode = msgspec.json.Encoder().encode


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


class ImagesController(Controller):
    path = "/v1/images"

    @post("/generations", status_code=200, operation_id="imageGeneration")
    async def generations(self, request: Request, data: ImageGenerateRequest, images: ImageService) -> ASGIApp:
        if data.stream:
            return sse.event_stream(images.stream(data), request.app.state.settings.sse_ping_interval)
        result = await unless_disconnected(request, images.generate(data, base_url(request)))
        return Response(_encode(result), media_type=MediaType.JSON)  # type: ignore[return-value]
