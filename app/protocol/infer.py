"""Wire types of the custom-models inference API (seed 000, ``/infer_api/v1``).

The source names paths only, so these shapes are imagegate's: projects group models (``ModelConfig.project``), a
generation is an asynchronous job of the job layer, and job statuses are this dialect's words (``succeeded`` is
``completed``). Progress and errors reuse the job layer's :class:`~app.protocol.jobs.JobProgress` and
:class:`~app.protocol.jobs.JobError`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.protocol.images import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, OutputFormat, WebhookEvent
from app.protocol.jobs import JobError, JobProgress

InferStatus = Literal["queued", "running", "completed", "failed", "cancelled", "expired"]


# -- aspect ratios ------------------------------------------------------------------------------------------------


class AspectRatio(msgspec.Struct, kw_only=True):
    aspect_ratio: str
    width: int
    height: int


class AspectRatioList(msgspec.Struct, kw_only=True):
    """A model's ratio table: every ratio as a size on its grid, within its limits."""

    model: str
    data: list[AspectRatio]


class OutputDimensions(msgspec.Struct, kw_only=True):
    model: str
    aspect_ratio: str
    width: int
    height: int


# -- projects and models ------------------------------------------------------------------------------------------


class Project(msgspec.Struct, kw_only=True):
    name: str
    model_count: int


class ProjectList(msgspec.Struct, kw_only=True):
    data: list[Project]


class ProjectModel(msgspec.Struct, kw_only=True):
    name: str
    project: str
    family: str | None
    trigger_words: list[str]
    style: str
    sample_image_count: int


class ProjectModelList(msgspec.Struct, kw_only=True):
    project: str
    data: list[ProjectModel]


class ProjectModelConfig(msgspec.Struct, kw_only=True):
    """A model's parameters: what a generation may ask of it, and what it gets when it asks nothing."""

    name: str
    project: str
    family: str | None
    tasks: list[str] | None
    default_size: str
    min_side: int
    max_side: int
    size_multiple: int
    max_images: int
    default_steps: int | None
    max_steps: int
    default_guidance: float | None
    max_guidance: float
    schedulers: list[str] | None
    default_scheduler: str | None
    output_formats: list[str]
    trigger_words: list[str]
    style: str
    aspect_ratios: list[AspectRatio]


class SampleImage(msgspec.Struct, kw_only=True):
    index: int
    name: str
    width: int
    height: int
    url: str


class SampleImageList(msgspec.Struct, kw_only=True):
    project: str
    model: str
    data: list[SampleImage]


# -- generations --------------------------------------------------------------------------------------------------


class GenerationRequest(msgspec.Struct, kw_only=True):
    """``POST /infer_api/v1/generations``; unknown fields are ignored.

    The size comes from one of ``aspect_ratio``, ``size``, or ``width`` and ``height`` (none: the model's default).
    """

    project: str = "default"
    model: str
    prompt: Annotated[str, Meta(min_length=1, max_length=32000)]
    negative_prompt: str | None = None
    aspect_ratio: str | None = None
    size: str | None = None
    width: Annotated[int, Meta(ge=1)] | None = None
    height: Annotated[int, Meta(ge=1)] | None = None
    num_images: Annotated[int, Meta(ge=1, le=10)] = 1
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    steps: Annotated[int, Meta(ge=1, le=MAX_STEPS)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=MAX_GUIDANCE)] | None = None
    scheduler: str | None = None
    output_format: OutputFormat | None = None
    webhook_url: Annotated[str, Meta(max_length=2048)] | None = None
    webhook_events: Annotated[list[WebhookEvent], Meta(max_length=3)] | None = None


class InferJob(msgspec.Struct, kw_only=True):
    """A generation job, as this API shows it (the answer to a submission, an entry of the job lists)."""

    job_id: str
    status: InferStatus
    project: str
    model: str
    progress: JobProgress | None
    created_at: int
    completed_at: int | None
    result_url: str
    error: JobError | None


class ResultImage(msgspec.Struct, kw_only=True):
    url: str


class GenerationResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``GET /generations/{job_id}/result``: the progress of a job in flight, its images, or why it has none."""

    job_id: str
    status: InferStatus
    progress: JobProgress | UnsetType | None = UNSET
    images: list[ResultImage] | UnsetType = UNSET
    model: str | UnsetType = UNSET
    prompt: str | UnsetType = UNSET
    seed: int | UnsetType = UNSET
    size: str | UnsetType = UNSET
    created_at: int | UnsetType = UNSET
    completed_at: int | UnsetType = UNSET
    error: JobError | UnsetType = UNSET


# -- prompt enhancement -------------------------------------------------------------------------------------------


class EnhancePromptRequest(msgspec.Struct, kw_only=True):
    prompt: Annotated[str, Meta(max_length=32000)]


class EnhancedPrompt(msgspec.Struct, kw_only=True):
    original_prompt: str
    enhanced_prompt: str
    method: Literal["template", "llm"]


# -- jobs ---------------------------------------------------------------------------------------------------------


class InferJobList(msgspec.Struct, kw_only=True):
    data: list[InferJob]
    first_id: str | None
    last_id: str | None
    has_more: bool


class InferJobDeleted(msgspec.Struct, kw_only=True):
    job_id: str
    deleted: bool = True


class InferJobsDeleted(msgspec.Struct, kw_only=True):
    deleted: int


class SecureRoute(msgspec.Struct, kw_only=True):
    message: str
    principal: str
