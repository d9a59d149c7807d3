"""``/sdapi/v1``: the AUTOMATIC1111 dialect (:mod:`app.protocol.a1111`), answered by :class:`SdApiService`.

No logic here. Bodies are read raw: clients send unknown keys and loosely typed values, and the request is echoed.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post

from app.api.disconnect import unless_disconnected
from app.api.images import base_url
from app.protocol import a1111
from app.services.sdapi import SdApiService


class SdApiController(Controller):
    path = "/sdapi/v1"

    @post("/txt2img", status_code=200, operation_id="sdTxt2Img")
    async def txt2img(self, request: Request, sdapi: SdApiService) -> a1111.GenerationResponse:
        body = await request.body()
        return await unless_disconnected(request, sdapi.txt2img(body, request.user, base_url(request)))

    @post("/img2img", status_code=200, operation_id="sdImg2Img")
    async def img2img(self, request: Request, sdapi: SdApiService) -> a1111.GenerationResponse:
        body = await request.body()
        return await unless_disconnected(request, sdapi.img2img(body, request.user, base_url(request)))

    @get("/sd-models", operation_id="sdModels")
    async def sd_models(self, request: Request, sdapi: SdApiService) -> list[a1111.SdModel]:
        return sdapi.sd_models(request.user)

    @get("/samplers", operation_id="sdSamplers")
    async def samplers(self, request: Request, sdapi: SdApiService) -> list[a1111.Sampler]:
        return sdapi.samplers(request.user)

    @get("/schedulers", operation_id="sdSchedulers")
    async def schedulers(self, sdapi: SdApiService) -> list[a1111.Schedule]:
        return sdapi.schedules()

    @get("/options", operation_id="sdGetOptions")
    async def options(self, request: Request, sdapi: SdApiService) -> a1111.Options:
        return sdapi.options(request.user)

    @post("/options", status_code=200, operation_id="sdSetOptions")
    async def set_options(self, request: Request, sdapi: SdApiService, data: dict[str, Any] | None = None) -> None:
        sdapi.set_options(request.user, data or {})

    @get("/progress", operation_id="sdProgress")
    async def progress(
        self, request: Request, sdapi: SdApiService, skip_current_image: bool = False
    ) -> a1111.ProgressResponse:
        return await sdapi.progress(request.user, skip_current_image)

    @post("/interrupt", status_code=200, operation_id="sdInterrupt")
    async def interrupt(self, request: Request, sdapi: SdApiService) -> dict[str, Any]:
        await sdapi.interrupt(request.user)
        return {}
