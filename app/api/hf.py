"""``/hf``: the Hugging Face dialect (:mod:`app.protocol.hf`), translated onto the image service. No logic here.

``POST /hf/models/{model}`` is the text-to-image task (``InferenceClient(base_url=…/hf/models/{model})``);
``POST /hf/endpoints/{model}`` (and ``…/predict``) is seed 003's handler, with the toolkit's ``GET …/health``.
"""

from __future__ import annotations

import base64

from litestar import Controller, Request, Response, get, post

from app.api.disconnect import unless_disconnected
from app.api.images import base_url
from app.protocol import hf
from app.protocol.images import ImageGenerateRequest
from app.services.images import ImageService
from app.worker.protocol import image_bytes


async def _image(request: Request, images: ImageService, req: ImageGenerateRequest, wait: float) -> bytes:
    await images.wait_ready(req.model, wait)
    result = await unless_disconnected(request, images.generate(req, base_url(request), request.user))
    return bytes(image_bytes(result.data[0].b64_json))  # type: ignore[arg-type]


class HuggingFaceController(Controller):
    path = "/hf"

    @post("/models/{model_id:path}", status_code=200, operation_id="hfTextToImage")
    async def task(self, request: Request, model_id: str, images: ImageService) -> Response[bytes]:
        req = hf.decode(await request.body(), hf.TaskRequest)
        fmt = hf.output_format(request.headers.get("accept")) or "jpeg"
        wait = hf.wants_to_wait(dict(request.headers), req.options)
        data = await _image(request, images, hf.task_request(model_id.lstrip("/"), req, fmt), wait)
        return Response(data, media_type=f"image/{fmt}")

    @post(["/endpoints/{model_id:str}", "/endpoints/{model_id:str}/predict"], status_code=200, operation_id="hfHandler")
    async def handler(self, request: Request, model_id: str, images: ImageService) -> Response:
        req = hf.decode(await request.body(), hf.HandlerRequest)
        fmt = hf.output_format(request.headers.get("accept"), default="jpeg")
        raw = fmt is not None and "image/" in (request.headers.get("accept") or "")
        wait = hf.wants_to_wait(dict(request.headers), None)
        data = await _image(request, images, hf.handler_request(model_id, req, fmt or "jpeg"), wait)
        if raw:
            return Response(data, media_type=f"image/{fmt}")
        return Response(hf.HandlerResponse(image=base64.b64encode(data).decode()))

    @get("/endpoints/{model_id:str}/health", operation_id="hfHealth", media_type="text/plain")
    async def health(self, model_id: str) -> str:
        return "Ok"
