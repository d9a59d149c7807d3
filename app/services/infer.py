"""The custom-models inference API (seed 000): a translation onto the image, job and prompt-enhancer services.

Projects are groups of served models (``ModelConfig.project``); a model the caller may not use is in no project
for it. A generation is a job of the job layer submitted with surface ``infer``: this API lists, reads and deletes
only the jobs submitted through it, and names their statuses in its own words (``succeeded`` is ``completed``).
Nothing here validates sizes, steps, guidance or schedulers: the image service does when the job is submitted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import msgspec
from msgspec import UNSET, UnsetType
from PIL import Image, UnidentifiedImageError

from app.auth.principals import Principal
from app.config import ModelConfig, Settings
from app.errors import ApiError, BackendFailed, InvalidRequest, NotFound
from app.protocol.images import ImageGenerateRequest, LoraSpec, OutputFormat
from app.protocol.infer import (
    AspectRatio,
    AspectRatioList,
    EnhancedPrompt,
    EnhancePromptRequest,
    GenerationRequest,
    GenerationResult,
    InferJob,
    InferJobDeleted,
    InferJobList,
    InferJobsDeleted,
    InferStatus,
    OutputDimensions,
    Project,
    ProjectList,
    ProjectModel,
    ProjectModelConfig,
    ProjectModelList,
    ResultImage,
    SampleImage,
    SampleImageList,
    SecureRoute,
)
from app.protocol.jobs import ImageJob
from app.services import aspect
from app.services.custom import CustomModelService
from app.services.enhance import ChatEnhancer, Enhancer, TemplateEnhancer, UpstreamFailed
from app.services.images import ImageService
from app.services.jobs import JobService
from app.store.custom import TrainingRecord
from app.store.jobs import JobRecord

log = logging.getLogger("imagegate.infer")

SURFACE = "infer"
CUSTOM_PROJECT = "custom-models"
"""The project of the caller's trained custom models (seed 001)."""
PREFIX = "/infer_api/v1"
STATUSES: dict[str, InferStatus] = {
    "queued": "queued",
    "running": "running",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    "expired": "expired",
}
"""Job layer status -> this API's word for it."""
OUTPUT_FORMATS: tuple[str, ...] = typing.get_args(OutputFormat)
T = TypeVar("T")


def _or_none(value: T | UnsetType) -> T | None:
    """What a worker reported, or None before one has (the image service leaves such fields unset)."""
    return None if value is UNSET else value  # type: ignore[return-value]


def make_enhancer(settings: Settings) -> Enhancer:
    """The chat enhancer when ``enhancer_url`` is set (its key read from ``enhancer_api_key_env``), else templates."""
    if not settings.enhancer_url:
        return TemplateEnhancer()
    key = os.environ.get(settings.enhancer_api_key_env, "") if settings.enhancer_api_key_env else ""
    return ChatEnhancer(settings.enhancer_url, settings.enhancer_model, key)


@dataclass(frozen=True)
class SampleFile:
    """A model's sample image on disk, as listed and served."""

    index: int
    path: Path
    width: int
    height: int
    media_type: str


def _sample(index: int, path: Path) -> SampleFile | None:
    try:
        with Image.open(path) as image:  # reads the header only
            media_type = Image.MIME.get(image.format or "", "application/octet-stream")
            return SampleFile(index, path, image.width, image.height, media_type)
    except (OSError, UnidentifiedImageError) as e:
        log.warning("sample image %s is not a readable image: %s", path, e)
        return None


class InferService:
    """Answers every ``/infer_api/v1`` route.

    Args:
        settings: The effective settings (``public_url`` makes absolute URLs when set).
        images: The image service: served models, their configuration and what their workers reported.
        jobs: The job layer that runs generations.
        enhancer: The prompt enhancer (see :func:`make_enhancer`).
        custom: The custom models (seed 001): the caller's trained ones make the project ``custom-models``.
    """

    def __init__(
        self,
        settings: Settings,
        images: ImageService,
        jobs: JobService,
        enhancer: Enhancer,
        custom: CustomModelService | None = None,
    ) -> None:
        self.settings = settings
        self.images = images
        self.jobs = jobs
        self.enhancer = enhancer
        self.custom = custom

    def _base(self, base_url: str) -> str:
        return (self.settings.public_url or base_url).rstrip("/")

    # -- models and projects ------------------------------------------------------------------------------------

    def _allowed(self, principal: Principal) -> list[ModelConfig]:
        return [self.images.config(name) for name in self.images.served() if principal.allows(name)]

    def _model(self, name: str | None, principal: Principal) -> ModelConfig:
        """The named model, or the first the principal may use; one it may not use does not exist for it."""
        allowed = self._allowed(principal)
        model = next((m for m in allowed if name is None or m.name == name), None)
        if model is None:
            missing = "No model is available to this caller" if name is None else f"The model '{name}' does not exist"
            available = ", ".join(m.name for m in allowed) or "none"
            raise NotFound(f"{missing}. Available: {available}.", param="model", code="model_not_found")
        return model

    def _project_models(self, project: str, principal: Principal) -> list[ModelConfig]:
        models = [m for m in self._allowed(principal) if m.project == project]
        if not models:
            known = sorted({m.project for m in self._allowed(principal)})
            raise NotFound(
                f"The project '{project}' does not exist. Available: {', '.join(known) or 'none'}.",
                param="project",
                code="project_not_found",
            )
        return models

    def _project_model(self, project: str, name: str, principal: Principal) -> ModelConfig:
        model = next((m for m in self._project_models(project, principal) if m.name == name), None)
        if model is None:
            raise NotFound(
                f"The project '{project}' has no model '{name}'.", param="model_name", code="model_not_found"
            )
        return model

    def _family(self, model: ModelConfig) -> str | None:
        details = self.images.pool.details(model.name)
        return details.family if details else None

    def _table(self, model: ModelConfig) -> dict[str, tuple[int, int]]:
        side = aspect.base_side(self._family(model), model.default_size)
        return aspect.dimensions(side, model.size_multiple, model.min_side, model.max_side)

    def _ratio(self, model: ModelConfig, ratio: str, unknown: type[ApiError]) -> tuple[str, int, int]:
        """``(W:H, width, height)`` of a ratio in any spelling :func:`aspect.normalize` reads; else ``unknown``."""
        table = self._table(model)
        name = aspect.normalize(ratio)
        if name not in table:
            raise unknown(
                f"Unknown aspect ratio '{ratio}' for '{model.name}'. Valid: {', '.join(table)}.",
                param="aspect_ratio",
                code="unknown_aspect_ratio",
            )
        width, height = table[name]
        return name, width, height

    def aspect_ratios(self, model_name: str | None, principal: Principal) -> AspectRatioList:
        model = self._model(model_name, principal)
        data = [AspectRatio(aspect_ratio=r, width=w, height=h) for r, (w, h) in self._table(model).items()]
        return AspectRatioList(model=model.name, data=data)

    def output_dimensions(self, ratio: str, model_name: str | None, principal: Principal) -> OutputDimensions:
        model = self._model(model_name, principal)
        name, width, height = self._ratio(model, ratio, NotFound)
        return OutputDimensions(model=model.name, aspect_ratio=name, width=width, height=height)

    async def _custom_models(self, principal: Principal) -> list[ProjectModel]:
        if self.custom is None:
            return []
        return [
            ProjectModel(
                name=model.id,
                project=CUSTOM_PROJECT,
                family=self._family(self.images.config(model.base_model)),
                trigger_words=[training.trigger_word],
                style="",
                sample_image_count=0,
            )
            for model, training in await self.custom.trained_models(principal)
            if model.base_model in self.images.served() and principal.allows(model.base_model)
        ]

    async def projects(self, principal: Principal) -> ProjectList:
        counts: dict[str, int] = {}
        for model in self._allowed(principal):
            counts[model.project] = counts.get(model.project, 0) + 1
        custom = await self._custom_models(principal)
        if custom:
            counts[CUSTOM_PROJECT] = counts.get(CUSTOM_PROJECT, 0) + len(custom)
        return ProjectList(data=[Project(name=name, model_count=n) for name, n in counts.items()])

    async def models(self, project: str, principal: Principal) -> ProjectModelList:
        if project == CUSTOM_PROJECT and self.custom is not None:
            return ProjectModelList(project=project, data=await self._custom_models(principal))
        data = [
            ProjectModel(
                name=m.name,
                project=m.project,
                family=self._family(m),
                trigger_words=list(m.trigger_words),
                style=m.style,
                sample_image_count=len(m.sample_images),
            )
            for m in self._project_models(project, principal)
        ]
        return ProjectModelList(project=project, data=data)

    async def _custom(self, name: str, principal: Principal) -> tuple[ModelConfig, TrainingRecord]:
        """A trained custom model's base model, and the training whose adapter makes it the custom model."""
        model, training = await self.custom.trained_model(name, principal)  # type: ignore[union-attr]
        if model.base_model not in self.images.served() or not principal.allows(model.base_model):
            raise NotFound(f"The custom model '{name}' is not served now.", param="model", code="model_not_found")
        return self.images.config(model.base_model), training

    async def model_config(self, project: str, name: str, principal: Principal) -> ProjectModelConfig:
        if project == CUSTOM_PROJECT and self.custom is not None:
            base, training = await self._custom(name, principal)
            config = await self.model_config(base.project, base.name, principal)
            return msgspec.structs.replace(
                config, name=name, project=project, trigger_words=[training.trigger_word], style=""
            )
        model = self._project_model(project, name, principal)
        described = self.images.describe(model.name, created=0)  # for what its workers reported; no date shown
        return ProjectModelConfig(
            name=model.name,
            project=model.project,
            family=_or_none(described.family),
            tasks=_or_none(described.tasks),
            default_size=model.default_size,
            min_side=model.min_side,
            max_side=model.max_side,
            size_multiple=model.size_multiple,
            max_images=model.max_n,
            default_steps=_or_none(described.default_steps),
            max_steps=model.max_steps,
            default_guidance=_or_none(described.default_guidance),
            max_guidance=model.max_guidance,
            schedulers=_or_none(described.schedulers),
            default_scheduler=model.default_scheduler or None,
            output_formats=list(OUTPUT_FORMATS),
            trigger_words=list(model.trigger_words),
            style=model.style,
            aspect_ratios=[AspectRatio(aspect_ratio=r, width=w, height=h) for r, (w, h) in self._table(model).items()],
        )

    # -- sample images ------------------------------------------------------------------------------------------

    async def _samples(self, model: ModelConfig) -> list[SampleFile]:
        found = await asyncio.to_thread(
            lambda: [_sample(i, Path(p).expanduser()) for i, p in enumerate(model.sample_images)]
        )
        return [s for s in found if s is not None]

    async def sample_images(self, project: str, name: str, principal: Principal, base_url: str) -> SampleImageList:
        model = self._project_model(project, name, principal)
        where = f"projects/{quote(model.project, safe='')}/models/{quote(model.name, safe='')}"
        base = f"{self._base(base_url)}{PREFIX}/{where}/images"
        data = [
            SampleImage(index=s.index, name=s.path.name, width=s.width, height=s.height, url=f"{base}/{s.index}")
            for s in await self._samples(model)
        ]
        return SampleImageList(project=model.project, model=model.name, data=data)

    async def sample_image(self, project: str, name: str, index: int, principal: Principal) -> SampleFile:
        model = self._project_model(project, name, principal)
        sample = next((s for s in await self._samples(model) if s.index == index), None)
        if sample is None:
            raise NotFound(f"The model '{name}' has no sample image {index}.", param="index")
        return sample

    # -- generations --------------------------------------------------------------------------------------------

    def _size(self, model: ModelConfig, req: GenerationRequest) -> str | None:
        given = [f for f in ("aspect_ratio", "size") if getattr(req, f) is not None]
        if req.width is not None or req.height is not None:
            given.append("width")
            if req.width is None or req.height is None:
                missing = "height" if req.height is None else "width"
                raise InvalidRequest("Give both width and height, or neither.", param=missing)
        if len(given) > 1:
            raise InvalidRequest("Give one of aspect_ratio, size, or width and height; not several.", param=given[1])
        if req.aspect_ratio is not None:
            _, width, height = self._ratio(model, req.aspect_ratio, InvalidRequest)
            return f"{width}x{height}"
        if req.width is not None:
            return f"{req.width}x{req.height}"
        return req.size

    async def submit(
        self, req: GenerationRequest, principal: Principal, base_url: str, idempotency_key: str | None
    ) -> InferJob:
        """Submit a generation job; a model outside ``project`` is a 404, the rest is checked as for ``/v1``.

        A custom model (project ``custom-models``) generates with its base model and its newest adapter.
        """
        loras = None
        if req.project == CUSTOM_PROJECT and self.custom is not None:
            model, training = await self._custom(req.model, principal)
            loras = [LoraSpec(id=training.adapter_id)]  # type: ignore[arg-type]
        else:
            model = self.images.config(req.model)
            if model.project != req.project:
                raise NotFound(
                    f"The project '{req.project}' has no model '{req.model}'.", param="model", code="model_not_found"
                )
        wire = ImageGenerateRequest(
            model=model.name,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            n=req.num_images,
            size=self._size(model, req),
            seed=req.seed,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale,
            scheduler=req.scheduler,
            output_format=req.output_format,
            response_format="url",
            webhook_url=req.webhook_url,
            webhook_events=req.webhook_events,
            loras=loras,
        )
        job, _ = await self.jobs.submit(
            "image.generation", wire, principal, base_url, idempotency_key=idempotency_key, surface=SURFACE
        )
        return self._job(job, base_url)

    async def _record(self, job_id: str, principal: Principal) -> JobRecord:
        """The caller's job of this API; jobs of other APIs (and of other callers) do not exist here."""
        record = await self.jobs.record(job_id, principal)
        if record.surface != SURFACE:
            raise NotFound(f"No job with id '{job_id}'.", param="job_id", code="job_not_found")
        return record

    async def result(self, job_id: str, principal: Principal) -> GenerationResult:
        record = await self._record(job_id, principal)
        job = self.jobs.view(record)
        request = msgspec.json.decode(record.request)
        out = GenerationResult(
            job_id=job.id,
            status=STATUSES[job.status],
            model=job.model,
            prompt=request.get("prompt", ""),
            created_at=job.created_at,
        )
        if job.status in ("queued", "running"):
            out.progress = job.progress
            return out
        if job.completed_at is not None:
            out.completed_at = job.completed_at
        if job.status == "succeeded" and job.result is not None:
            out.images = [ResultImage(url=d.url) for d in job.result.data if isinstance(d.url, str)]
            out.seed = request.get("seed")
            out.size = job.result.size
        elif job.error is not None:
            out.error = job.error
        return out

    # -- prompt enhancement -------------------------------------------------------------------------------------

    async def enhance(self, project: str, name: str, req: EnhancePromptRequest, principal: Principal) -> EnhancedPrompt:
        model = self._project_model(project, name, principal)
        if not req.prompt.strip():
            raise InvalidRequest("The prompt is empty.", param="prompt")
        try:
            out = await self.enhancer.enhance(
                req.prompt, style=model.style, trigger_words=model.trigger_words, template=model.enhance_template
            )
        except UpstreamFailed as e:
            raise BackendFailed(f"The prompt enhancer failed: {e}", code="enhancer_failed") from None
        return EnhancedPrompt(original_prompt=out.original, enhanced_prompt=out.enhanced, method=out.method)

    # -- jobs ---------------------------------------------------------------------------------------------------

    def _job(self, job: ImageJob, base_url: str) -> InferJob:
        model = self.settings.model(job.model)
        return InferJob(
            job_id=job.id,
            status=STATUSES[job.status],
            project=model.project if model else "default",
            model=job.model,
            progress=job.progress,
            created_at=job.created_at,
            completed_at=job.completed_at,
            result_url=f"{self._base(base_url)}{PREFIX}/generations/{job.id}/result",
            error=job.error,
        )

    async def list(
        self, principal: Principal, base_url: str, statuses: list[str] | None, after: str | None, limit: int
    ) -> InferJobList:
        """The caller's jobs of this API (everyone's for an admin), newest first."""
        if after is not None:
            await self._record(after, principal)
        page = await self.jobs.list(principal, statuses=statuses, after=after, limit=limit, surface=SURFACE)
        return InferJobList(
            data=[self._job(j, base_url) for j in page.data],
            first_id=page.first_id,
            last_id=page.last_id,
            has_more=page.has_more,
        )

    async def delete(self, job_id: str, principal: Principal) -> InferJobDeleted:
        await self._record(job_id, principal)
        await self.jobs.delete(job_id, principal)
        return InferJobDeleted(job_id=job_id)

    async def delete_all(self, principal: Principal) -> InferJobsDeleted:
        """Delete the caller's jobs of this API; an admin's call deletes everyone's."""
        return InferJobsDeleted(deleted=await self.jobs.delete_all(principal, surface=SURFACE))

    @staticmethod
    def secure(principal: Principal) -> SecureRoute:
        return SecureRoute(message="You are an admin.", principal=principal.id)
