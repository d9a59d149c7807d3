"""Liveness, readiness, the model list, the contract, and signed image files."""

from __future__ import annotations

import msgspec
from litestar import Controller, MediaType, Request, Response, get
from litestar.response import File

from app.errors import NotFound
from app.pool import Pool
from app.protocol.images import Model, ModelList
from app.services.images import ImageService
from app.store.files import JOB_ROUTE, MEDIA_TYPES, ROUTE, ImageFiles


class ReadyBackend(msgspec.Struct):
    name: str
    state: str
    models: list[str]
    outstanding: int
    queued: int
    weight: float
    recent_failures: int
    cooldown_seconds_left: float
    detail: str
    training: bool
    """A LoRA training runs on it now (inference prefers other backends)."""


class Readiness(msgspec.Struct):
    status: str
    models: dict[str, int]
    """Ready backends per model."""
    backends: list[ReadyBackend]


class SystemController(Controller):
    @get("/health", operation_id="health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/ready", operation_id="ready")
    async def ready(self, pool: Pool) -> Response[Readiness]:
        now = pool.clock()
        body = Readiness(
            status="draining" if pool.draining else "ready" if pool.is_ready() else "not_ready",
            models={m: len(pool.ready(m)) for m in pool.models},
            backends=[
                ReadyBackend(
                    name=m.name,
                    state=m.state.value,
                    models=sorted(m.models),
                    outstanding=m.outstanding,
                    queued=m.queued,
                    weight=m.weight,
                    recent_failures=pool.recent_failures(m),
                    cooldown_seconds_left=round(max(0.0, m.cooling_until - now), 3),
                    detail=m.detail,
                    training=m.training,
                )
                for m in pool.members
            ],
        )
        return Response(body, status_code=200 if pool.is_ready() else 503)

    @get("/v1/models", operation_id="listModels")
    async def list_models(self, request: Request, images: ImageService, started_at: int) -> ModelList:
        return images.models(request.user, started_at)

    @get("/v1/models/{model_id:str}", operation_id="retrieveModel")
    async def retrieve_model(self, request: Request, model_id: str, images: ImageService, started_at: int) -> Model:
        return images.model(model_id, request.user, started_at)

    @get("/openapi.yaml", operation_id="openapi", media_type="application/yaml")
    async def openapi(self, contract: bytes) -> bytes:
        return contract

    @get(f"{ROUTE}/{{name:str}}", operation_id="imageFile", media_type=MediaType.TEXT)
    async def image_file(
        self, name: str, files: ImageFiles, expires: str | None = None, signature: str | None = None
    ) -> File:
        return _signed_file(files, name, expires, signature)

    @get(f"{JOB_ROUTE}/{{name:str}}", operation_id="jobFile", media_type=MediaType.TEXT)
    async def job_file(
        self, name: str, job_files: ImageFiles, expires: str | None = None, signature: str | None = None
    ) -> File:
        return _signed_file(job_files, name, expires, signature)


def _signed_file(files: ImageFiles, name: str, expires: str | None, signature: str | None) -> File:
    path = files.resolve(name, expires, signature)
    if path is None:
        raise NotFound("This image URL is invalid or has expired.")
    return File(
        path,
        media_type=MEDIA_TYPES.get(path.suffix[1:], "application/octet-stream"),
        content_disposition_type="inline",
    )
