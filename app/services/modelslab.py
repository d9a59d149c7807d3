"""What the ModelsLab dialect (:mod:`app.protocol.modelslab`) needs besides translation.

The key in the body, the wait-then-processing answer, fetch, its webhook payload, and its informational routes.

A generation is a job of the job layer (surface ``modelslab``) with a numeric id, as ModelsLab's clients expect. Its
ModelsLab request (without the key) is kept as an event of the job, written with it, so that fetch answers and
webhooks can echo ``meta`` and ``track_id`` and honour ``base64`` however long after.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import Mapping
from typing import Any

import msgspec
from sqlalchemy import Connection, insert

from app.auth.principals import ANONYMOUS, Authenticator, Principal
from app.errors import BackendFailed, InvalidRequest, NotFound
from app.protocol import modelslab as ml
from app.protocol.images import ImageEditJsonRequest, ImageRef
from app.services.enhance import Enhancer, UpstreamFailed
from app.services.images import ImageService
from app.services.inputs import from_refs
from app.services.jobs import JobService
from app.store.files import ImageFiles
from app.store.jobs import ACTIVE, JobRecord, new_event
from app.store.schema import job_events

SURFACE = "modelslab"
REQUEST_EVENT = "_modelslab_request"
"""The job event holding the ModelsLab request of a job (its key removed); events named ``_…`` are not streamed."""


class ModelsLabService:
    def __init__(
        self,
        images: ImageService,
        jobs: JobService,
        auth: Authenticator,
        enhancer: Enhancer,
        job_files: ImageFiles,
    ) -> None:
        self.images = images
        self.jobs = jobs
        self.auth = auth
        self.enhancer = enhancer
        self.files = job_files
        self.settings = images.settings
        jobs.payloads[SURFACE] = self._webhook_body

    async def _principal(self, key: str | None, headers: Mapping[str, str]) -> Principal:
        """The caller: the body's ``key`` (any imagegate credential), else the request's headers."""
        if await self.auth.anonymous():
            return ANONYMOUS
        found = dict(headers)
        if key:
            found["authorization"] = f"Bearer {key}"
        return await self.auth.authenticate(found)

    # -- generating ------------------------------------------------------------------------------------------------

    async def generate(self, task: str, body: bytes, headers: Mapping[str, str], base_url: str) -> dict[str, Any]:
        """Run a text2img, img2img or inpaint request; ``success`` if it ends within the wait, else ``processing``."""
        req = ml.decode(body)
        principal = await self._principal(req.key, headers)
        model = self._model(req.model_id, principal)
        if not req.prompt or not req.prompt.strip():
            raise InvalidRequest("The prompt field is required.", param="prompt")
        ml.check(req)
        prompt, enhanced = await self._prompt(req, model)
        seed = ml.number(req.seed, "seed")
        wire = ml.generation(req, model, prompt, seed if seed is None or seed >= 0 else None)
        if req.webhook:
            wire = msgspec.structs.replace(wire, webhook_url=req.webhook, webhook_events=["completed"])
        job_id = str(secrets.randbelow(9 * 10**14) + 10**14)  # ModelsLab ids are integers
        stored = msgspec.structs.asdict(req)
        stored.pop("key")
        stored["enhance_prompt"] = enhanced
        also = self._keep(job_id, stored)
        if task == "text2img":
            await self.jobs.submit(
                "image.generation", wire, principal, base_url, surface=SURFACE, job_id=job_id, also=also
            )
        else:
            edit, images, mask = await self._edit(task, req, wire)
            await self.jobs.submit(
                "image.edit",
                edit,
                principal,
                base_url,
                images=images,
                mask=mask,
                surface=SURFACE,
                job_id=job_id,
                also=also,
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.modelslab_wait):
                await self.jobs.wait(job_id, principal)
        return await self._envelope(await self.jobs.record(job_id, principal), base_url)

    def _keep(self, job_id: str, request: dict[str, Any]):
        event = new_event(job_id, REQUEST_EVENT, self.jobs.clock(), **request)

        def write(conn: Connection) -> None:
            conn.execute(insert(job_events).values(event))

        return write

    def _model(self, model_id: str | None, principal: Principal) -> str:
        allowed = [m for m in self.images.served() if principal.allows(m)]
        if not model_id:
            raise InvalidRequest("The model_id field is required.", param="model_id")
        if model_id not in allowed:
            raise NotFound(f"Model not found: {model_id}", param="model_id", code="model_not_found")
        return model_id

    async def _prompt(self, req: ml.Request, model: str) -> tuple[str, bool]:
        prompt = req.prompt.strip()  # type: ignore[union-attr]
        if not ml.flag(req.enhance_prompt, "enhance_prompt"):
            return prompt, False
        config = self.images.config(model)
        try:
            out = await self.enhancer.enhance(
                prompt, style=config.style, trigger_words=config.trigger_words, template=config.enhance_template
            )
        except UpstreamFailed as e:
            raise BackendFailed(f"The prompt enhancer failed: {e}", code="enhancer_failed") from None
        return out.enhanced, True

    async def _edit(self, task: str, req: ml.Request, wire: Any) -> tuple[ImageEditJsonRequest, list, Any]:
        as_base64 = ml.flag(req.base64, "base64")

        def ref(value: str | None, name: str) -> ImageRef:
            if not value:
                raise InvalidRequest(f"{name} is required for {task}.", param=name)
            if as_base64 and not value.startswith("data:"):
                value = f"data:image/png;base64,{value}"
            return ImageRef(image_url=value)

        strength = ml.number(req.strength, "strength", float)
        if strength is not None and not 0 < strength <= 1:
            raise InvalidRequest("strength must be within 0-1.", param="strength")
        fields = {f: getattr(wire, f) for f in wire.__struct_fields__ if f not in ("moderation", "style")}
        edit = ImageEditJsonRequest(
            **fields,
            images=[ref(req.init_image, "init_image")],
            mask=ref(req.mask_image, "mask_image") if task == "inpaint" else None,
            strength=strength,
        )
        images, mask = await from_refs(edit.images, edit.mask, self.settings)
        return edit, images, mask

    # -- answers ---------------------------------------------------------------------------------------------------

    def _stored(self, job: JobRecord) -> dict[str, Any]:
        event = self.jobs.store.last_event(job.id, REQUEST_EVENT)
        return event.data if event is not None else {}

    def _urls(self, job: JobRecord, base_url: str) -> list[str]:
        """Where the job's images are (or will be: ModelsLab's future links 404 until then)."""
        fmt = msgspec.json.decode(job.request).get("output_format") or "png"
        base = self.settings.public_url or base_url
        names = [f"{job.id}_image_{i}.{fmt}" for i in range(job.n)]
        return [self.files.url(base, name, expires=int(job.expires_at)) for name in names]

    def _outputs(self, job: JobRecord, stored: dict[str, Any], base_url: str) -> list[str]:
        if ml.flag(stored.get("base64"), "base64"):
            return [base64.b64encode(data).decode() for data in self.jobs.image_files(job)]
        return self._urls(job, base_url)

    def _meta(self, job: JobRecord, stored: dict[str, Any], output: list[str]) -> dict[str, Any]:
        req = msgspec.convert(stored, ml.Request)
        return ml.meta(req, msgspec.json.decode(job.request), job.id, output, bool(stored.get("enhance_prompt")))

    async def _envelope(self, job: JobRecord, base_url: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._answer, job, base_url)

    def _answer(self, job: JobRecord, base_url: str) -> dict[str, Any]:
        """The ModelsLab answer for the job as it is now (blocking)."""
        stored = self._stored(job)
        numeric = int(job.id)
        if job.status in ACTIVE:
            eta = round(self.images.pool.estimate(job.model), 2)
            return {
                "status": "processing",
                "tip": "Your image is processing in background; fetch it with fetch_result.",
                "eta": eta,
                "messege": "Try to fetch request after seconds estimated",
                "message": "Try to fetch request after seconds estimated",
                "webhook_status": "",
                "fetch_result": f"{(self.settings.public_url or base_url).rstrip('/')}/api/v6/images/fetch/{job.id}",
                "id": numeric,
                "output": [],
                "future_links": self._urls(job, base_url),
                "meta": self._meta(job, stored, []),
            }
        if job.status != "succeeded":
            message = job.error_message or f"The generation {job.status}."
            return {"status": "error", "id": numeric, "message": message, "messege": message}
        output = self._outputs(job, stored, base_url)
        return {
            "status": "success",
            "generationTime": round((job.completed_at or 0) - (job.started_at or job.created_at), 3),
            "id": numeric,
            "output": output,
            "proxy_links": output,
            "nsfw_content_detected": any(self.jobs.flagged(job)),
            "webhook_status": "success" if job.webhook_url else "",
            "meta": self._meta(job, stored, output),
        }

    async def fetch(self, job_id: Any, body: bytes, headers: Mapping[str, str], base_url: str) -> dict[str, Any]:
        req = ml.decode(body)
        principal = await self._principal(req.key, headers)
        job_id = str(job_id if job_id is not None else req.request_id or "").strip()
        if not job_id.isdigit():
            raise InvalidRequest("Give the id to fetch, in the path or as request_id.", param="request_id")
        try:
            job = await self.jobs.record(job_id, principal)
        except NotFound:
            raise NotFound(f"Request not found: {job_id}", param="request_id", code="not_found") from None
        if job.surface != SURFACE:
            raise NotFound(f"Request not found: {job_id}", param="request_id", code="not_found")
        return await self._envelope(job, base_url)

    def _webhook_body(self, job: JobRecord) -> bytes:
        """ModelsLab's webhook: the fetch answer with ``track_id`` on success, ``status: failed`` otherwise."""
        stored = self._stored(job)
        if job.status == "succeeded":
            body = self._answer(job, job.base_url)
        else:
            body = {"status": "failed", "id": int(job.id), "message": job.error_message or job.status}
        body["track_id"] = stored.get("track_id")
        return msgspec.json.encode(body)

    # -- informational routes --------------------------------------------------------------------------------------

    async def system_load(self, body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
        principal = await self._principal(ml.decode(body).key, headers)
        models = [m for m in self.images.served() if principal.allows(m)]
        queued = sum(self.images.pool.queue_depth(m) for m in models)
        wait = max((self.images.pool.estimate(m) for m in models), default=0.0)
        return {"queue_num": queued, "queue_time": round(wait, 2), "status": "ok"}

    async def system_details(self, body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
        load = await self.system_load(body, headers)
        principal = await self._principal(ml.decode(body).key, headers)
        count = len([m for m in self.images.served() if principal.allows(m)])
        return {"model_count": count, "queue_time": load["queue_time"], "status": "ok"}

    async def models(self, body: bytes, headers: Mapping[str, str]) -> list[str]:
        principal = await self._principal(ml.decode(body).key, headers)
        return [m for m in self.images.served() if principal.allows(m)]

    async def schedulers(self, body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
        await self._principal(ml.decode(body).key, headers)
        return {"schedulers": [name for name, ours in ml.SCHEDULERS.items() if ours is not None]}
