"""The worker's engine: one device, its pipelines, a FIFO of jobs run one at a time on a dedicated thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image as PILImage

from app.config import ModelConfig
from app.worker import images
from app.worker.pipelines import LoadedModel, load_model
from app.worker.previews import X0Tracker, encode_image
from app.worker.protocol import (
    Done,
    Failed,
    GenerationParams,
    HealthInfo,
    Image,
    Partial,
    Progress,
    Started,
    WorkerEvent,
    preview_steps,
)

log = logging.getLogger("imagegate.worker")


class JobCancelled(Exception):
    """Raised inside the denoising loop when the job's client has gone away."""


@dataclass(eq=False)
class Job:
    params: GenerationParams
    image: bytes | None = None
    mask: bytes | None = None
    events: asyncio.Queue[WorkerEvent] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Runs jobs on one device, in arrival order, streaming each job's events to its queue."""

    def __init__(self, device: str, models: list[ModelConfig]) -> None:
        self.device = device
        self.configs = models
        self.models: dict[str, LoadedModel] = {}
        self.status = "loading"
        self.error: str | None = None
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{device}")
        # Encoding images (PNG/JPEG/WebP) happens here, in order, while the engine thread denoises on.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"encode-{device}")
        self._loop_task: asyncio.Task[None] | None = None
        self.running = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0

    async def start(self) -> None:
        """Load every model on the engine's thread, then start taking jobs."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        self.status = "ready"
        self._loop_task = asyncio.create_task(self._run_forever(), name="engine")

    def _load(self) -> None:
        for config in self.configs:
            loaded = load_model(config, self.device)
            self.models[config.name] = loaded
            self._warm_up(loaded)

    def _warm_up(self, loaded: LoadedModel) -> None:
        side = max(loaded.config.min_side, 64)
        side += -side % loaded.config.size_multiple
        loaded.pipe(
            prompt="warm-up", height=side, width=side, num_inference_steps=1, output_type="latent", guidance_scale=1.0
        )

    def health(self) -> HealthInfo:
        return HealthInfo(
            status=self.status,  # type: ignore[arg-type]
            device=self.device,
            models=[m.name for m in self.configs],
            queued=self._queue.qsize(),
            running=self.running,
            completed=self.completed,
            cancelled=self.cancelled,
            failed=self.failed,
            error=self.error,
            tasks={name: sorted(loaded.tasks) for name, loaded in self.models.items()},
        )

    def submit(self, params: GenerationParams, image: bytes | None = None, mask: bytes | None = None) -> Job:
        job = Job(params, image, mask)
        loaded = self.models.get(params.model)
        if loaded is None:
            job.events.put_nowait(Failed(f"model {params.model!r} is not loaded on this worker", "invalid_request"))
        elif params.task not in loaded.tasks:
            job.events.put_nowait(Failed(f"model {params.model!r} cannot run {params.task}", "invalid_request"))
        elif params.task != "text2img" and image is None:
            job.events.put_nowait(Failed(f"{params.task} needs an input image", "invalid_request"))
        else:
            self._queue.put_nowait(job)
        return job

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            if job.cancelled.is_set():
                self.cancelled += 1
                continue
            self.running += 1

            def emit(event: WorkerEvent, job: Job = job) -> None:
                loop.call_soon_threadsafe(job.events.put_nowait, event)

            try:
                outcome = await loop.run_in_executor(self._executor, self._run, job, emit)
            finally:
                self.running -= 1
            setattr(self, outcome, getattr(self, outcome) + 1)

    def _run(self, job: Job, emit: Callable[[WorkerEvent], None]) -> str:
        """Run ``job`` on the engine thread; returns the outcome counter to bump."""
        p = job.params
        loaded = self.models[p.model]
        t0 = time.monotonic()
        try:
            emit(Started(queue_seconds=t0 - job.enqueued_at, prompt_tokens=loaded.count_tokens(p.prompt)))
            if p.task == "background_removal":
                images = self._remove_background(loaded, job)
            else:
                images = self._denoise(loaded, job, emit)

            def finals() -> list[WorkerEvent]:
                events: list[WorkerEvent] = [
                    Image(index=i, data=encode_image(im, p.output_format, p.output_compression), seed=p.seed + i)
                    for i, im in enumerate(images)
                ]
                return [*events, Done(seconds=time.monotonic() - t0)]

            self._encode(finals, emit)
            return "completed"
        except JobCancelled:
            self._encode(lambda: [Failed("the client went away", "cancelled")], emit)
            return "cancelled"
        except ValueError as e:
            message = str(e)
            self._encode(lambda: [Failed(message, "invalid_request")], emit)
            return "failed"
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            message = f"out of memory on {self.device} for {p.width}x{p.height} x{p.n}"
            self._encode(lambda: [Failed(message, "out_of_memory")], emit)
            return "failed"
        except Exception as e:
            log.exception("job %s failed", p.request_id)
            message = f"{type(e).__name__}: {e}"
            self._encode(lambda: [Failed(message, "internal")], emit)
            return "failed"

    def _encode(self, make: Callable[[], list[WorkerEvent]], emit: Callable[[WorkerEvent], None]) -> None:
        """Build events on the encoder thread and emit them in submission order."""

        def run() -> None:
            try:
                events = make()
            except Exception as e:
                log.exception("encoding failed")
                events = [Failed(f"encoding the image failed: {type(e).__name__}: {e}", "internal")]
            for event in events:
                emit(event)

        self._encoder.submit(run)

    @staticmethod
    def _remove_background(loaded: LoadedModel, job: Job) -> list:
        p = job.params
        image = images.resized(images.rgb(images.load(job.image)), p.width, p.height)  # type: ignore[arg-type]
        background = set(loaded.config.background_labels)
        foreground = PILImage.new("L", image.size, 0)
        for segment in loaded.segmenter(image):
            if segment["label"] not in background:
                foreground.paste(255, mask=segment["mask"].convert("L"))
        return [images.cut_out(image, foreground)] * p.n

    @staticmethod
    def _inputs(job: Job) -> dict:
        """The pipeline arguments that carry an edit's image and mask."""
        p = job.params
        if p.task == "text2img":
            return {"height": p.height, "width": p.width}
        image = images.load(job.image)  # type: ignore[arg-type]
        mask = images.load(job.mask) if job.mask else None
        if p.task == "img2img":
            return {"image": images.resized(images.rgb(image), p.width, p.height), "strength": p.strength}
        if p.task == "outpaint":
            canvas, redraw = images.outpaint_canvas(image, p.width, p.height, mask)
        else:
            canvas = images.resized(images.rgb(image), p.width, p.height)
            redraw = images.resized(images.redraw_mask(mask), p.width, p.height, PILImage.Resampling.NEAREST)  # type: ignore[arg-type]
        return {"image": canvas, "mask_image": redraw, "height": p.height, "width": p.width, "strength": p.strength}

    def _denoise(self, loaded: LoadedModel, job: Job, emit: Callable[[WorkerEvent], None]) -> list:
        p = job.params
        scheduler = loaded.make_scheduler(p.scheduler)
        pipe = loaded.pipeline_for(p.task, scheduler)
        if p.negative_prompt and "negative_prompt" not in loaded.call_params:
            raise ValueError(f"model {p.model!r} does not take a negative_prompt")
        tracker = X0Tracker(scheduler)
        # Noise comes from CPU generators, so a seed gives the same image on any device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(p.seed + i) for i in range(p.n)]
        marks: list[int] = []
        sent = [0] * p.n

        def on_step(pipe_, i: int, t, kwargs: dict) -> dict:
            if job.cancelled.is_set():
                raise JobCancelled
            total = getattr(pipe_, "num_timesteps", None) or p.steps
            step = i + 1
            emit(Progress(step=step, total=total))
            if p.partial_images and not marks:
                marks.extend(preview_steps(total, p.partial_images))
            due = marks.count(step)
            if due:
                x0 = tracker.latest if tracker.latest is not None else kwargs["latents"]
                pictures = loaded.previewer(x0, p.width, p.height)
                first = list(sent)
                for index in range(len(sent)):
                    sent[index] += due

                def partials(pictures=pictures, first=first) -> list[WorkerEvent]:
                    encoded = [encode_image(im, p.output_format, p.output_compression, fast=True) for im in pictures]
                    return [
                        Partial(image_index=index, partial_index=first[index] + k, data=data)
                        for k in range(due)
                        for index, data in enumerate(encoded)
                    ]

                self._encode(partials, emit)
            tracker.wanted = bool(marks) and (step + 1) in marks
            return kwargs

        if p.partial_images:
            expected = max(1, int(p.steps * (p.strength or 1.0)))
            tracker.wanted = 1 in preview_steps(expected, p.partial_images)
        kwargs = {
            **self._inputs(job),
            "prompt": p.prompt,
            "num_inference_steps": p.steps,
            "guidance_scale": p.guidance,
            "num_images_per_prompt": p.n,
            "generator": generators,
            "callback_on_step_end": on_step,
            "callback_on_step_end_tensor_inputs": ["latents"],
            "output_type": "pil",
        }
        if p.negative_prompt:
            kwargs["negative_prompt"] = p.negative_prompt
        return pipe(**kwargs).images

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        while not self._queue.empty():
            self._queue.get_nowait().cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._encoder.shutdown(wait=False, cancel_futures=True)
