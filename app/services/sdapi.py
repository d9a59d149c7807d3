"""What the AUTOMATIC1111 dialect (:mod:`app.protocol.a1111`) needs besides translation: per-caller state.

A1111 keeps one current model, one progress and one interrupt for the whole server; imagegate keeps them per
principal. A generation is a job of the job layer (surface ``sdapi``) that the request waits for: its progress and
newest preview are the job's, and an interrupt cancels the caller's jobs of this dialect. The current model of each
caller (``/options``) lives in this process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import Any

from app.auth.principals import Principal
from app.errors import Cancelled, Conflict, GenerationFailed, InvalidRequest, NotFound
from app.protocol import a1111
from app.protocol.images import ImageEditJsonRequest, ImageGenerateRequest
from app.services.images import ImageService
from app.services.inputs import from_refs
from app.services.jobs import JobService
from app.store.jobs import ACTIVE, JobRecord

SURFACE = "sdapi"


class SdApiService:
    def __init__(self, images: ImageService, jobs: JobService) -> None:
        self.images = images
        self.jobs = jobs
        self._current: dict[str, str] = {}
        """Principal -> the model its ``/options`` chose."""

    # -- models and options ----------------------------------------------------------------------------------------

    def _allowed(self, principal: Principal) -> list[str]:
        return [m for m in self.images.served() if principal.allows(m)]

    def model(self, principal: Principal, title: Any = None) -> str:
        """The model a title names (else the caller's current one, else the first it may use)."""
        allowed = self._allowed(principal)
        if title:
            name = a1111.model_title(title)
            if name not in allowed:
                raise NotFound(f"Model not found: {title}.", param="sd_model_checkpoint", code="model_not_found")
            return name
        current = self._current.get(principal.id)
        if current in allowed:
            return current  # type: ignore[return-value]
        if not allowed:
            raise NotFound("No model is available to this caller.", code="model_not_found")
        return allowed[0]

    def sd_models(self, principal: Principal) -> list[a1111.SdModel]:
        return [
            a1111.SdModel(title=m, model_name=m, hash=None, sha256=None, filename=self.images.config(m).path or m)
            for m in self._allowed(principal)
        ]

    def options(self, principal: Principal) -> a1111.Options:
        return a1111.Options(sd_model_checkpoint=self.model(principal))

    def set_options(self, principal: Principal, options: dict[str, Any]) -> None:
        """Take the caller's new current model; other options are accepted and left as they are."""
        title = options.get("sd_model_checkpoint")
        if title:
            self._current[principal.id] = self.model(principal, title)

    def samplers(self, principal: Principal) -> list[a1111.Sampler]:
        """The samplers the caller's current model takes."""
        offered = self.images.describe(self.model(principal), created=0).schedulers
        names = set(offered) if isinstance(offered, list) else None
        return [
            a1111.Sampler(name=name, aliases=aliases)
            for name, (scheduler, aliases) in a1111.SAMPLERS.items()
            if names is None or scheduler in names
        ]

    @staticmethod
    def schedules() -> list[a1111.Schedule]:
        return [a1111.Schedule(name=name, label=label) for name, label in a1111.SCHEDULES.items()]

    # -- generating ------------------------------------------------------------------------------------------------

    async def txt2img(self, body: bytes, principal: Principal, base_url: str) -> a1111.GenerationResponse:
        req, raw = a1111.decode(body, a1111.Txt2Img)
        model = self.model(principal, req.override_settings.get("sd_model_checkpoint"))
        first = a1111.seed(req)
        wire = a1111.generation(model, req, first)
        job, _ = await self.jobs.submit("image.generation", wire, principal, base_url, surface=SURFACE)
        return await self._answer(job.id, wire, req, raw, model, first, principal)

    async def img2img(self, body: bytes, principal: Principal, base_url: str) -> a1111.GenerationResponse:
        req, raw = a1111.decode(body, a1111.Img2Img)
        model = self.model(principal, req.override_settings.get("sd_model_checkpoint"))
        first = a1111.seed(req)
        wire = a1111.edit(model, req, first)
        images, mask = await from_refs(wire.images, wire.mask, self.images.settings)
        job, _ = await self.jobs.submit(
            "image.edit", wire, principal, base_url, images=images, mask=mask, surface=SURFACE
        )
        for key in ("init_images", "mask"):  # A1111 leaves the inputs out of the echo
            raw.pop(key, None)
        return await self._answer(job.id, wire, req, raw, model, first, principal)

    async def _answer(
        self,
        job_id: str,
        wire: ImageGenerateRequest | ImageEditJsonRequest,
        req: a1111.Txt2Img,
        raw: dict[str, Any],
        model: str,
        first: int,
        principal: Principal,
    ) -> a1111.GenerationResponse:
        """Wait for the job and answer with its images; a client that goes away cancels it."""
        try:
            record = await self.jobs.wait(job_id, principal)
        except (asyncio.CancelledError, Cancelled):
            await asyncio.shield(self._stop(job_id, principal))
            raise
        if record.status not in ("succeeded", "cancelled"):  # interrupted: no images, as A1111 answers then
            message = record.error_message or f"The generation {record.status}."
            raise InvalidRequest(message) if record.error_code == "invalid_request" else GenerationFailed(message)
        images = await asyncio.to_thread(self.jobs.image_files, record)
        sampler = req.sampler_name or req.sampler_index or ""
        return a1111.GenerationResponse(
            images=[base64.b64encode(data).decode() for data in images],
            parameters=raw,
            info=a1111.info(req, model, first, wire.n, sampler),
        )

    async def _stop(self, job_id: str, principal: Principal) -> None:
        with contextlib.suppress(NotFound, Conflict):  # gone, or finished meanwhile: nothing to stop
            await self.jobs.halt(job_id, principal)

    # -- progress and interrupt ------------------------------------------------------------------------------------

    async def _active(self, principal: Principal) -> list[JobRecord]:
        page = await self.jobs.list(principal, statuses=list(ACTIVE), surface=SURFACE, limit=100)
        return [await self.jobs.record(j.id, principal) for j in page.data]

    async def progress(self, principal: Principal, skip_current_image: bool = False) -> a1111.ProgressResponse:
        active = await self._active(principal)
        if not active:
            return a1111.ProgressResponse(
                progress=0.0, eta_relative=0.0, state=a1111.ProgressState(), current_image=None
            )
        job = active[-1]  # the oldest still going: the one running first
        step, total = job.step or 0, job.total_steps or 0
        done = step / total if total else 0.0
        elapsed = time.time() - (job.started_at or job.created_at)
        image = None if skip_current_image else await asyncio.to_thread(self.jobs.latest_partial, job)
        return a1111.ProgressResponse(
            progress=round(done, 4),
            eta_relative=round(elapsed / done - elapsed, 2) if done else 0.0,
            state=a1111.ProgressState(
                job=job.id,
                job_count=len(active),
                job_timestamp=time.strftime("%Y%m%d%H%M%S", time.gmtime(job.created_at)),
                sampling_step=step,
                sampling_steps=total,
            ),
            current_image=base64.b64encode(image).decode() if image else None,
        )

    async def interrupt(self, principal: Principal) -> None:
        """Stop the caller's generations of this dialect (queued ones at once, running ones at their next step)."""
        for job in await self._active(principal):
            await self._stop(job.id, principal)
