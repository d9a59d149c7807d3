"""``/v1/jobs``: asynchronous image jobs (list, get, follow, cancel, delete), and webhook signing secrets.

A job is created by ``POST /v1/images/generations|edits|variations`` with ``Prefer: respond-async`` (see
:mod:`app.api.images`); these routes only translate HTTP onto :class:`app.services.jobs.JobService`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from litestar import Controller, MediaType, Request, Response, delete, get, post
from litestar.params import Parameter
from litestar.types import ASGIApp

from app.api import sse
from app.protocol.images import encode_json
from app.protocol.jobs import ImageJob, JobDeleted, JobList, WebhookSecret
from app.services.jobs import JobService
from app.services.webhooks import WebhookSender

Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
Limit = Annotated[int, Parameter(ge=1, le=100)]


def accepted(job: ImageJob, status: int = 202) -> Response[bytes]:
    """A job just submitted: 202 with where to follow it (RFC 7240's ``Preference-Applied``)."""
    headers = {"location": job.urls.get, "preference-applied": "respond-async"}
    return Response(encode_json(job), status_code=status, media_type=MediaType.JSON, headers=headers)


class JobsController(Controller):
    path = "/v1/jobs"

    @get("", operation_id="listJobs")
    async def list_jobs(
        self,
        request: Request,
        jobs: JobService,
        status: Status | None = None,
        after: str | None = None,
        limit: Limit = 20,
    ) -> JobList:
        return await jobs.list(request.user, statuses=[status] if status else None, after=after, limit=limit)

    @get("/{job_id:str}", operation_id="retrieveJob")
    async def retrieve(self, request: Request, job_id: str, jobs: JobService) -> ImageJob:
        return await jobs.get(job_id, request.user)

    @get("/{job_id:str}/events", operation_id="jobEvents")
    async def events(self, request: Request, job_id: str, jobs: JobService) -> ASGIApp:
        return sse.event_stream(await jobs.events(job_id, request.user), jobs.settings.sse_ping_interval)

    @post("/{job_id:str}/cancel", operation_id="cancelJob", status_code=200)
    async def cancel(self, request: Request, job_id: str, jobs: JobService) -> Response[ImageJob]:
        job = await jobs.cancel(job_id, request.user)
        return Response(job, status_code=200 if job.status == "cancelled" else 202)

    @delete("/{job_id:str}", operation_id="deleteJob", status_code=200)
    async def delete(self, request: Request, job_id: str, jobs: JobService) -> JobDeleted:
        return await jobs.delete(job_id, request.user)


class WebhookSecretsController(Controller):
    """Signing secrets: a key's own (``/v1``), and the server's, which signs for principals without one (admin)."""

    @post("/v1/webhooks/secret", operation_id="rotateWebhookSecret", status_code=201)
    async def rotate_own(self, request: Request, webhooks: WebhookSender) -> WebhookSecret:
        return await webhooks.rotate(request.user)

    @post("/admin/webhooks/secret", operation_id="rotateServerWebhookSecret", status_code=201)
    async def rotate_server(self, webhooks: WebhookSender) -> WebhookSecret:
        return await webhooks.rotate(None)
