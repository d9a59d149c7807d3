"""``/v1/images/*``: decode, hand to the service, return JSON or an SSE stream. No logic lives here.

The handlers take the service from the app's state (settings come from it) rather than as a dependency, whose
resolution costs Litestar more per request than the rest of the handler. With
``Prefer: respond-async`` (RFC 7240) the request becomes a job: 202 with the job and its ``Location``.
"""

from __future__ import annotations

from litestar import Controller, MediaType, Request, Response, post
from litestar.types import ASGIApp

from app.api import sse, uploads
from app.api.disconnect import unless_disconnected
from app.api.jobs import accepted
from app.errors import InvalidRequest
from app.protocol.images import ImageGenerateRequest, ImagesResponse, encode_json
from app.services.images import ImageService
from app.services.jobs import JobService


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _service(request: Request) -> ImageService:
    return request.app.state.images  # type: ignore[no-any-return]


def _json(result: ImagesResponse) -> ASGIApp:
    return Response(encode_json(result), media_type=MediaType.JSON)  # type: ignore[return-value]


def _jobs(request: Request, upload: uploads.Upload) -> JobService | None:
    """The job service when the client prefers an asynchronous answer; a webhook needs one."""
    prefer = request.headers.get("prefer")
    if prefer and any(p.split(";")[0].strip().lower() == "respond-async" for p in prefer.split(",")):
        return request.app.state.jobs
    if upload.fields.webhook_url:
        upload.close()
        raise InvalidRequest(
            "webhook_url needs an asynchronous request: send 'Prefer: respond-async'.", param="webhook_url"
        )
    return None


async def _submit(request: Request, jobs: JobService, kind: str, upload: uploads.Upload) -> ASGIApp:
    job, created = await jobs.submit(
        kind,
        upload.fields,
        request.user,
        base_url(request),
        images=upload.images,
        mask=upload.mask,
        idempotency_key=request.headers.get("idempotency-key"),
    )
    return accepted(job, 202 if created else 200)  # type: ignore[return-value]


class ImagesController(Controller):
    path = "/v1/images"

    @post("/generations", status_code=200, operation_id="imageGeneration")
    async def generations(self, request: Request, data: ImageGenerateRequest) -> ASGIApp:
        images = _service(request)
        jobs = _jobs(request, uploads.Upload(data, []))
        if jobs is not None:
            return await _submit(request, jobs, "image.generation", uploads.Upload(data, []))
        if data.stream:
            return sse.event_stream(await images.stream(data, request.user), images.settings.sse_ping_interval)
        return _json(await unless_disconnected(request, images.generate(data, base_url(request), request.user)))


class UploadsController(Controller):
    """Edits and variations; ``create_app`` sets their body limit from ``max_upload_size``."""

    path = "/v1/images"

    @post("/edits", status_code=200, operation_id="imageEdit")
    async def edits(self, request: Request) -> ASGIApp:
        images = _service(request)
        edit = await uploads.read_edit(request, images.settings)
        jobs = _jobs(request, edit)
        if jobs is not None:
            return await _submit(request, jobs, "image.edit", edit)
        if edit.fields.stream:
            stream = await images.edit_stream(edit.fields, edit.images, edit.mask, request.user)
            return sse.event_stream(stream, images.settings.sse_ping_interval)
        work = images.edit(edit.fields, edit.images, edit.mask, base_url(request), request.user)
        return _json(await unless_disconnected(request, work))

    @post("/variations", status_code=200, operation_id="imageVariation")
    async def variations(self, request: Request) -> ASGIApp:
        images = _service(request)
        upload = await uploads.read_variation(request, images.settings)
        jobs = _jobs(request, upload)
        if jobs is not None:
            return await _submit(request, jobs, "image.variation", upload)
        work = images.variation(upload.fields, upload.images, base_url(request), request.user)
        return _json(await unless_disconnected(request, work))
