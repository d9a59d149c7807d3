"""Public wire types of asynchronous image jobs (``/v1/jobs``), in the style of OpenAI's video jobs."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

from app.protocol.images import ImagesResponse

JobKind = Literal["image.generation", "image.edit", "image.variation"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
ErrorCode = Literal[
    "invalid_request",
    "worker_lost",
    "oom",
    "deadline_exceeded",
    "cancelled",
    "generation_failed",
    "expired",
    "internal",
]


class JobProgress(msgspec.Struct, kw_only=True):
    step: int
    total: int
    percent: int
    eta_seconds: float | None = None


class JobError(msgspec.Struct, kw_only=True):
    code: ErrorCode
    message: str


class JobUrls(msgspec.Struct, kw_only=True):
    """Where to follow the job: clients should use these rather than build them."""

    get: str
    events: str
    cancel: str


class ImageJob(msgspec.Struct, kw_only=True):
    """An asynchronous generation, edit or variation; ``result`` is the Images API answer once it succeeded."""

    id: str
    object: Literal["image.job"] = "image.job"
    kind: JobKind
    model: str
    status: JobStatus
    progress: JobProgress | None
    attempts: int
    created_at: int
    started_at: int | None
    completed_at: int | None
    expires_at: int
    error: JobError | None
    result: ImagesResponse | None
    urls: JobUrls
    webhook_url: str | None = None


class JobList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ImageJob]
    first_id: str | None
    last_id: str | None
    has_more: bool


class JobDeleted(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["image.job.deleted"] = "image.job.deleted"
    deleted: bool = True


class JobEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One event of ``GET /v1/jobs/{id}/events``; ``type`` is ``image.job.<what happened>``.

    ``queued``, ``started`` (each run; ``attempt`` counts them), ``progress`` (``progress``), ``partial_image``
    (``b64_json``, ``image_index``, ``partial_image_index``), and one final ``succeeded``, ``failed``,
    ``cancelled`` or ``expired`` carrying the whole job.
    """

    type: str
    job_id: str
    created_at: int
    attempt: int | UnsetType = UNSET
    progress: JobProgress | UnsetType = UNSET
    b64_json: bytes | UnsetType = UNSET
    image_index: int | UnsetType = UNSET
    partial_image_index: int | UnsetType = UNSET
    job: ImageJob | UnsetType = UNSET


class WebhookSecret(msgspec.Struct, kw_only=True):
    """A new signing secret, shown this once; the previous one keeps signing for ``previous_valid_until``."""

    object: Literal["webhook.secret"] = "webhook.secret"
    secret: str
    owner: str
    created_at: int
    previous_valid_until: int | None
