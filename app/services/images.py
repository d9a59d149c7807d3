"""The image use cases: validate a request against its model, run it on the pool, shape the answer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from app import metrics
from app.config import ModelConfig, Settings
from app.errors import (
    ApiError,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    Overloaded,
    Unavailable,
    from_worker,
)
from app.pool import Lease, Pool
from app.protocol.images import (
    ImageData,
    ImageGenCompletedEvent,
    ImageGenerateRequest,
    ImageGenPartialImageEvent,
    ImagesResponse,
    ImagesUsage,
    InputTokensDetails,
    StreamEvent,
)
from app.store.files import ImageFiles
from app.worker.protocol import (
    Done,
    Failed,
    GenerationParams,
    Image,
    Partial,
    Started,
    WorkerEvent,
    canonical_scheduler,
    parse_size,
)

log = logging.getLogger("imagegate.images")

SEED_RANGE = 2**32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_tokens(width: int, height: int) -> int:
    """Output tokens of one image: one per 16x16 patch."""
    return math.ceil(width / 16) * math.ceil(height / 16)


@dataclass(frozen=True, slots=True)
class Job:
    """A validated request: what the worker runs plus how the answer is shaped."""

    params: GenerationParams
    size: str
    quality: str
    response_format: str
    event_prefix: str = "image_generation"

    def usage(self, prompt_tokens: int, images: int) -> ImagesUsage:
        out = image_tokens(self.params.width, self.params.height) * images
        return ImagesUsage(
            input_tokens=prompt_tokens,
            output_tokens=out,
            total_tokens=prompt_tokens + out,
            input_tokens_details=InputTokensDetails(text_tokens=prompt_tokens),
        )


class ImageService:
    """Generations: :meth:`generate` answers at once, :meth:`stream` yields partial and completed events."""

    def __init__(self, settings: Settings, pool: Pool, files: ImageFiles, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.pool = pool
        self.files = files
        self.clock = clock
        self._models = {m.name: m for m in settings.resolved_models()}
        for name in self._models:  # every series exists from the start, so rates and alerts see zeros
            for outcome in ("success", "error", "cancelled", "rejected"):
                metrics.IMAGES.labels(name, outcome)

    # -- validation ---------------------------------------------------------------------------------------------

    def _model(self, name: str | None) -> ModelConfig:
        if not name:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise InvalidRequest("'model' is required: this server serves several models.", param="model")
        model = self._models.get(name)
        if model is None:
            raise NotFound(
                f"The model '{name}' does not exist. Available: {', '.join(self._models)}.",
                param="model",
                code="model_not_found",
            )
        return model

    @staticmethod
    def _size(model: ModelConfig, size: str | None) -> tuple[int, int]:
        if size is None or size == "auto":
            return parse_size(model.default_size)
        try:
            w, h = parse_size(size)
        except ValueError:
            raise InvalidRequest(
                f"Invalid size '{size}': expected WxH (e.g. {model.default_size}) or 'auto'.", param="size"
            ) from None
        ok_range = model.min_side <= w <= model.max_side and model.min_side <= h <= model.max_side
        if not ok_range or w % model.size_multiple or h % model.size_multiple:
            raise InvalidRequest(
                f"Size {size} is not supported by '{model.name}': width and height must be {model.size_limits_text()}.",
                param="size",
            )
        return w, h

    @staticmethod
    def _quality(model: ModelConfig, req: ImageGenerateRequest) -> tuple[str, int]:
        quality = {"low": "low", "medium": "medium"}.get(req.quality or "", "high")
        if req.num_inference_steps is not None:
            if req.num_inference_steps > model.max_steps:
                raise InvalidRequest(
                    f"num_inference_steps must be at most {model.max_steps} for '{model.name}'.",
                    param="num_inference_steps",
                )
            return quality, req.num_inference_steps
        fraction = model.quality_steps.get(quality, 1.0)
        return quality, max(1, round(model.default_steps * fraction))

    def prepare(self, req: ImageGenerateRequest) -> Job:
        """Check ``req`` against its model and turn it into a job.

        Raises:
            InvalidRequest: a field is out of what the model accepts (``param`` names it).
            NotFound: the model is not served.
        """
        model = self._model(req.model)
        width, height = self._size(model, req.size)
        if req.n > model.max_n:
            raise InvalidRequest(f"n must be at most {model.max_n} for '{model.name}'.", param="n")
        quality, steps = self._quality(model, req)
        guidance = model.default_guidance if req.guidance_scale is None else req.guidance_scale
        if guidance > model.max_guidance:
            raise InvalidRequest(f"guidance_scale must be at most {model.max_guidance}.", param="guidance_scale")
        scheduler = req.scheduler or model.default_scheduler or None
        if scheduler is not None:
            name = canonical_scheduler(scheduler)
            if name is None or name not in model.schedulers:
                raise InvalidRequest(
                    f"Unknown scheduler '{scheduler}' for '{model.name}'. Available: {', '.join(model.schedulers)}.",
                    param="scheduler",
                )
            scheduler = name
        if req.background == "transparent":
            raise InvalidRequest(
                f"'{model.name}' cannot produce transparent backgrounds; use 'opaque' or 'auto'.", param="background"
            )
        params = GenerationParams(
            model=model.name,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            n=req.n,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=secrets.randbelow(SEED_RANGE) if req.seed is None else req.seed,
            scheduler=scheduler,
            partial_images=(req.partial_images or 0) if req.stream else 0,
            output_format=req.output_format or "png",
            output_compression=req.output_compression,
            request_id=f"img_{secrets.token_hex(8)}",
        )
        return Job(
            params=params,
            size=f"{width}x{height}",
            quality=quality,
            response_format=req.response_format or self.settings.default_response_format,
        )

    def admit(self, job: Job) -> Lease:
        """Take a place for ``job`` on a backend (429 or 503 at once when there is none)."""
        try:
            return self.pool.acquire(job.params.model, job.params.work)
        except (Overloaded, Unavailable):
            metrics.IMAGES.labels(job.params.model, "rejected").inc(job.params.n)
            raise

    # -- running ------------------------------------------------------------------------------------------------

    async def _run(self, job: Job, lease: Lease) -> AsyncIterator[WorkerEvent]:
        """The backend's events for ``job``, with metrics, the deadline and failures mapped to :class:`ApiError`."""
        model = job.params.model
        deadline = lease.admitted_at + self.settings.request_timeout
        events = lease.member.backend.generate(job.params)
        outcome, first_partial = "error", True
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(anext(events), timeout=max(remaining, 0.001))
                except StopAsyncIteration:
                    raise from_worker(Failed(message="the worker ended the stream without a result")) from None
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"The request did not finish within {self.settings.request_timeout:g} seconds."
                    ) from None
                if isinstance(event, Started):
                    metrics.QUEUE_WAIT_SECONDS.labels(model).observe(lease.started())
                elif isinstance(event, Partial) and first_partial:
                    first_partial = False
                    metrics.FIRST_PARTIAL_SECONDS.labels(model).observe(time.monotonic() - lease.admitted_at)
                elif isinstance(event, Failed):
                    raise from_worker(event)
                yield event
                if isinstance(event, Done):
                    outcome = "success"
                    if lease.started_at is not None:
                        metrics.GENERATION_SECONDS.labels(model).observe(time.monotonic() - lease.started_at)
                    return
        except (asyncio.CancelledError, GeneratorExit, Cancelled):
            outcome = "cancelled"
            raise
        except ApiError as e:
            log.warning("request %s failed: %s", job.params.request_id, e.message)
            raise
        finally:
            await events.aclose()
            lease.release(succeeded=outcome == "success")
            metrics.IMAGES.labels(model, outcome).inc(job.params.n)

    async def generate(self, req: ImageGenerateRequest, base_url: str) -> ImagesResponse:
        """Run a request to the end and return every image at once."""
        job = self.prepare(req)
        lease = self.admit(job)
        images: dict[int, bytes] = {}
        prompt_tokens = 0
        async for event in self._run(job, lease):
            if isinstance(event, Started):
                prompt_tokens = event.prompt_tokens
            elif isinstance(event, Image):
                images[event.index] = event.data
        p = job.params
        if job.response_format == "url":
            base = self.settings.public_url or base_url
            names = await asyncio.to_thread(
                lambda: [self.files.save(images[i], p.output_format) for i in sorted(images)]
            )
            data = [ImageData(url=self.files.url(base, name)) for name in names]
        else:
            data = [ImageData(b64_json=_b64(images[i])) for i in sorted(images)]
        return ImagesResponse(
            created=int(self.clock()),
            data=data,
            size=job.size,
            quality=job.quality,
            output_format=p.output_format,
            background="opaque",
            usage=job.usage(prompt_tokens, len(images)),
        )

    def stream(self, req: ImageGenerateRequest) -> EventStream:
        """Validate and admit now (so errors get their HTTP status); the events follow from the returned stream."""
        job = self.prepare(req)
        lease = self.admit(job)
        return EventStream(self._stream(job, lease), job, lease)

    async def _stream(self, job: Job, lease: Lease) -> AsyncIterator[StreamEvent]:
        p = job.params
        prompt_tokens = 0
        common = {"size": job.size, "quality": job.quality, "background": "opaque", "output_format": p.output_format}
        # aclosing: when the client goes away, the job's stop must reach the backend now, not at garbage collection.
        async with contextlib.aclosing(self._run(job, lease)) as events:
            async for event in events:
                if isinstance(event, Started):
                    prompt_tokens = event.prompt_tokens
                elif isinstance(event, Partial):
                    yield ImageGenPartialImageEvent(
                        type=f"{job.event_prefix}.partial_image",
                        b64_json=_b64(event.data),
                        created_at=int(self.clock()),
                        partial_image_index=event.partial_index,
                        image_index=event.image_index,
                        **common,
                    )
                elif isinstance(event, Image):
                    yield ImageGenCompletedEvent(
                        type=f"{job.event_prefix}.completed",
                        b64_json=_b64(event.data),
                        created_at=int(self.clock()),
                        usage=job.usage(prompt_tokens, 1),
                        image_index=event.index,
                        **common,
                    )


class EventStream:
    """The events of one admitted, streamed request.

    :meth:`aclose` must be called when the response ends, however it ends: it also gives back the request's place
    when the client went away before the first event was asked for.
    """

    def __init__(self, events: AsyncIterator[StreamEvent], job: Job, lease: Lease) -> None:
        self._events = events
        self._job = job
        self._lease = lease

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events

    async def aclose(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]
        if not self._lease.released:
            self._lease.release(succeeded=False)
            metrics.IMAGES.labels(self._job.params.model, "cancelled").inc(self._job.params.n)
