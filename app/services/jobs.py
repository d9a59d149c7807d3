"""The job layer: requests that outlive the HTTP exchange, run from a durable queue through the image service.

A job is stored whole (its wire request with the seed it resolved to, its input files) before the 202 answers, so
nothing about it lives only in memory. The runner claims jobs with a lease it renews while they run; a gateway that
dies leaves the lease to expire, and the job is claimed again (up to ``job_max_attempts`` runs, then it fails with
``worker_lost``). Only the holder of the current lease can complete a job, so none completes twice.

Jobs take at most ``job_share`` of each model's worker capacity at once (at least one), so synchronous requests
always find room; they go through the same pool, fallbacks and metrics, and their limits (model, quota, rate) are
checked when they are submitted: a refused submission is a 4xx at once, never a failed job later. Their images count
against the quota from submission until they end, when the usage is written in the same transaction as the end.

Every status change is one transaction with its event (replayed to ``/v1/jobs/{id}/events``) and its webhook
deliveries (sent by :class:`app.services.webhooks.WebhookSender`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import Connection

from app import metrics
from app.auth.guard import Guard
from app.auth.principals import Principal
from app.config import Settings
from app.errors import (
    ApiError,
    Cancelled,
    Conflict,
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    OutOfMemory,
    Overloaded,
    Unavailable,
)
from app.protocol.images import (
    ImageData,
    ImageEditRequest,
    ImageGenerateRequest,
    ImagesResponse,
    ImagesUsage,
    ImageVariationRequest,
)
from app.protocol.jobs import ImageJob, JobDeleted, JobError, JobEvent, JobList, JobProgress, JobUrls
from app.services.images import ImageService, Job
from app.services.inputs import InputImage, checked
from app.services.webhooks_delivery import TargetRefused, check_url
from app.store.files import ImageFiles
from app.store.jobs import (
    ACTIVE,
    FINISHED,
    Delivery,
    IdempotencyConflict,
    JobRecord,
    JobStore,
    Status,
    new_delivery,
    new_event,
)
from app.store.keys import UsageRow
from app.worker.protocol import Image, Partial, Progress, Started, image_bytes

log = logging.getLogger("imagegate.jobs")

Request = ImageGenerateRequest | ImageEditRequest | ImageVariationRequest
KINDS: dict[str, type[Request]] = {
    "image.generation": ImageGenerateRequest,
    "image.edit": ImageEditRequest,
    "image.variation": ImageVariationRequest,
}
DEFAULT_WEBHOOK_EVENTS = ("started", "completed")
PROGRESS_WRITE_INTERVAL = 0.5
"""Fewest seconds between two stored progress events of a job (the last step is always stored)."""


def error_code(error: ApiError) -> str:
    """The job error code for a failure of its run."""
    if isinstance(error, InvalidRequest):
        return "invalid_request"
    if isinstance(error, OutOfMemory):
        return "oom"
    if isinstance(error, DeadlineExceeded):
        return "deadline_exceeded"
    if isinstance(error, GenerationFailed):
        return "generation_failed"
    if isinstance(error, Cancelled):
        return "cancelled"
    if error.status in (502, 503):
        return "worker_lost"
    return "internal"


class RunLost(Exception):
    """The run broke off through no fault of the job (its worker went away): it runs again, up to the attempts."""


@dataclass(frozen=True)
class Executor:
    """How the job layer runs jobs of a kind besides images (see :meth:`JobService.register`)."""

    run: Callable[[JobRecord], Awaitable[None]]
    """Runs the claimed job to its end (:meth:`JobService.end`); raises ApiError to fail it, RunLost to rerun."""
    room: Callable[[int], list[str]]
    """Given how many jobs of the kind run here now, the models for which one more may start."""
    ended: Callable[[JobRecord], None] = lambda job: None
    """Called when a job of the kind ended here (its leftovers can go)."""


def _ts(t: float | None) -> int | None:
    return None if t is None else int(t)


@dataclass
class _Run:
    """A job this gateway runs now."""

    task: asyncio.Task[None]
    model: str
    kind: str
    stop: str = ""
    """Why it is being stopped: ``cancel`` (asked), ``lost`` (the lease went elsewhere) or ``shutdown``."""


class JobService:
    """Submits, runs, lists, cancels, deletes and sweeps jobs."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        images: ImageService,
        files: ImageFiles,
        guard: Guard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.images = images
        self.files = files
        self.guard = guard
        self.clock = clock
        self.inputs_dir = Path(settings.data_dir) / "job-inputs"
        self.inputs_dir.mkdir(parents=True, exist_ok=True)
        self.worker_id = f"gw_{secrets.token_hex(6)}"
        self._runs: dict[str, _Run] = {}
        self.executors: dict[str, Executor] = {}
        self.payloads: dict[str, Callable[[JobRecord], bytes]] = {}
        """Surface -> the webhook body of its jobs, where its clients expect their own (signed all the same)."""
        self._progress_hooks: dict[str, float] = {}
        """Job -> when its last progress webhook was written (they are throttled)."""
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.on_change: list[Callable[[], None]] = []
        """Called whenever a job changed here (the webhook sender looks at its outbox)."""
        if guard is not None:
            guard.reserved = store.reserved

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run_forever(), name="job-runner"),
            asyncio.create_task(self._maintain_forever(), name="job-maintenance"),
        ]

    async def stop(self) -> None:
        """Stop running jobs and hand them back to the queue (another replica, or the next start, runs them)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for run in self._runs.values():
            run.stop = "shutdown"
            run.task.cancel()
        await asyncio.gather(*self._tasks, *(r.task for r in self._runs.values()), return_exceptions=True)

    def register(self, kind: str, executor: Executor) -> None:
        """Run jobs of ``kind`` with ``executor`` (image jobs run through the image service)."""
        self.executors[kind] = executor

    def _notify(self) -> None:
        """Wake whoever waits on job changes in this process (event streams, the runner)."""
        self._changed.set()
        self._changed = asyncio.Event()
        self._wake.set()
        for callback in self.on_change:
            callback()

    # -- submitting ---------------------------------------------------------------------------------------------

    async def enqueue(self, record: JobRecord, also: Callable[[Connection], None] | None = None) -> None:
        """Queue a job of a registered kind, with what ``also`` writes in the same transaction."""
        queued = [new_event(record.id, "queued", record.created_at)]
        await asyncio.to_thread(self.store.insert, record, queued, (), also)
        metrics.JOBS_SUBMITTED.labels(record.kind).inc()
        self._notify()

    def _prepare(
        self, kind: str, req: Request, images: list[InputImage], mask: InputImage | None, principal: Principal
    ) -> Job:
        if kind == "image.generation":
            return self.images.prepare(req, principal)  # type: ignore[arg-type]
        if kind == "image.edit":
            return self.images.prepare_edit(req, images, mask, principal)  # type: ignore[arg-type]
        return self.images.prepare_variation(req, images)  # type: ignore[arg-type]

    async def submit(
        self,
        kind: str,
        req: Request,
        principal: Principal,
        base_url: str,
        *,
        images: Sequence[InputImage] = (),
        mask: InputImage | None = None,
        idempotency_key: str | None = None,
        surface: str = "openai",
        job_id: str | None = None,
        also: Callable[[Connection], None] | None = None,
    ) -> tuple[ImageJob, bool]:
        """Validate a request as its synchronous twin would, store it as a queued job, and return it.

        ``job_id`` names the job (else a new ``job_...`` id); ``also`` writes what goes with it in its transaction.

        Returns:
            The job, and whether it was created now (False: an earlier submission with the same idempotency key).

        Raises:
            ApiError: the request is refused (4xx), as the synchronous request would be.
            Conflict: the idempotency key was used with a different request.
        """
        given = [*images, *([mask] if mask else [])]
        try:
            if kind != "image.variation":
                # A job keeps the partial images it was asked for (streamed or not): its events route shows them.
                req = msgspec.structs.replace(req, stream=bool(req.partial_images))  # type: ignore[arg-type]
            fingerprint = self._fingerprint(kind, req, given)
            job = self._prepare(kind, req, list(images), mask, principal)
            self.images.check_fallbacks(job, req.fallbacks, principal)
            webhook_url = await self._webhook_target(req.webhook_url)
            req = msgspec.structs.replace(req, seed=job.params.seed)  # a rerun draws the same image
            now = self.clock()
            job_id = job_id or f"job_{secrets.token_hex(12)}"
            inputs = await asyncio.to_thread(self._save_inputs, job_id, job.inputs)
        finally:
            for i in given:
                i.close()
        record = JobRecord(
            id=job_id,
            kind=kind,
            surface=surface,
            owner=principal.id,
            principal=msgspec.json.encode(principal_fields(principal)).decode(),
            model=job.params.model,
            status="queued",
            request=msgspec.json.encode(req).decode(),
            inputs=inputs,
            n=job.params.n,
            created_at=now,
            deadline_at=now + self.settings.job_queue_timeout,
            expires_at=now + self.settings.job_retention,
            base_url=self.settings.public_url or base_url,
            idempotency_key=idempotency_key,
            request_hash=fingerprint if idempotency_key else None,
            webhook_url=webhook_url,
            webhook_events=list(req.webhook_events or DEFAULT_WEBHOOK_EVENTS) if webhook_url else None,
        )

        async def commit() -> tuple[JobRecord, bool]:
            return await asyncio.to_thread(self.store.insert, record, [new_event(job_id, "queued", now)], (), also)

        try:
            if self.guard is not None:
                stored, created = await self.guard.reserve(principal, record.model, record.n, commit)
            else:
                stored, created = await commit()
        except IdempotencyConflict:
            self._remove_files(record)
            raise Conflict(
                "This Idempotency-Key was used with a different request.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            ) from None
        except BaseException:
            self._remove_files(record)
            raise
        if created:
            metrics.JOBS_SUBMITTED.labels(kind).inc()
            self._notify()
        else:
            self._remove_files(record)
        return self.view(stored), created

    @staticmethod
    def _fingerprint(kind: str, req: Request, inputs: Sequence[InputImage]) -> str:
        digest = hashlib.sha256(kind.encode() + b"\0" + msgspec.json.encode(req))
        for i in inputs:
            i.file.seek(0)
            while chunk := i.file.read(1 << 20):
                digest.update(chunk)
            i.file.seek(0)
        return digest.hexdigest()

    async def _webhook_target(self, url: str | None) -> str | None:
        if not url:
            return None
        try:
            check_url(url, self.settings.webhook_allowlist)
        except TargetRefused as e:
            raise InvalidRequest(f"The webhook_url is refused: {e}", param="webhook_url") from None
        if await asyncio.to_thread(self.store.endpoint_disabled, url):
            raise InvalidRequest(
                "The webhook_url answered 410 Gone earlier, so nothing more is sent there.", param="webhook_url"
            )
        return url

    def _save_inputs(self, job_id: str, inputs: Sequence[InputImage]) -> list[str]:
        names = []
        for k, image in enumerate(inputs):
            name = f"{job_id}_{k}.{image.format}"
            image.file.seek(0)
            with open(self.inputs_dir / name, "wb") as out:
                while chunk := image.file.read(1 << 20):
                    out.write(chunk)
            names.append(name)
        return names

    def _remove_files(self, job: JobRecord) -> None:
        for directory in (self.inputs_dir, self.files.directory):
            for path in directory.glob(f"{job.id}_*"):
                path.unlink(missing_ok=True)

    # -- views --------------------------------------------------------------------------------------------------

    def _urls(self, job: JobRecord) -> JobUrls:
        base = f"{job.base_url.rstrip('/')}/v1/jobs/{job.id}"
        return JobUrls(get=base, events=f"{base}/events", cancel=f"{base}/cancel")

    def _progress(self, job: JobRecord) -> JobProgress | None:
        if job.status == "succeeded":
            total = job.total_steps or 1
            return JobProgress(step=total, total=total, percent=100, eta_seconds=0.0)
        if not job.total_steps or job.step is None:
            return None
        eta = None
        if job.started_at is not None and job.step and job.status == "running":
            eta = round((self.clock() - job.started_at) / job.step * (job.total_steps - job.step), 2)
        percent = min(99, job.step * 100 // job.total_steps)
        return JobProgress(step=job.step, total=job.total_steps, percent=percent, eta_seconds=eta)

    def _result(self, job: JobRecord) -> ImagesResponse | None:
        if job.result is None:
            return None
        stored = msgspec.json.decode(job.result)
        stored.pop("nsfw", None)  # what the safety checker flagged: the dialects that report it read it
        data = [
            ImageData(url=self.files.url(job.base_url, name, expires=int(job.expires_at)))
            for name in stored.pop("files")
        ]
        return ImagesResponse(data=data, usage=msgspec.convert(stored.pop("usage"), ImagesUsage), **stored)

    def view(self, job: JobRecord) -> ImageJob:
        return ImageJob(
            id=job.id,
            kind=job.kind,  # type: ignore[arg-type]
            model=job.model,
            status=job.status,  # type: ignore[arg-type]
            progress=self._progress(job),
            attempts=job.attempts,
            created_at=int(job.created_at),
            started_at=_ts(job.started_at),
            completed_at=_ts(job.completed_at),
            expires_at=int(job.expires_at),
            error=JobError(code=job.error_code, message=job.error_message or "")  # type: ignore[arg-type]
            if job.error_code
            else None,
            result=self._result(job),
            urls=self._urls(job),
            webhook_url=job.webhook_url,
        )

    # -- reading, cancelling, deleting --------------------------------------------------------------------------

    async def record(self, job_id: str, principal: Principal, kinds: Sequence[str] = tuple(KINDS)) -> JobRecord:
        """The job of ``kinds`` (images), if the principal may see it (its owner, or an admin).

        Another's job, or one of another kind, does not exist for it.
        """
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None or job.kind not in kinds or (job.owner != principal.id and not principal.admin):
            raise NotFound(f"No job with id '{job_id}'.", param="job_id", code="job_not_found")
        return job

    async def get(self, job_id: str, principal: Principal) -> ImageJob:
        return self.view(await self.record(job_id, principal))

    async def list(
        self,
        principal: Principal,
        *,
        statuses: Sequence[str] | None = None,
        after: str | None = None,
        limit: int = 20,
        surface: str | None = None,
    ) -> JobList:
        """The principal's jobs (every job for an admin), newest first, ``limit`` after the job ``after``."""
        cursor = await self.record(after, principal) if after else None
        owner = None if principal.admin else principal.id
        rows = await asyncio.to_thread(
            lambda: self.store.list(
                owner, statuses=statuses, surface=surface, kinds=list(KINDS), after=cursor, limit=limit + 1
            )
        )
        page = [self.view(j) for j in rows[:limit]]
        return JobList(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=len(rows) > limit,
        )

    async def cancel(self, job_id: str, principal: Principal) -> ImageJob:
        """Cancel a queued image job at once, or stop a running one (within a denoising step when it runs here)."""
        return self.view(await self.halt(job_id, principal))

    async def halt(
        self, job_id: str, principal: Principal, kinds: Sequence[str] = tuple(KINDS), param: str = "job_id"
    ) -> JobRecord:
        """Cancel a queued job of ``kinds`` at once, or stop a running one (at its next step when it runs here).

        Raises:
            Conflict: the job already finished.
        """
        job = await self.record(job_id, principal, kinds)
        if job.status in FINISHED:
            raise Conflict(f"The job already finished ({job.status}).", param=param, code="job_finished")
        ended = await self.end(
            job_id,
            "cancelled",
            from_status=("queued",),
            error=("cancelled", "The job was cancelled before it started."),
        )
        if ended is not None:
            return ended
        running = await asyncio.to_thread(self.store.request_cancel, job_id)
        run = self._runs.get(job_id)
        if run is not None:
            run.stop = "cancel"
            run.task.cancel()
            await asyncio.wait({run.task}, timeout=10)
        return await asyncio.to_thread(self.store.get, job_id) or running or job

    async def delete(self, job_id: str, principal: Principal) -> JobDeleted:
        job = await self.record(job_id, principal)
        await self._delete([job])
        return JobDeleted(id=job_id)

    async def delete_all(self, principal: Principal, surface: str | None = None) -> int:
        """Delete the principal's jobs (every job for an admin); returns how many."""
        ids = await asyncio.to_thread(self.store.ids, None if principal.admin else principal.id, list(KINDS), surface)
        jobs = [j for j in await asyncio.to_thread(lambda: [self.store.get(i) for i in ids]) if j is not None]
        await self._delete(jobs)
        return len(jobs)

    async def _delete(self, jobs: Sequence[JobRecord]) -> None:
        for job in jobs:
            if job.status == "running":
                await asyncio.to_thread(self.store.request_cancel, job.id)
                run = self._runs.get(job.id)
                if run is not None:
                    run.stop = "lost"  # its row is going: nothing to record
                    run.task.cancel()
        gone = await asyncio.to_thread(self.store.delete, [j.id for j in jobs])
        for job in gone:
            await asyncio.to_thread(self._remove_files, job)
        self._notify()

    # -- events -------------------------------------------------------------------------------------------------

    async def wait(self, job_id: str, principal: Principal) -> JobRecord:
        """The job once it has ended (or as it was when it was deleted), without building its events."""
        job = await self.record(job_id, principal)
        while True:
            changed = self._changed  # taken before the read: a change after it wakes the wait below
            job = await asyncio.to_thread(self.store.get, job_id) or job
            if job.status in FINISHED:
                return job
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.job_poll_interval):  # unlike wait_for, never swallows a cancel
                    await changed.wait()

    async def events(self, job_id: str, principal: Principal) -> AsyncIterator[JobEvent]:
        """What happened to the job so far, then what happens, until it ends (or is deleted)."""
        await self.record(job_id, principal)
        return self._follow(job_id)

    async def _follow(self, job_id: str) -> AsyncIterator[JobEvent]:
        last = 0
        while True:
            changed = self._changed
            for event in await asyncio.to_thread(self.store.events, job_id, last):
                last = event.id
                if event.type.startswith("_"):  # a dialect's own record of the job, not an event of it
                    continue
                if event.type in FINISHED:
                    job = await asyncio.to_thread(self.store.get, job_id)
                    if job is not None:
                        yield JobEvent(
                            type=f"image.job.{event.type}",
                            job_id=job_id,
                            created_at=int(event.created_at),
                            job=self.view(job),
                        )
                    return
                yield await asyncio.to_thread(self._event, event.type, job_id, event.created_at, event.data)
            if await asyncio.to_thread(self.store.get, job_id) is None:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.job_poll_interval):  # unlike wait_for, never swallows a cancel
                    await changed.wait()

    def _event(self, type: str, job_id: str, at: float, data: dict[str, Any]) -> JobEvent:
        event = JobEvent(type=f"image.job.{type}", job_id=job_id, created_at=int(at))
        if type == "started":
            event.attempt = data.get("attempt", 1)
        elif type == "progress":
            step, total = data["step"], data["total"]
            event.progress = JobProgress(step=step, total=total, percent=min(99, step * 100 // total))
        elif type == "partial_image":
            path = self.files.directory / data["file"]
            event.b64_json = path.read_bytes() if path.is_file() else b""
            event.image_index = data["image_index"]
            event.partial_image_index = data["partial_index"]
        return event

    # -- webhooks -----------------------------------------------------------------------------------------------

    def _announce(self, what: str) -> Callable[[JobRecord], list[Delivery]]:
        """Makes the webhook deliveries that announce ``what`` happened to a job, if its webhook wants to know."""
        wanted = {"started": "started", "progress": "progress"}.get(what, "completed" if what in FINISHED else None)

        def deliveries(job: JobRecord) -> list[Delivery]:
            if not job.webhook_url or wanted not in (job.webhook_events or ()):
                return []
            now = self.clock()
            if job.surface in self.payloads:  # a dialect whose clients expect their own payload
                body = self.payloads[job.surface](job)
            else:
                body = msgspec.json.encode(
                    {
                        "type": f"image.job.{what}",
                        "timestamp": datetime.fromtimestamp(now, UTC).isoformat(),
                        "data": self.view(job),
                    }
                )
            return [new_delivery(job.id, job.owner, job.webhook_url, f"image.job.{what}", body, now)]

        return deliveries

    # -- running ------------------------------------------------------------------------------------------------

    def _room(self) -> list[str]:
        """Models where jobs may start one more run now: fewer running than their share of ready capacity."""
        running = Counter(run.model for run in self._runs.values() if run.kind in KINDS)
        room = []
        for model in self.images.served():
            capacity = sum(m.capacity for m in self.images.pool.ready(model))
            if capacity and running[model] < max(1, math.floor(self.settings.job_share * capacity)):
                room.append(model)
        return room

    async def _run_forever(self) -> None:
        while not self._closing:
            self._wake.clear()
            try:
                await self._claim_all()
            except Exception:
                log.exception("claiming jobs failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.job_poll_interval):  # unlike wait_for, never swallows a cancel
                    await self._wake.wait()

    def _rooms(self) -> list[tuple[list[str], list[str]]]:
        """(kinds, models) for which one more job may start here now."""
        rooms = [(list(KINDS), self._room())]
        for kind, executor in self.executors.items():
            rooms.append(([kind], executor.room(sum(run.kind == kind for run in self._runs.values()))))
        return [(kinds, models) for kinds, models in rooms if models]

    async def _claim_all(self) -> None:
        while rooms := self._rooms():
            for kinds, models in rooms:
                job = await asyncio.to_thread(
                    self.store.claim,
                    self.worker_id,
                    self.clock(),
                    self.settings.job_lease,
                    models,
                    self.settings.job_max_attempts,
                    self._announce("started"),
                    kinds,
                )
                if job is not None:
                    break
            else:
                return
            task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
            self._runs[job.id] = _Run(task, job.model, job.kind)
            self._notify()

    async def _run(self, job: JobRecord) -> None:
        run_id = job.id
        renewer = asyncio.create_task(self._renew(job), name=f"job-lease-{job.id}")
        try:
            await self._execute(job)
        except asyncio.CancelledError:
            await self._stopped(job, self._runs[run_id].stop)
        except (Overloaded, Unavailable) as e:
            log.info("job %s waits: %s", job.id, e.message)
            await asyncio.to_thread(self.store.release, job.id, self.worker_id)
            await asyncio.sleep(min(5.0, e.retry_after or 1.0))
        except RunLost as e:
            if job.attempts >= self.settings.job_max_attempts:
                await self._fail(job, "worker_lost", f"The job's run was lost {job.attempts} times; the last: {e}")
            else:
                log.warning("job %s: its run %d was lost (%s); it runs again", job.id, job.attempts, e)
                await asyncio.to_thread(self.store.release, job.id, self.worker_id, counted=True)
                await asyncio.sleep(1.0)
        except ApiError as e:
            await self._fail(job, error_code(e), e.message)
        except Exception as e:
            log.exception("job %s failed", job.id)
            await self._fail(job, "internal", f"The server had an error while running the job: {type(e).__name__}")
        finally:
            renewer.cancel()
            self._runs.pop(run_id, None)
            self._progress_hooks.pop(run_id, None)
            self._notify()

    async def _stopped(self, job: JobRecord, why: str) -> None:
        if why == "cancel":
            error = ("cancelled", "The job was cancelled while it ran.")
            await self.end(job.id, "cancelled", worker=self.worker_id, error=error)
        elif why == "shutdown":
            await asyncio.to_thread(self.store.release, job.id, self.worker_id)

    async def _renew(self, job: JobRecord) -> None:
        """Keep the lease while the job runs; stop the run when the lease was lost or a cancel was asked."""
        while True:
            await asyncio.sleep(self.settings.job_lease / 3)
            cancel = await asyncio.to_thread(
                self.store.renew, job.id, self.worker_id, self.clock() + self.settings.job_lease
            )
            run = self._runs.get(job.id)
            if run is None:
                return
            if cancel is None or cancel:
                run.stop = "lost" if cancel is None else "cancel"
                run.task.cancel()
                return

    async def _execute(self, record: JobRecord) -> None:
        if record.kind in self.executors:
            await self.executors[record.kind].run(record)
            return
        req = msgspec.json.decode(record.request, type=KINDS[record.kind])
        inputs = [
            await checked(open(self.inputs_dir / name, "rb"), self.settings, "image")  # noqa: ASYNC230, SIM115
            for name in record.inputs
        ]
        fields = msgspec.json.decode(record.principal)
        principal = Principal(**{**fields, "models": tuple(fields["models"])})
        job = self._prepare(record.kind, req, inputs[:1], inputs[1] if len(inputs) > 1 else None, principal)
        outputs: dict[int, tuple[str, int, bool]] = {}
        prompt_tokens, last_write = 0, 0.0
        async with contextlib.aclosing(self.images.run_job(job, principal, req.fallbacks)) as events:
            async for event in events:
                if isinstance(event, Started):
                    prompt_tokens = event.prompt_tokens
                elif isinstance(event, Progress):
                    now = time.monotonic()
                    if event.step == event.total or now - last_write >= PROGRESS_WRITE_INTERVAL:
                        last_write = now
                        await self.progress(record, event.step, event.total)
                elif isinstance(event, Partial):
                    name = f"{record.id}_partial_{event.image_index}_{event.partial_index}.{job.params.output_format}"
                    await asyncio.to_thread(self._write, name, event.data)
                    await self.add_event(
                        record,
                        "partial_image",
                        file=name,
                        image_index=event.image_index,
                        partial_index=event.partial_index,
                    )
                elif isinstance(event, Image):
                    name = f"{record.id}_image_{event.index}.{job.params.output_format}"
                    await asyncio.to_thread(self._write, name, event.data)
                    outputs[event.index] = (name, event.seed, event.nsfw)
        ordered = [outputs[i] for i in sorted(outputs)]
        await self._succeed(record, job, [o[0] for o in ordered], prompt_tokens, [o[2] for o in ordered])

    def image_files(self, job: JobRecord) -> list[bytes]:
        """The images of a job that succeeded, in order (blocking)."""
        names = msgspec.json.decode(job.result)["files"] if job.result else []
        return [(self.files.directory / name).read_bytes() for name in names]

    @staticmethod
    def flagged(job: JobRecord) -> list[bool]:
        """Which images of a job that succeeded the safety checker flagged."""
        return list(msgspec.json.decode(job.result).get("nsfw", [])) if job.result else []

    def latest_partial(self, job: JobRecord) -> bytes | None:
        """The newest partial image a running job sent (blocking); None before its first."""
        event = self.store.last_event(job.id, "partial_image")
        path = self.files.directory / event.data["file"] if event is not None else None
        return path.read_bytes() if path is not None and path.is_file() else None

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.files.directory / f".{name}.tmp"
        tmp.write_bytes(image_bytes(data))
        tmp.rename(self.files.directory / name)

    async def progress(self, record: JobRecord, step: int, total: int, **data: Any) -> None:
        """Record a step of a job this gateway runs (with ``data`` in its event), and announce it if asked."""
        now = self.clock()
        announce = None
        if "progress" in (record.webhook_events or ()):
            last = self._progress_hooks.get(record.id, 0.0)
            if now - last >= self.settings.webhook_progress_interval or step == total:
                self._progress_hooks[record.id] = now
                announce = self._announce("progress")
        await asyncio.to_thread(
            self.store.progress,
            record.id,
            self.worker_id,
            step,
            total,
            [new_event(record.id, "progress", now, step=step, total=total, **data)],
            announce,
        )
        self._notify()

    async def add_event(self, record: JobRecord, type: str, **data: Any) -> None:
        await asyncio.to_thread(self.store.add_events, [new_event(record.id, type, self.clock(), **data)])
        self._notify()

    async def _succeed(
        self, record: JobRecord, job: Job, files: list[str], prompt_tokens: int, nsfw: list[bool]
    ) -> None:
        p = job.params
        now = self.clock()
        usage = job.usage(prompt_tokens, len(files))
        result = {
            "created": int(now),
            "files": files,
            "size": job.size,
            "quality": job.quality,
            "output_format": p.output_format,
            "background": job.background,
            "usage": usage,
            "nsfw": nsfw,
        }
        steps = p.steps * (p.strength or 1.0) if p.task == "img2img" else p.steps
        ended = await self.end(
            record.id,
            "succeeded",
            worker=self.worker_id,
            result=msgspec.json.encode(result).decode(),
            usage=[(record.owner, now, 1, len(files), int(len(files) * p.width * p.height * steps))],
        )
        if ended is None:  # the lease went to another run, or the job was deleted: this run's images are not kept
            log.warning("job %s ended here after its lease was lost; discarding this run's result", record.id)
            for name in files:
                (self.files.directory / name).unlink(missing_ok=True)
            return
        if self.guard is not None:
            self.guard.count_images(msgspec.json.decode(record.principal)["alias"], len(files))

    async def _fail(self, record: JobRecord, code: str, message: str) -> None:
        if await self.end(record.id, "failed", worker=self.worker_id, error=(code, message)) is not None:
            log.warning("job %s failed (%s): %s", record.id, code, message)

    async def end(
        self,
        job_id: str,
        status: Status,
        *,
        worker: str | None = None,
        from_status: Sequence[str] = ("running",),
        error: tuple[str, str] | None = None,
        result: str | None = None,
        usage: Sequence[UsageRow] = (),
        also: Callable[[Connection], None] | None = None,
    ) -> JobRecord | None:
        """End a job in one transaction with its event, webhooks, usage and what ``also`` writes.

        Returns None when the job was not in ``from_status`` (or, with ``worker``, no longer that worker's run).
        """
        now = self.clock()
        ended = await asyncio.to_thread(
            lambda: self.store.finish(
                job_id,
                status,
                now,
                worker=worker,
                from_status=from_status,
                result=result,
                error=error,
                events=[new_event(job_id, status, now)],
                announce=self._announce(status),
                usage=usage,
                also=also,
            )
        )
        if ended is not None:
            self._ended(ended)
        return ended

    def _ended(self, job: JobRecord) -> None:
        if job.kind in self.executors:
            self.executors[job.kind].ended(job)
        metrics.JOBS_FINISHED.labels(job.kind, job.status).inc()
        if job.completed_at is not None:
            metrics.JOB_SECONDS.labels(job.kind, job.status).observe(job.completed_at - job.created_at)
        self._notify()

    # -- maintenance --------------------------------------------------------------------------------------------

    async def _maintain_forever(self) -> None:
        interval = max(0.2, min(self.settings.job_lease / 2, 30.0))
        while not self._closing:
            try:
                await self.maintain()
            except Exception:
                log.exception("job maintenance failed")
            await asyncio.sleep(interval)

    async def maintain(self) -> None:
        """End what can no longer run, delete what is past its retention, and refresh the job gauges.

        Lost runs past their attempts fail (``worker_lost``), queued jobs past their deadline expire, and jobs past
        their retention go with their files.
        """
        now = self.clock()
        for job in await asyncio.to_thread(self.store.lost, now, self.settings.job_max_attempts):
            if job.cancel_requested:
                status, code = "cancelled", ("cancelled", "The job was cancelled while it ran.")
            else:
                status = "failed"
                code = ("worker_lost", f"The job's run was lost {job.attempts} times (a worker or gateway went away).")
            await self.end(job.id, status, error=code)
        for job in await asyncio.to_thread(self.store.overdue, now):
            error = ("expired", "The job waited in the queue past its deadline.")
            await self.end(job.id, "expired", from_status=("queued",), error=error)
        expired = await asyncio.to_thread(self.store.expired, now)
        if expired:
            for job in await asyncio.to_thread(self.store.delete, expired):
                await asyncio.to_thread(self._remove_files, job)
            log.info("removed %d jobs past their retention", len(expired))
        counts, oldest, depth = await asyncio.to_thread(self.store.stats)
        for kind in (*KINDS, *self.executors):
            for status in (*ACTIVE, *FINISHED):
                metrics.JOBS.labels(kind, status).set(counts.get((kind, status), 0))
        metrics.JOB_QUEUE_AGE.set(0 if oldest is None else max(0.0, now - oldest))
        metrics.WEBHOOK_OUTBOX.set(depth)


def principal_fields(principal: Principal) -> dict[str, Any]:
    return {
        "id": principal.id,
        "alias": principal.alias,
        "kind": principal.kind,
        "models": list(principal.models),
        "admin": principal.admin,
    }
