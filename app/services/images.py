"""The image use cases: validate a request against its model, run it on the pool, shape the answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import msgspec
from msgspec import UNSET

from app import metrics
from app.auth.guard import Guard, Ticket
from app.auth.principals import ANONYMOUS, Principal
from app.config import ModelConfig, Settings
from app.errors import (
    ApiError,
    Cancelled,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unavailable,
)
from app.pool import Pool
from app.pool.failover import Dispatch
from app.protocol.images import (
    Fallback,
    Framed,
    ImageData,
    ImageEditRequest,
    ImageGenCompletedEvent,
    ImageGenerateRequest,
    ImageGenPartialImageEvent,
    ImagesResponse,
    ImagesUsage,
    ImageVariationRequest,
    InputTokensDetails,
    Model,
    ModelList,
    StreamEvent,
)
from app.services.adapters import AdapterRegistry
from app.services.inputs import InputImage
from app.store.files import ImageFiles
from app.worker.protocol import (
    SCHEDULERS,
    GenerationParams,
    Image,
    LoraRef,
    Partial,
    RelayedImage,
    RelayedPartial,
    Started,
    WorkerEvent,
    canonical_scheduler,
    image_bytes,
    parse_size,
)

log = logging.getLogger("imagegate.images")

SEED_RANGE = 2**32
FALLBACK_STEPS = 30
"""Steps of a model with no ``default_steps`` setting and no family default."""
FALLBACK_GUIDANCE = 7.5
_rng = random.Random()  # seeds and request ids need no secrecy, and a system call per request shows up in profiles


def _random_seed() -> int:
    return _rng.randrange(SEED_RANGE)


def _request_id() -> str:
    return f"{_rng.getrandbits(64):016x}"


def image_tokens(width: int, height: int) -> int:
    """Output tokens of one image: one per 16x16 patch."""
    return math.ceil(width / 16) * math.ceil(height / 16)


EDIT_TASKS = {"inpainting": "inpaint", "outpainting": "outpaint", "background_removal": "background_removal"}
TASK_NAMES = {
    "img2img": "image-to-image edits",
    "inpaint": "inpainting",
    "outpaint": "outpainting",
    "background_removal": "background removal",
}


@dataclass(frozen=True)
class Job:
    """A validated request: what the worker runs, the input files it needs, and how the answer is shaped."""

    params: GenerationParams
    size: str
    quality: str
    response_format: str
    event_prefix: str = "image_generation"
    background: str = "opaque"
    inputs: tuple[InputImage, ...] = ()
    """The image (then the mask) sent to the worker after the params; closed when the job ends."""
    ticket: Ticket | None = None
    """The principal's hold on its limits; finished with the delivered usage when the job ends."""

    def usage(self, prompt_tokens: int, images: int) -> ImagesUsage:
        out = image_tokens(self.params.width, self.params.height) * images
        given = sum(image_tokens(i.width, i.height) for i in self.inputs[:1])
        return ImagesUsage(
            input_tokens=prompt_tokens + given,
            output_tokens=out,
            total_tokens=prompt_tokens + given + out,
            input_tokens_details=InputTokensDetails(text_tokens=prompt_tokens, image_tokens=given),
        )

    def close(self) -> None:
        for i in self.inputs:
            i.close()

    def finish(self, images: int = 0) -> None:
        """Close the inputs and release the principal's hold, charging ``images`` delivered images."""
        self.close()
        if self.ticket is not None:
            p = self.params
            steps = p.steps * (p.strength or 1.0) if p.task == "img2img" else p.steps
            self.ticket.finish(images, int(images * p.width * p.height * steps))


class ImageService:
    """Generations, edits and variations: answered at once, or streamed as partial and completed events."""

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        files: ImageFiles,
        clock: Callable[[], float] = time.time,
        guard: Guard | None = None,
        adapters: AdapterRegistry | None = None,
    ):
        self.settings = settings
        self.pool = pool
        self.files = files
        self.clock = clock
        self.guard = guard
        self.adapters = adapters or AdapterRegistry(settings)
        self._models = {m.name: m for m in settings.resolved_models()}
        for name in self._models:  # every series exists from the start, so rates and alerts see zeros
            for outcome in ("success", "error", "cancelled", "rejected"):
                metrics.IMAGES.labels(name, outcome)

    # -- models -------------------------------------------------------------------------------------------------

    def served(self) -> list[str]:
        """The names of the served models."""
        return list(self._models)

    def config(self, name: str) -> ModelConfig:
        return self._model(name)

    def models(self, principal: Principal, created: int) -> ModelList:
        return ModelList(data=[self.describe(name, created) for name in self._models if principal.allows(name)])

    def model(self, name: str, principal: Principal, created: int) -> Model:
        if name not in self._models or not principal.allows(name):
            raise NotFound(f"The model '{name}' does not exist.", param="model", code="model_not_found")
        return self.describe(name, created)

    def describe(self, name: str, created: int) -> Model:
        """A served model with its family, tasks, schedulers and defaults, as far as its backends have said."""
        model = self._models[name]
        details = self.pool.details(name)
        tasks = self.pool.tasks(name)
        schedulers = self._schedulers(model)
        known = details is not None
        return Model(
            id=name,
            created=created,
            family=details.family if details else UNSET,
            tasks=sorted(tasks) if tasks is not None else UNSET,
            schedulers=schedulers if schedulers is not None else UNSET,
            default_steps=self._default_steps(model) if known or model.default_steps else UNSET,
            default_guidance=self._guidance(model, None) if known or model.default_guidance is not None else UNSET,
            lora=details.lora if details else UNSET,
        )

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
    def _fit(model: ModelConfig, width: int, height: int) -> tuple[int, int]:
        """The model size closest to an input image's: same aspect, within the limits, on the size grid."""
        scale = min(1.0, model.max_side / max(width, height))
        scale = max(scale, model.min_side / min(width, height))
        m = model.size_multiple

        def snap(v: float) -> int:
            return min(model.max_side - model.max_side % m, max(model.min_side + -model.min_side % m, round(v / m) * m))

        return snap(width * scale), snap(height * scale)

    def _default_steps(self, model: ModelConfig) -> int:
        """The model's ``default_steps``, else its family's (as its workers reported), else 30; within max_steps."""
        details = self.pool.details(model.name)
        steps = model.default_steps or (details.default_steps if details else None) or FALLBACK_STEPS
        return min(steps, model.max_steps)

    def _steps(self, model: ModelConfig, quality: str | None, steps: int | None) -> tuple[str, int]:
        resolved = {"low": "low", "medium": "medium"}.get(quality or "", "high")
        if steps is not None:
            if steps > model.max_steps:
                raise InvalidRequest(
                    f"num_inference_steps must be at most {model.max_steps} for '{model.name}'.",
                    param="num_inference_steps",
                )
            return resolved, steps
        return resolved, max(1, round(self._default_steps(model) * model.quality_steps.get(resolved, 1.0)))

    def _guidance(self, model: ModelConfig, guidance: float | None) -> float:
        if guidance is None:
            details = self.pool.details(model.name)
            family = details.default_guidance if details else None
            guidance = next(g for g in (model.default_guidance, family, FALLBACK_GUIDANCE) if g is not None)
            return min(guidance, model.max_guidance)
        if guidance > model.max_guidance:
            raise InvalidRequest(f"guidance_scale must be at most {model.max_guidance}.", param="guidance_scale")
        return guidance

    def _schedulers(self, model: ModelConfig) -> list[str] | None:
        """The scheduler names the model takes: configured, else those its workers reported; None before they have."""
        if model.schedulers is not None:
            return model.schedulers
        details = self.pool.details(model.name)
        return details.schedulers if details else None

    def _scheduler(self, model: ModelConfig, scheduler: str | None) -> str | None:
        scheduler = scheduler or model.default_scheduler or None
        if scheduler is None:
            return None
        name = canonical_scheduler(scheduler)
        valid = self._schedulers(model)
        if name is None or (valid is not None and name not in valid):
            listed = ", ".join(valid if valid is not None else SCHEDULERS)
            raise InvalidRequest(
                f"Scheduler '{scheduler}' does not apply to '{model.name}'. Available: {listed}.", param="scheduler"
            )
        return name

    @staticmethod
    def _opaque(model: ModelConfig, background: str | None) -> None:
        if background == "transparent":
            raise InvalidRequest(
                f"'{model.name}' cannot produce transparent backgrounds; use 'opaque' or 'auto'.", param="background"
            )

    def _supported(self, model: ModelConfig, task: str, param: str) -> None:
        if self.pool.supports(model.name, task) is False:
            raise InvalidRequest(
                f"The model '{model.name}' does not support {TASK_NAMES[task]}.", param=param, code="unsupported"
            )

    def _extras(self, model: ModelConfig, req: ImageGenerateRequest | ImageEditRequest) -> None:
        """Refuse ``safety_checker`` and ``clip_skip`` where the model's workers said they cannot apply them."""
        if not req.safety_checker and not (req.clip_skip and req.clip_skip > 1):
            return  # most requests: no scan of the pool
        details = self.pool.details(model.name)
        if details is None:  # no worker has said yet: the worker refuses it, if it must
            return
        if req.safety_checker and not details.safety_checker:
            raise InvalidRequest(
                f"The model '{model.name}' has no safety checker (configure safety_checker for it).",
                param="safety_checker",
            )
        if req.clip_skip and req.clip_skip > 1 and not details.clip_skip:
            raise InvalidRequest(
                f"The model '{model.name}' cannot skip text-encoder layers (clip_skip) on this server.",
                param="clip_skip",
            )

    @staticmethod
    def _clip_skip(req: ImageGenerateRequest | ImageEditRequest) -> int | None:
        """The request's ``clip_skip`` (AUTOMATIC1111's count, 1: no skip) as diffusers counts it."""
        return req.clip_skip - 1 if req.clip_skip and req.clip_skip > 1 else None

    def _loras(
        self, model: ModelConfig, req: ImageGenerateRequest | ImageEditRequest, principal: Principal
    ) -> tuple[LoraRef, ...]:
        specs = getattr(req, "loras", None)
        if not specs:  # most requests: no scan of the pool for what its workers said
            return ()
        details = self.pool.details(model.name)
        supported = details.lora if details is not None else None
        return self.adapters.resolve(model.name, specs, principal, supported=supported)

    def prepare(self, req: ImageGenerateRequest, principal: Principal = ANONYMOUS) -> Job:
        """Check ``req`` against its model and turn it into a job.

        Raises:
            InvalidRequest: a field is out of what the model accepts (``param`` names it).
            NotFound: the model is not served.
        """
        model = self._model(req.model)
        width, height = self._size(model, req.size)
        if req.n > model.max_n:
            raise InvalidRequest(f"n must be at most {model.max_n} for '{model.name}'.", param="n")
        quality, steps = self._steps(model, req.quality, req.num_inference_steps)
        guidance = self._guidance(model, req.guidance_scale)
        scheduler = self._scheduler(model, req.scheduler)
        self._opaque(model, req.background)
        self._extras(model, req)
        params = GenerationParams(
            model=model.name,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            n=req.n,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=_random_seed() if req.seed is None else req.seed,
            scheduler=scheduler,
            partial_images=(req.partial_images or 0) if req.stream else 0,
            output_format=req.output_format or "png",
            output_compression=req.output_compression,
            request_id=f"img_{_request_id()}",
            loras=self._loras(model, req, principal),
            clip_skip=self._clip_skip(req),
            safety=req.safety_checker or (None if req.moderation == "low" else "auto"),
        )
        return Job(
            params=params,
            size=f"{width}x{height}",
            quality=quality,
            response_format=req.response_format or self.settings.default_response_format,
        )

    def prepare_edit(
        self,
        req: ImageEditRequest,
        images: list[InputImage],
        mask: InputImage | None,
        principal: Principal = ANONYMOUS,
    ) -> Job:
        """Check an edit and turn it into a job that owns its input files (closed here if refused)."""
        try:
            return self._prepare_edit(req, images, mask, principal)
        except BaseException:
            for i in [*images, *([mask] if mask else [])]:
                i.close()
            raise

    def _prepare_edit(
        self, req: ImageEditRequest, images: list[InputImage], mask: InputImage | None, principal: Principal
    ) -> Job:
        model = self._model(req.model)
        if not images:
            raise InvalidRequest("At least one image is required (field 'image' or 'image[]').", param="image")
        if len(images) > self.settings.max_images:
            raise InvalidRequest(f"At most {self.settings.max_images} images may be sent.", param="image")
        if len(images) > 1:
            raise InvalidRequest(
                f"The model '{model.name}' edits one image and cannot use reference images; send a single image.",
                param="image",
                code="unsupported",
            )
        image = images[0]
        task = EDIT_TASKS.get(req.type or "") or ("inpaint" if mask is not None else "img2img")
        if task == "inpaint" and mask is None:
            raise InvalidRequest("Inpainting needs a mask.", param="mask")
        if task != "background_removal" and not req.prompt:
            raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
        if mask is not None and (mask.width, mask.height) != (image.width, image.height):
            raise InvalidRequest(
                f"The mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                "they must have the same dimensions.",
                param="mask",
            )
        self._supported(model, task, "type" if req.type else "image")
        if req.n > model.max_n:
            raise InvalidRequest(f"n must be at most {model.max_n} for '{model.name}'.", param="n")
        if req.size in (None, "auto"):
            if task == "outpaint":
                raise InvalidRequest("Outpainting needs a size: the canvas the image grows to.", param="size")
            if task == "background_removal":  # no denoising, so no size grid: keep the image as it is
                width, height = image.width, image.height
            else:
                width, height = self._fit(model, image.width, image.height)
        else:
            width, height = self._size(model, req.size)
        output_format = req.output_format or "png"
        background = "opaque"
        if task == "background_removal":
            if output_format == "jpeg":
                raise InvalidRequest("Background removal needs output_format png or webp.", param="output_format")
            background = "transparent"
        else:
            self._opaque(model, req.background)
        quality, steps = self._steps(model, req.quality, req.num_inference_steps)
        if req.strength is not None:
            strength = req.strength
        elif task in ("inpaint", "outpaint"):
            strength = 1.0
        elif req.input_fidelity == "high":
            strength = model.edit_strength_high_fidelity
        else:
            strength = model.edit_strength
        steps = max(steps, math.ceil(1 / strength))  # diffusers runs int(steps x strength) steps: at least one
        self._extras(model, req)
        params = GenerationParams(
            model=model.name,
            prompt=req.prompt or "",
            negative_prompt=req.negative_prompt or None,
            n=req.n,
            width=width,
            height=height,
            steps=steps,
            guidance=self._guidance(model, req.guidance_scale),
            seed=_random_seed() if req.seed is None else req.seed,
            scheduler=self._scheduler(model, req.scheduler),
            partial_images=(req.partial_images or 0) if req.stream and task != "background_removal" else 0,
            output_format=output_format,
            output_compression=req.output_compression,
            request_id=f"edit_{_request_id()}",
            task=task,  # type: ignore[arg-type]
            strength=strength,
            image_bytes=image.size,
            mask_bytes=mask.size if mask is not None else 0,
            loras=self._loras(model, req, principal) if task != "background_removal" else (),
            clip_skip=self._clip_skip(req),
            safety=req.safety_checker or (None if req.moderation == "low" else "auto"),
        )
        return Job(
            params=params,
            size=f"{width}x{height}",
            quality=quality,
            response_format=req.response_format or self.settings.default_response_format,
            event_prefix="image_edit",
            background=background,
            inputs=(image, mask) if mask is not None else (image,),
        )

    def prepare_variation(self, req: ImageVariationRequest, images: list[InputImage]) -> Job:
        """Check a variation (image-to-image from the first image, no prompt) and turn it into a job."""
        try:
            model = self._model(req.model)
            if req.stream:
                raise InvalidRequest("Variations do not stream; leave 'stream' out or false.", param="stream")
            if not images:
                raise InvalidRequest("An image is required (field 'image').", param="image")
            image = images[0]
            for extra in images[1:]:
                extra.close()
            self._supported(model, "img2img", "image")
            if req.n > model.max_n:
                raise InvalidRequest(f"n must be at most {model.max_n} for '{model.name}'.", param="n")
            if req.size in (None, "auto"):
                width, height = self._fit(model, image.width, image.height)
            else:
                width, height = self._size(model, req.size)
        except BaseException:
            for i in images:
                i.close()
            raise
        params = GenerationParams(
            model=model.name,
            prompt="",
            width=width,
            height=height,
            steps=self._default_steps(model),
            guidance=self._guidance(model, None),
            seed=_random_seed() if req.seed is None else req.seed,
            n=req.n,
            scheduler=self._scheduler(model, None),
            output_format=req.output_format or "png",
            request_id=f"var_{_request_id()}",
            task="img2img",
            safety="auto",
            strength=model.variation_strength,
            image_bytes=image.size,
        )
        return Job(
            params=params,
            size=f"{width}x{height}",
            quality="high",
            response_format=req.response_format or self.settings.default_response_format,
            inputs=(image,),
        )

    # -- running ------------------------------------------------------------------------------------------------

    def _fallbacks(self, job: Job, requested: list[str | Fallback] | None, principal: Principal) -> list[str]:
        """The models to try after ``job``'s own: the request's ``fallbacks`` in order, then the model's."""
        names: list[str] = []
        for item in requested or ():
            name = self._fallback_name(item)
            if not principal.allows(name):
                raise PermissionDenied(
                    f"This key may not use the fallback model '{name}'.", param="fallbacks", code="model_not_allowed"
                )
            names.append(name)
        configured = [m for m in self._models[job.params.model].fallbacks if principal.allows(m)]
        return [n for n in dict.fromkeys([*names, *configured]) if n != job.params.model]

    def _fallback_name(self, item: str | Fallback) -> str:
        """A served model for a ``fallbacks`` entry: ``model``, ``provider/model`` or ``{provider, model}``."""
        if isinstance(item, Fallback):
            candidates = [f"{item.provider}/{item.model}", item.model] if item.provider else [item.model]
        else:
            candidates = [item, item.partition("/")[2]]
        for name in candidates:
            if name in self._models:
                return name
        raise InvalidRequest(
            f"The fallback model '{candidates[0]}' does not exist. Available: {', '.join(self._models)}.",
            param="fallbacks",
            code="model_not_found",
        )

    def retarget(self, p: GenerationParams, name: str) -> GenerationParams:
        """``p`` for the fallback model ``name``.

        Raises:
            InvalidRequest: that model cannot take the job (its size, steps, images or guidance).
        """
        model = self._models[name]
        if p.loras:
            raise InvalidRequest(f"'{name}' cannot take the job: its LoRA adapters belong to '{p.model}'.")
        self._size(model, f"{p.width}x{p.height}")
        if p.n > model.max_n or p.steps > model.max_steps:
            raise InvalidRequest(f"'{name}' takes at most {model.max_n} images and {model.max_steps} steps.")
        self._guidance(model, p.guidance)
        scheduler = p.scheduler if p.scheduler in (self._schedulers(model) or []) else (model.default_scheduler or None)
        return msgspec.structs.replace(p, model=name, scheduler=scheduler)

    async def wait_ready(self, model: str | None, seconds: float) -> None:
        """Wait up to ``seconds`` (at most ``request_timeout``) until a backend of the model is ready."""
        name = self._model(model).name
        deadline = time.monotonic() + min(seconds, self.settings.request_timeout)
        while not self.pool.ready(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def generate(
        self, req: ImageGenerateRequest, base_url: str, principal: Principal = ANONYMOUS
    ) -> ImagesResponse:
        """Run a generation to the end and return every image at once."""
        return await self.respond(self.prepare(req, principal), base_url, principal, req.fallbacks)

    async def stream(self, req: ImageGenerateRequest, principal: Principal = ANONYMOUS) -> EventStream:
        """Validate and admit now (so errors get their HTTP status); the events follow from the returned stream."""
        return await self.open_stream(self.prepare(req, principal), principal, req.fallbacks)

    async def edit(
        self,
        req: ImageEditRequest,
        images: list[InputImage],
        mask: InputImage | None,
        base_url: str,
        principal: Principal = ANONYMOUS,
    ) -> ImagesResponse:
        return await self.respond(self.prepare_edit(req, images, mask, principal), base_url, principal, req.fallbacks)

    async def edit_stream(
        self, req: ImageEditRequest, images: list[InputImage], mask: InputImage | None, principal: Principal = ANONYMOUS
    ) -> EventStream:
        return await self.open_stream(self.prepare_edit(req, images, mask, principal), principal, req.fallbacks)

    async def variation(
        self, req: ImageVariationRequest, images: list[InputImage], base_url: str, principal: Principal = ANONYMOUS
    ) -> ImagesResponse:
        return await self.respond(self.prepare_variation(req, images), base_url, principal, req.fallbacks)

    async def _admit(
        self, job: Job, principal: Principal, fallbacks: list[str | Fallback] | None, *, guarded: bool = True
    ) -> tuple[Job, Dispatch]:
        """The principal's limits first (unless a job's were checked at submission), then a place on a backend.

        On refusal everything is given back.
        """
        ticket = None
        try:
            models = self._fallbacks(job, fallbacks, principal)
            if self.guard is not None and guarded:
                ticket = await self.guard.admit(principal, job.params.model, job.params.n)
            dispatch = Dispatch(
                self.pool,
                job.params,
                [i.file for i in job.inputs],
                fallbacks=models,
                retarget=self.retarget,
                max_attempts=self.settings.max_attempts,
                timeout=self.settings.request_timeout,
            )
            try:
                dispatch.admit()
            except (Overloaded, Unavailable):
                metrics.IMAGES.labels(job.params.model, "rejected").inc(job.params.n)
                raise
        except BaseException:
            if ticket is not None:
                ticket.finish()
            job.close()
            raise
        return replace(job, ticket=ticket), dispatch

    async def _events(self, job: Job, dispatch: Dispatch, *, streamed: bool) -> AsyncIterator[WorkerEvent]:
        """The job's events, its outcome counted and its usage charged when it ends.

        Usage charges the images delivered: all of them on success; on a failure, those a stream already sent.
        """
        outcome, delivered = "error", 0
        try:
            async with contextlib.aclosing(dispatch.events(streamed=streamed)) as events:
                async for event in events:
                    delivered += isinstance(event, Image)
                    yield event
            outcome = "success"
        except (asyncio.CancelledError, GeneratorExit, Cancelled):
            outcome = "cancelled"
            raise
        except ApiError as e:
            log.warning("request %s failed: %s", job.params.request_id, e.message)
            raise
        finally:
            job.finish(job.params.n if outcome == "success" else delivered if streamed else 0)
            metrics.child(metrics.IMAGES, dispatch.params.model, outcome).inc(job.params.n)

    async def respond(
        self,
        job: Job,
        base_url: str,
        principal: Principal = ANONYMOUS,
        fallbacks: list[str | Fallback] | None = None,
    ) -> ImagesResponse:
        """Run ``job`` to the end and return every image at once."""
        job, dispatch = await self._admit(job, principal, fallbacks)
        images: dict[int, bytes] = {}
        prompt_tokens = 0
        async for event in self._events(job, dispatch, streamed=False):
            if isinstance(event, Started):
                prompt_tokens = event.prompt_tokens
            elif isinstance(event, Image):
                images[event.index] = event.data
        p = job.params
        if job.response_format == "url":
            base = self.settings.public_url or base_url
            names = await asyncio.to_thread(
                lambda: [self.files.save(image_bytes(images[i]), p.output_format) for i in sorted(images)]
            )
            data = [ImageData(url=self.files.url(base, name)) for name in names]
        else:
            data = [ImageData(b64_json=images[i]) for i in sorted(images)]
        return ImagesResponse(
            created=int(self.clock()),
            data=data,
            size=job.size,
            quality=job.quality,
            output_format=p.output_format,
            background=job.background,
            usage=job.usage(prompt_tokens, len(images)),
        )

    def check_fallbacks(self, job: Job, fallbacks: list[str | Fallback] | None, principal: Principal) -> None:
        """Refuse fallbacks the principal may not use or that do not exist (a job checks them when submitted)."""
        self._fallbacks(job, fallbacks, principal)

    async def run_job(
        self, job: Job, principal: Principal, fallbacks: list[str | Fallback] | None
    ) -> AsyncIterator[WorkerEvent]:
        """The events of a submitted job, run like a request whose limits were checked when it was submitted.

        Raises:
            Overloaded, Unavailable: no backend can take it now (the job waits in its queue for another try).
            ApiError: the job failed.
        """
        job, dispatch = await self._admit(job, principal, fallbacks, guarded=False)
        async with contextlib.aclosing(self._events(job, dispatch, streamed=False)) as events:
            async for event in events:
                yield event

    async def open_stream(
        self, job: Job, principal: Principal = ANONYMOUS, fallbacks: list[str | Fallback] | None = None
    ) -> EventStream:
        job, dispatch = await self._admit(job, principal, fallbacks)
        return EventStream(self._stream(job, dispatch), job, dispatch)

    async def _stream(self, job: Job, dispatch: Dispatch) -> AsyncIterator[StreamEvent | Framed]:
        p = job.params
        prompt_tokens = 0
        common = {
            "size": job.size,
            "quality": job.quality,
            "background": job.background,
            "output_format": p.output_format,
        }
        partial_type, completed_type = f"{job.event_prefix}.partial_image", f"{job.event_prefix}.completed"
        # An upstream's frame of the very event the client is to get goes on as it came (its image not copied).
        partial_head, completed_head = b"event: %b\n" % partial_type.encode(), b"event: %b\n" % completed_type.encode()
        # aclosing: when the client goes away, the job's stop must reach the backend now, not at garbage collection.
        async with contextlib.aclosing(self._events(job, dispatch, streamed=True)) as events:
            async for event in events:
                if isinstance(event, Started):
                    prompt_tokens = event.prompt_tokens
                elif isinstance(event, Partial):
                    if isinstance(event, RelayedPartial) and event.frame.startswith(partial_head):
                        yield Framed(partial_type, event.frame)
                        continue
                    yield ImageGenPartialImageEvent(
                        type=partial_type,
                        b64_json=event.data,
                        created_at=int(self.clock()),
                        partial_image_index=event.partial_index,
                        image_index=event.image_index,
                        **common,
                    )
                elif isinstance(event, Image):
                    if isinstance(event, RelayedImage) and event.frame.startswith(completed_head):
                        yield Framed(completed_type, event.frame)
                        continue
                    yield ImageGenCompletedEvent(
                        type=completed_type,
                        b64_json=event.data,
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

    def __init__(self, events: AsyncIterator[StreamEvent | Framed], job: Job, dispatch: Dispatch) -> None:
        self._events = events
        self._job = job
        self._dispatch = dispatch

    def __aiter__(self) -> AsyncIterator[StreamEvent | Framed]:
        return self._events

    async def aclose(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]
        self._job.finish()  # a no-op for the ticket if the stream ran: its end already finished it
        if self._dispatch.release():
            metrics.IMAGES.labels(self._dispatch.params.model, "cancelled").inc(self._job.params.n)
