"""``/infer_api/v1``: the custom-models inference API (seed 000), translated by :class:`InferService`.

Every route needs a credential; ``/secure-route`` an admin's (app/auth/middleware.py). Each handler takes the one
service as its dependency (see app/api/images.py for why one).
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, MediaType, Request, Response, delete, get, post
from litestar.params import Parameter
from litestar.response import File

from app.api.images import base_url
from app.protocol.infer import (
    AspectRatioList,
    EnhancedPrompt,
    EnhancePromptRequest,
    GenerationRequest,
    GenerationResult,
    InferJob,
    InferJobDeleted,
    InferJobList,
    InferJobsDeleted,
    OutputDimensions,
    ProjectList,
    ProjectModelConfig,
    ProjectModelList,
    SampleImageList,
    SecureRoute,
)
from app.services.infer import PREFIX, InferService

Limit = Annotated[int, Parameter(ge=1, le=100)]
MODEL = "/projects/{container_name:str}/models/{model_name:str}"


class InferController(Controller):
    path = PREFIX

    @get("/aspect_ratios", operation_id="inferAspectRatios")
    async def aspect_ratios(self, request: Request, infer: InferService, model: str | None = None) -> AspectRatioList:
        return infer.aspect_ratios(model, request.user)

    @get("/output_image_dimensions/{aspect_ratio:str}", operation_id="inferOutputDimensions")
    async def output_dimensions(
        self, request: Request, aspect_ratio: str, infer: InferService, model: str | None = None
    ) -> OutputDimensions:
        return infer.output_dimensions(aspect_ratio, model, request.user)

    @get("/projects", operation_id="inferListProjects")
    async def projects(self, request: Request, infer: InferService) -> ProjectList:
        return await infer.projects(request.user)

    @get("/projects/{container_name:str}/models", operation_id="inferListModels")
    async def models(self, request: Request, container_name: str, infer: InferService) -> ProjectModelList:
        return await infer.models(container_name, request.user)

    @get(f"{MODEL}/config", operation_id="inferModelConfig")
    async def model_config(
        self, request: Request, container_name: str, model_name: str, infer: InferService
    ) -> ProjectModelConfig:
        return await infer.model_config(container_name, model_name, request.user)

    @get(f"{MODEL}/images", operation_id="inferListModelImages")
    async def sample_images(
        self, request: Request, container_name: str, model_name: str, infer: InferService
    ) -> SampleImageList:
        return await infer.sample_images(container_name, model_name, request.user, base_url(request))

    @get(f"{MODEL}/images/{{index:int}}", operation_id="inferModelImage", media_type=MediaType.TEXT)
    async def sample_image(
        self, request: Request, container_name: str, model_name: str, index: int, infer: InferService
    ) -> File:
        sample = await infer.sample_image(container_name, model_name, index, request.user)
        return File(sample.path, media_type=sample.media_type, content_disposition_type="inline")

    @post("/generations", operation_id="inferCreateGeneration", status_code=202)
    async def generate(self, request: Request, data: GenerationRequest, infer: InferService) -> Response[InferJob]:
        job = await infer.submit(data, request.user, base_url(request), request.headers.get("idempotency-key"))
        return Response(job, status_code=202, headers={"location": job.result_url})

    @get("/generations/{job_id:str}/result", operation_id="inferGenerationResult")
    async def result(self, request: Request, job_id: str, infer: InferService) -> Response[GenerationResult]:
        result = await infer.result(job_id, request.user)
        return Response(result, status_code=202 if result.status in ("queued", "running") else 200)

    @post(
        "/projects/{project_name:str}/models/{model_name:str}/enhance-prompt",
        operation_id="inferEnhancePrompt",
        status_code=200,
    )
    async def enhance(
        self, request: Request, project_name: str, model_name: str, data: EnhancePromptRequest, infer: InferService
    ) -> EnhancedPrompt:
        return await infer.enhance(project_name, model_name, data, request.user)

    @get("/jobs", operation_id="inferListJobs")
    async def jobs(
        self, request: Request, infer: InferService, after: str | None = None, limit: Limit = 20
    ) -> InferJobList:
        return await infer.list(request.user, base_url(request), None, after, limit)

    @get("/jobs/completed", operation_id="inferListCompletedJobs")
    async def completed_jobs(
        self, request: Request, infer: InferService, after: str | None = None, limit: Limit = 20
    ) -> InferJobList:
        return await infer.list(request.user, base_url(request), ["succeeded"], after, limit)

    @get("/jobs/failed", operation_id="inferListFailedJobs")
    async def failed_jobs(
        self, request: Request, infer: InferService, after: str | None = None, limit: Limit = 20
    ) -> InferJobList:
        return await infer.list(request.user, base_url(request), ["failed"], after, limit)

    @delete("/jobs/{job_id:str}", operation_id="inferDeleteJob", status_code=200)
    async def delete_job(self, request: Request, job_id: str, infer: InferService) -> InferJobDeleted:
        return await infer.delete(job_id, request.user)

    @delete("/jobs", operation_id="inferDeleteJobs", status_code=200)
    async def delete_jobs(self, request: Request, infer: InferService) -> InferJobsDeleted:
        return await infer.delete_all(request.user)

    @get("/secure-route", operation_id="inferSecureRoute")
    async def secure_route(self, request: Request, infer: InferService) -> SecureRoute:
        return infer.secure(request.user)
