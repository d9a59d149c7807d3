"""The worker's engine: one device, its pipelines, and a queue of jobs run in batches on a dedicated thread.

Forming a batch (:meth:`Engine._next_batch`): the oldest queued job always starts the next batch. Queued jobs that
can share its pipeline call (equal :func:`batch_key`: model, task, size, steps, guidance, scheduler, strength) join it
in arrival order while the batch's output pixels (width x height x n, summed) stay within the model's
``max_batch_pixels``. Jobs that cannot join are passed over and keep their place in the queue, so they hold up
nobody behind them. A batch that still has room waits up to ``batch_window_ms`` for more jobs to arrive; a full
batch starts at once. With ``max_batch_pixels = 0``, and for background removal, every job runs alone.

Running a batch (:meth:`Engine._run`): one ``pipe(...)`` call with one prompt, one negative prompt and one CPU
generator (seeded ``seed + i``) per image, so an image does not depend on the batch it ran in. Each job keeps its
own events: ``Started`` (with the batch's size), its progress, its partial images on its own schedule (decoded from
its rows of the batch), its images and ``Done``. A cancelled job ends at the next denoising step while the others go
on; the call stops only when every job in it is cancelled. When a batch of several fails, whatever the error, its
jobs run again one at a time, so only the job at fault fails.

Tracing (when on, and the gateway sent a trace context): each job has its own spans (:class:`JobSpans`), even in a
batch, whose shared pipeline call then shows in each job's trace with its ``imagegate.batch_size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from app import telemetry
from app.config import ModelConfig
from app.worker import images
from app.worker.adapters import AdapterFiles, LoadedAdapters
from app.worker.pipelines import LoadedModel, load_model
from app.worker.previews import X0Tracker, encode_image
from app.worker.protocol import (
    AdapterFile,
    Checkpoint,
    Done,
    Failed,
    GenerationParams,
    HealthInfo,
    Image,
    ModelDetails,
    Partial,
    Progress,
    Started,
    TrainingParams,
    TrainingStep,
    WorkerEvent,
    preview_steps,
)
from app.worker.safety import treat

log = logging.getLogger("imagegate.worker")


CANCELLED = Failed("the client went away", "cancelled")


class NonFiniteOutput(Exception):
    """The pipeline produced NaN or infinite values (a scheduler or dtype the model cannot run): no image to send."""


def to_pictures(output: np.ndarray) -> list[PILImage.Image]:
    """A pipeline's ``np`` output (images in [0, 1], NHWC) as pictures, as its ``pil`` output would be.

    Raises:
        NonFiniteOutput: some value is NaN or infinite; as a picture it would be black or noise, with no error.
    """
    if not np.isfinite(output).all():
        raise NonFiniteOutput("the pipeline produced NaN values (try another scheduler, or float32 / bfloat16)")
    return [PILImage.fromarray(a) for a in (output * 255).round().astype(np.uint8)]


def _trainable(pipe) -> bool:
    """Whether :class:`~app.worker.training.LoraTrainer` can train this pipeline (a UNet and one text encoder)."""
    return (
        getattr(pipe, "unet", None) is not None
        and getattr(pipe, "text_encoder", None) is not None
        and (getattr(pipe, "text_encoder_2", None) is None)
    )


def _skips_clip(loaded: LoadedModel, task: str) -> bool:
    """Whether the pipeline takes ``clip_skip`` and its text encoder has what diffusers reads for it.

    diffusers reaches into ``text_encoder.text_model.final_layer_norm``, which CLIP text models of transformers 5 do
    not have: there, asking for it would fail inside the pipeline.
    """
    encoder = getattr(loaded.pipe, "text_encoder", None)
    return "clip_skip" in loaded.accepts[task] and hasattr(encoder, "text_model")


def _native_side(pipe) -> int:
    """The side the model draws best at: its denoiser's sample size in latents times the VAE's scale."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, list | tuple):
        sample = sample[0]
    return int(sample * scale) if isinstance(sample, int) else 512


class JobCancelled(Exception):
    """Raised inside the denoising loop when every job of the pipeline call has been cancelled."""


class JobSpans:
    """One job's spans on this worker, children of the trace context its request carried.

    ``queue`` (submitted until its batch starts), ``pipeline`` (the pipeline call, shared by its batch), under it
    ``denoising`` (from the call's start to its last step, prompt encoding included: pipelines have no hook before
    their first step; one ``step`` event per step), ``preview`` (each partial image: decoded on the engine thread,
    encoded on the encoder thread) and ``encode`` (the final images). Spans end on the thread that ends their work.
    """

    __slots__ = ("_last_step", "_lock", "context", "denoising", "pipeline", "queue")

    def __init__(self, context: telemetry.Context) -> None:
        self.context = context
        self._lock = threading.Lock()
        self.queue: telemetry.Span | None = telemetry.start_span("queue", context=context)
        self.pipeline: telemetry.Span | None = None
        self.denoising: telemetry.Span | None = None
        self._last_step: int | None = None

    def _end_queue(self, **attributes: object) -> None:
        with self._lock:
            span, self.queue = self.queue, None
        if span is not None:
            span.set_attributes(attributes)  # type: ignore[arg-type]
            span.end()

    def started(self, batch_size: int) -> None:
        """Its batch starts (engine thread)."""
        self._end_queue(**{"imagegate.batch_size": batch_size})

    def call(self, batch_size: int, steps: int) -> None:
        """Its pipeline call starts (engine thread)."""
        attributes = {"imagegate.batch_size": batch_size, "imagegate.steps": steps}
        self.pipeline = telemetry.start_span("pipeline", context=self.context, attributes=attributes)
        self.denoising = telemetry.start_span("denoising", context=telemetry.context_with(self.pipeline))
        self._last_step = None

    def step(self, step: int, total: int) -> None:
        """A denoising step ended (engine thread)."""
        if self.denoising is not None:
            self._last_step = time.time_ns()
            self.denoising.add_event("step", {"step": step, "total": total}, timestamp=self._last_step)

    def returned(self, error: BaseException | None = None) -> None:
        """Its pipeline call returned, or raised ``error`` (engine thread): denoising ended at its last step."""
        for span, end in ((self.denoising, self._last_step), (self.pipeline, None)):
            if span is None:
                continue
            if isinstance(error, JobCancelled):
                span.set_attribute("imagegate.cancelled", True)
            elif error is not None:
                telemetry.fail(span, error)
            span.end(end_time=end if error is None else None)
        self.denoising = self.pipeline = None

    def preview(self, started_ns: int) -> telemetry.Span:
        parent = self.denoising or self.pipeline
        context = self.context if parent is None else telemetry.context_with(parent)
        return telemetry.start_span("preview", context=context, start_time=started_ns)

    def encode(self) -> telemetry.Span:
        return telemetry.start_span("encode", context=self.context)

    def finish(self) -> None:
        """The job's request ended: a job that never left the queue ends its wait there."""
        self._end_queue(**{"imagegate.cancelled": True})


@dataclass(eq=False)
class Job:
    params: GenerationParams
    image: bytes | None = None
    mask: bytes | None = None
    key: tuple | None = None
    """Jobs with equal keys can share a pipeline call; None: this job always runs alone."""
    events: asyncio.Queue[WorkerEvent] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    spans: JobSpans | None = None
    """Its spans, when tracing is on and its request carried a trace context."""

    @property
    def pixels(self) -> int:
        """Output pixels, counted against the model's ``max_batch_pixels``."""
        return self.params.width * self.params.height * self.params.n

    def cancel(self) -> None:
        self.cancelled.set()


def batch_key(params: GenerationParams, loaded: LoadedModel) -> tuple | None:
    """What must be equal for jobs to share one pipeline call; None for a job that never shares one."""
    p = params
    if p.task == "background_removal":
        return None
    key = (p.model, p.task, p.width, p.height, p.steps, p.guidance, p.scheduler, p.strength, p.loras, p.clip_skip)
    if not (loaded.family.empty_negative_prompt or loaded.family.true_cfg):
        key += (bool(p.negative_prompt),)
    return key


@dataclass(eq=False)
class Training:
    """A LoRA training on this worker: its events, and how to stop it (between two optimiser steps)."""

    params: TrainingParams
    events: asyncio.Queue[WorkerEvent] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()


TRAINING_SLICE = 0.5
"""Seconds a training runs on the device before queued inference gets its turn (one step at least)."""


@dataclass(eq=False)
class _Run:
    """A job while the engine thread runs it: where its events go, and how it ended."""

    job: Job
    emit: Callable[[WorkerEvent], None]
    outcome: str = ""
    """Empty while it runs, then the health counter to bump: completed, cancelled or failed."""
    partials_sent: int = 0
    """Partial images sent so far (of each of its images); a rerun alone goes on from there."""


class Engine:
    """Runs batches of jobs on one device, oldest job first, streaming each job's events to its queue."""

    def __init__(
        self,
        device: str,
        models: list[ModelConfig],
        *,
        batch_window_ms: float = 5.0,
        adapter_dir: Path | None = None,
    ) -> None:
        self.device = device
        self._own_adapter_dir = adapter_dir is None
        self.adapter_files = AdapterFiles(adapter_dir or Path(tempfile.mkdtemp(prefix="imagegate-adapters-")))
        self.configs = models
        self.batch_window = batch_window_ms / 1000
        self.models: dict[str, LoadedModel] = {}
        self.status = "loading"
        self.error: str | None = None
        self._waiting: list[Job] = []
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{device}")
        # Encoding images (PNG/JPEG/WebP) happens here, in order, while the engine thread denoises on.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"encode-{device}")
        self._loop_task: asyncio.Task[None] | None = None
        self.running = 0
        self._batch: list[Job] = []
        self._stopping = False
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.trainings: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load every model on the engine's thread, then start taking jobs."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        self.status = "ready"
        self._loop_task = asyncio.create_task(self._run_forever(), name="engine")

    def _load(self) -> None:
        for config in self.configs:
            loaded = load_model(config, self.device)
            if hasattr(loaded.pipe, "load_lora_weights"):
                loaded.adapters = LoadedAdapters(
                    loaded.pipe, self.adapter_files, config.max_loaded_adapters, config.max_adapter_mb << 20
                )
            self.models[config.name] = loaded  # warmed up by its start-up check

    def health(self) -> HealthInfo:
        return HealthInfo(
            status=self.status,  # type: ignore[arg-type]
            device=self.device,
            models=[m.name for m in self.configs],
            queued=len(self._waiting),
            running=self.running,
            completed=self.completed,
            cancelled=self.cancelled,
            failed=self.failed,
            error=self.error,
            training=bool(self.trainings),
            tasks={name: sorted(loaded.tasks) for name, loaded in self.models.items()},
            details={
                name: ModelDetails(
                    family=loaded.family.name,
                    schedulers=list(loaded.schedulers),
                    default_steps=loaded.family.steps,
                    default_guidance=loaded.family.guidance,
                    lora=loaded.adapters is not None,
                    safety_checker=loaded.safety is not None,
                    clip_skip=_skips_clip(loaded, "text2img"),
                    trainable=_trainable(loaded.pipe),
                    native_side=_native_side(loaded.pipe),
                )
                for name, loaded in self.models.items()
            },
        )

    def submit(
        self,
        params: GenerationParams,
        image: bytes | None = None,
        mask: bytes | None = None,
        *,
        trace: telemetry.Context | None = None,
    ) -> Job:
        """Queue a job (or fail it at once); ``trace``: the context its spans are children of (tracing on)."""
        job = Job(params, image, mask)
        loaded = self.models.get(params.model)
        if loaded is None:
            job.events.put_nowait(Failed(f"model {params.model!r} is not loaded on this worker", "invalid_request"))
        elif params.task not in loaded.tasks:
            job.events.put_nowait(Failed(f"model {params.model!r} cannot run {params.task}", "invalid_request"))
        elif params.task != "text2img" and image is None:
            job.events.put_nowait(Failed(f"{params.task} needs an input image", "invalid_request"))
        elif params.task == "inpaint" and mask is None:
            job.events.put_nowait(Failed("inpaint needs a mask", "invalid_request", param="mask"))
        elif params.scheduler and params.scheduler not in loaded.schedulers:
            valid = ", ".join(loaded.schedulers) or "none (it runs its own)"
            message = f"scheduler {params.scheduler!r} does not apply to model {params.model!r}; valid: {valid}"
            job.events.put_nowait(Failed(message, "invalid_request", param="scheduler"))
        elif params.loras and (loaded.adapters is None or params.task == "background_removal"):
            job.events.put_nowait(Failed(f"model {params.model!r} cannot apply LoRA adapters", "invalid_request"))
        elif params.safety not in (None, "auto") and loaded.safety is None:
            message = f"model {params.model!r} has no safety checker (configure safety_checker for it)"
            job.events.put_nowait(Failed(message, "invalid_request", param="safety_checker"))
        elif params.clip_skip and not _skips_clip(loaded, params.task):
            message = f"model {params.model!r} cannot skip text-encoder layers (clip_skip) with this diffusers"
            job.events.put_nowait(Failed(message, "invalid_request", param="clip_skip"))
        elif params.negative_prompt and "negative_prompt" not in loaded.accepts[params.task]:
            job.events.put_nowait(Failed(f"model {params.model!r} does not take a negative_prompt", "invalid_request"))
        else:
            job.key = batch_key(params, loaded)
            if trace is not None:
                job.spans = JobSpans(trace)
            self._waiting.append(job)
            self._arrived.set()
        return job

    # -- training -------------------------------------------------------------------------------------------------

    def train(self, params: TrainingParams, files: list[bytes], checkpoint: bytes | None) -> Training:
        """Start a LoRA training of ``params.model`` (see :class:`~app.worker.protocol.TrainingParams`).

        It runs on the engine's thread in slices of :data:`TRAINING_SLICE` seconds, so inference and training never
        run at once on the device, and inference queued meanwhile runs between two slices.
        """
        training = Training(params)
        loaded = self.models.get(params.model)
        if loaded is None or not _trainable(loaded.pipe):
            why = "is not loaded on this worker" if loaded is None else "cannot be trained here (UNet models only)"
            training.events.put_nowait(Failed(f"model {params.model!r} {why}", "invalid_request"))
            return training
        task = asyncio.create_task(self._train(training, loaded, files, checkpoint), name="training")
        self.trainings.add(task)
        task.add_done_callback(self.trainings.discard)
        return training

    async def _train(self, t: Training, loaded: LoadedModel, files: list[bytes], checkpoint: bytes | None) -> None:
        from app.worker.training import LoraTrainer, TrainingCancelled, adapter_bytes

        loop = asyncio.get_running_loop()
        emit = functools.partial(loop.call_soon_threadsafe, t.events.put_nowait)
        p = t.params
        directory = Path(tempfile.mkdtemp(prefix="imagegate-training-"))

        def prepare() -> LoraTrainer:
            if checkpoint:
                (directory / "checkpoint.pt").write_bytes(checkpoint)
            pictures = [images.rgb(images.load(data)) for data in files]
            trainer = LoraTrainer(loaded.pipe, p.plan, pictures, p.captions, seed=p.seed, checkpoint_dir=directory)
            trainer.resume()
            return trainer

        def advance(trainer: LoraTrainer, previews: list[int]) -> None:
            def on_step(step: int, total: int, loss: float) -> None:
                emit(TrainingStep(step=step, total=total, loss=loss))
                if p.preview_every and (step % p.preview_every == 0 or step == total):
                    picture = trainer.preview(p.preview_prompt or p.trigger_word, p.seed)
                    emit(Partial(image_index=0, partial_index=step, data=encode_image(picture, "png", None)))
                    previews.append(step)

            trainer.advance(
                until=time.monotonic() + TRAINING_SLICE,
                on_step=on_step,
                should_stop=t.cancelled.is_set,
                on_checkpoint=lambda step, path: emit(Checkpoint(step=step, data=path.read_bytes())),
            )

        self.running += 1
        try:
            trainer = await loop.run_in_executor(self._executor, prepare)
            emit(Started(queue_seconds=time.monotonic() - t.enqueued_at, batch_size=1))
            previews: list[int] = []
            while not trainer.done:
                await loop.run_in_executor(self._executor, advance, trainer, previews)
            metadata = {"trigger_word": p.trigger_word, "rank": str(p.plan.rank)}
            data = await loop.run_in_executor(self._executor, lambda: adapter_bytes(trainer.weights(), metadata))
            emit(AdapterFile(data=data))
            emit(Done(seconds=time.monotonic() - t.enqueued_at))
            self.completed += 1
        except TrainingCancelled:
            self.cancelled += 1
            emit(CANCELLED)
        except images.InvalidInput as e:
            self.failed += 1
            emit(Failed(f"a training image cannot be used: {e}", "invalid_request"))
        except Exception as e:
            self.failed += 1
            if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.exception("training %s failed", p.request_id)
            kind = "out_of_memory" if isinstance(e, torch.OutOfMemoryError) else "internal"
            emit(Failed(f"training failed: {type(e).__name__}: {e}", kind))
        finally:
            self.running -= 1
            shutil.rmtree(directory, ignore_errors=True)

    # -- inference --------------------------------------------------------------------------------------------------

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._batch = await self._next_batch()
            runs = [
                _Run(job, functools.partial(loop.call_soon_threadsafe, job.events.put_nowait)) for job in self._batch
            ]
            self.running += len(runs)
            try:
                await loop.run_in_executor(self._executor, self._run, runs)
            finally:
                self.running -= len(runs)
                self._batch = []
            for run in runs:
                setattr(self, run.outcome, getattr(self, run.outcome) + 1)

    async def _next_batch(self) -> list[Job]:
        """The oldest queued job and the queued jobs that can join it, waiting the batch window while it has room."""
        while not self._drop_cancelled():
            self._arrived.clear()
            await self._arrived.wait()
        first = self._waiting.pop(0)
        batch = [first]
        capacity = self.models[first.params.model].config.max_batch_pixels
        if first.key is None or capacity == 0:
            return batch
        used = first.pixels
        smallest = first.params.width * first.params.height  # the least a compatible job can add
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_window
        while True:
            for job in self._drop_cancelled():
                if job.key == first.key and used + job.pixels <= capacity:
                    self._waiting.remove(job)
                    batch.append(job)
                    used += job.pixels
            remaining = deadline - loop.time()
            if used + smallest > capacity or remaining <= 0:
                return batch
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _drop_cancelled(self) -> list[Job]:
        """Forget queued jobs whose client went away; returns (a copy of) the rest, oldest first."""
        kept = [job for job in self._waiting if not job.cancelled.is_set()]
        self.cancelled += len(self._waiting) - len(kept)
        self._waiting[:] = kept
        return list(kept)

    def _run(self, runs: list[_Run]) -> None:
        """Run one batch on the engine thread; every run has an outcome when this returns."""
        t0 = time.monotonic()
        loaded = self.models[runs[0].job.params.model]
        for run in runs:
            tokens = loaded.count_tokens(run.job.params.prompt)
            run.emit(Started(queue_seconds=t0 - run.job.enqueued_at, prompt_tokens=tokens, batch_size=len(runs)))
            if run.job.spans is not None:
                run.job.spans.started(len(runs))
        self._attempt(loaded, runs, t0)

    def _attempt(self, loaded: LoadedModel, runs: list[_Run], t0: float) -> None:
        """Run ``runs`` in one pipeline call and end each of them (see the module docstring on failures)."""
        try:
            if runs[0].job.params.task == "background_removal":
                pictures = self._remove_background(loaded, runs[0].job)
            else:
                if loaded.adapters is not None:  # the batch shares its adapters: they are part of its key
                    loaded.adapters.apply(runs[0].job.params.loras)
                pictures = self._denoise(loaded, runs)
        except JobCancelled:
            return  # each run ended when its cancellation was seen
        except Exception as e:
            live = [run for run in runs if not run.outcome]
            if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(live) > 1:  # find the job at fault: the others must not fail with it
                log.info("a batch of %d failed (%s); running its jobs one at a time", len(live), type(e).__name__)
                for run in live:
                    self._attempt(loaded, [run], t0)
                return
            if not isinstance(e, torch.OutOfMemoryError | images.InvalidInput | NonFiniteOutput):
                log.exception("job(s) %s failed", ", ".join(run.job.params.request_id for run in live))
            for run in live:
                self._end(run, "failed", functools.partial(self._failure, e, run.job.params))
            return
        live = self._live(runs)
        start = 0
        for run in runs:
            n = run.job.params.n
            if run in live:
                mine, flags = self._screen(loaded, run.job.params, pictures[start : start + n])
                self._end(run, "completed", functools.partial(self._finals, run, mine, flags, t0))
            start += n

    def _failure(self, error: Exception, p: GenerationParams) -> list[WorkerEvent]:
        if isinstance(error, images.InvalidInput):
            return [Failed(str(error), "invalid_request")]
        if isinstance(error, torch.OutOfMemoryError):
            return [Failed(f"out of memory on {self.device} for {p.width}x{p.height} x{p.n}", "out_of_memory")]
        if isinstance(error, NonFiniteOutput):
            return [Failed(f"model {p.model!r}: {error}", "generation_failed")]
        # Anything else is the server's: its configuration, or a pipeline that cannot run what it was given.
        return [Failed(f"model {p.model!r} failed: {type(error).__name__}: {error}", "internal")]

    @staticmethod
    def _screen(loaded: LoadedModel, p: GenerationParams, pictures: list) -> tuple[list, list[bool]]:
        """The pictures after the safety checker the job asked for (on this thread: it is a model), and its flags."""
        if p.safety is None or loaded.safety is None or p.task == "background_removal":
            return pictures, [False] * len(pictures)
        flags = loaded.safety.flags(pictures)
        how = "black" if p.safety == "auto" else p.safety
        return [treat(im, how) if flagged else im for im, flagged in zip(pictures, flags, strict=True)], flags

    @staticmethod
    def _finals(run: _Run, pictures: list, flags: list[bool], t0: float) -> list[WorkerEvent]:
        p = run.job.params
        span = run.job.spans.encode() if run.job.spans is not None else None
        try:
            data = [encode_image(im, p.output_format, p.output_compression) for im in pictures]
        finally:
            if span is not None:
                span.set_attributes({"imagegate.images": len(pictures), "imagegate.format": p.output_format})
                span.end()
        events: list[WorkerEvent] = [Image(index=i, data=d, seed=p.seed + i, nsfw=flags[i]) for i, d in enumerate(data)]
        return [*events, Done(seconds=time.monotonic() - t0)]

    def _live(self, runs: list[_Run]) -> list[_Run]:
        """The runs still going, once those whose client has gone away are ended as cancelled."""
        for run in runs:
            if not run.outcome and run.job.cancelled.is_set():
                # Stopping is no cancellation by the client: it must reach the client as an error.
                last = Failed(f"the worker on {self.device} stopped", "internal") if self._stopping else CANCELLED
                self._end(run, "cancelled", lambda last=last: [last])
        return [run for run in runs if not run.outcome]

    def _end(self, run: _Run, outcome: str, make: Callable[[], list[WorkerEvent]]) -> None:
        """Send ``run``'s last events (made on the encoder thread); it gets no event after them."""
        run.outcome = outcome
        self._encode(make, run.emit)

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

        if not self._stopping:
            self._encoder.submit(run)
            return
        with contextlib.suppress(RuntimeError):  # stopping: the encoder is shut down, and the loop may be closed
            run()

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
    def _edit_input(job: Job) -> tuple[PILImage.Image, PILImage.Image | None]:
        """An edit's input image and redraw mask (None for img2img), at the output size."""
        p = job.params
        image = images.load(job.image)  # type: ignore[arg-type]
        mask = images.load(job.mask) if job.mask else None
        if p.task == "img2img":
            return images.resized(images.rgb(image), p.width, p.height), None
        if p.task == "outpaint":
            return images.outpaint_canvas(image, p.width, p.height, mask)
        canvas = images.resized(images.rgb(image), p.width, p.height)
        return canvas, images.resized(images.redraw_mask(mask), p.width, p.height, PILImage.Resampling.NEAREST)  # type: ignore[arg-type]

    @classmethod
    def _inputs(cls, runs: list[_Run]) -> dict:
        """The pipeline arguments for the output size and an edit's images and masks (one per output image)."""
        p = runs[0].job.params
        if p.task == "text2img":
            return {}
        pictures, masks = [], []
        for run in runs:
            picture, mask = cls._edit_input(run.job)
            pictures += [picture] * run.job.params.n
            masks += [mask] * run.job.params.n
        if p.task == "img2img":
            return {"image": pictures, "strength": p.strength}
        return {"image": pictures, "mask_image": masks, "strength": p.strength}

    @staticmethod
    def _sizing(accepted: frozenset[str], p: GenerationParams) -> dict:
        """The output size and no resolution binning, for pipelines that take them.

        SD's image-to-image pipelines take no size: they draw at their input's, which is already the output size. A
        pipeline that snaps sizes to its own table (resolution binning) would not draw the size asked for.
        """
        sizing = {"height": p.height, "width": p.width} if "height" in accepted else {}
        if "use_resolution_binning" in accepted:
            sizing["use_resolution_binning"] = False
        return sizing

    def _denoise(self, loaded: LoadedModel, runs: list[_Run]) -> list:
        """One pipeline call for ``runs`` (which share a batch key); returns their images in order, ``n`` each."""
        p = runs[0].job.params
        if not self._live(runs):
            raise JobCancelled
        scheduler = loaded.make_scheduler(p.scheduler)
        pipe = loaded.pipeline_for(p.task, scheduler)
        tracker = X0Tracker(scheduler)
        rows: dict[_Run, list[int]] = {}  # a run's images in the call
        start = 0
        for run in runs:
            rows[run] = list(range(start, start + run.job.params.n))
            start += run.job.params.n
        marks: dict[_Run, list[int]] = {}

        def on_step(pipe_, i: int, t, kwargs: dict) -> dict:
            live = self._live(runs)
            if not live:
                raise JobCancelled
            total = getattr(pipe_, "num_timesteps", None) or p.steps
            step = i + 1
            if not marks:
                marks.update({run: preview_steps(total, run.job.params.partial_images) for run in runs})
            for run in live:
                run.emit(Progress(step=step, total=total))
                if run.job.spans is not None:
                    run.job.spans.step(step, total)
            # A run is owed the partial images whose steps have passed (a rerun skips those it has sent already).
            owed = {run: sum(m <= step for m in marks[run]) for run in live}
            due = [run for run in live if owed[run] > run.partials_sent]
            if due and not loaded.previews_failed:
                decoding = time.time_ns()
                x0 = tracker.latest if tracker.latest is not None else kwargs["latents"]
                try:
                    pictures = loaded.previewer(x0[[row for run in due for row in rows[run]]], p.width, p.height)
                except Exception:  # a preview is a courtesy: it never fails the request
                    loaded.previews_failed = True
                    log.exception("model %s: partial images cannot be decoded; sending none from now on", p.model)
                    pictures = []
                for run in due if pictures else []:
                    n = run.job.params.n
                    self._send_partials(run, pictures[:n], owed[run], decoding)
                    pictures = pictures[n:]
            tracker.wanted = any(step + 1 in marks[run] for run in live)
            return kwargs

        expected = max(1, int(p.steps * (p.strength or 1.0)))
        tracker.wanted = any(1 in preview_steps(expected, run.job.params.partial_images) for run in runs)
        accepts = loaded.accepts[p.task]
        kwargs = {
            **self._inputs(runs),
            **self._sizing(accepts, p),
            "prompt": [run.job.params.prompt for run in runs for _ in rows[run]],
            "num_inference_steps": p.steps,
            "guidance_scale": p.guidance,
            "num_images_per_prompt": 1,
            # Noise comes from CPU generators, so a seed gives the same image on any device and in any batch.
            "generator": [
                torch.Generator("cpu").manual_seed(run.job.params.seed + i)
                for run in runs
                for i in range(run.job.params.n)
            ],
            "output_type": "np",
        }
        if p.clip_skip:
            kwargs["clip_skip"] = p.clip_skip
        if "callback_on_step_end" in accepts:
            kwargs.update(callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
        else:  # the legacy form (PixArt): called after each step with the latents
            kwargs.update(callback=lambda i, t, latents: on_step(pipe, i, t, {"latents": latents}), callback_steps=1)
        if loaded.family.true_cfg:  # guidance applies only with a negative prompt: always send one
            kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale")
        if loaded.family.true_cfg or any(run.job.params.negative_prompt for run in runs):
            kwargs["negative_prompt"] = [run.job.params.negative_prompt or "" for run in runs for _ in rows[run]]
            if loaded.family.negative_cfg and "true_cfg_scale" in accepts:  # else the pipeline ignores it
                kwargs["true_cfg_scale"] = loaded.family.negative_cfg
        traced = [run.job.spans for run in runs if run.job.spans is not None]
        for spans in traced:
            spans.call(len(runs), p.steps)
        try:
            output = pipe(**kwargs)
        except BaseException as e:
            for spans in traced:
                spans.returned(e)
            raise
        for spans in traced:
            spans.returned()
        return to_pictures(output.images)

    def _send_partials(self, run: _Run, pictures: list, upto: int, decoding: int = 0) -> None:
        """Send ``run`` its partial images numbered from ``partials_sent`` to ``upto`` (all showing ``pictures``).

        ``decoding``: when their decoding started (``time.time_ns``), for the preview span.
        """
        p = run.job.params
        first, run.partials_sent = run.partials_sent, upto
        span = run.job.spans.preview(decoding or time.time_ns()) if run.job.spans is not None else None

        def partials() -> list[WorkerEvent]:
            try:
                encoded = [encode_image(im, p.output_format, p.output_compression, fast=True) for im in pictures]
            finally:
                if span is not None:
                    span.set_attributes({"imagegate.partial_index": upto - 1, "imagegate.images": len(pictures)})
                    span.end()
            return [
                Partial(image_index=index, partial_index=k, data=data)
                for k in range(first, upto)
                for index, data in enumerate(encoded)
            ]

        self._encode(partials, run.emit)

    async def stop(self) -> None:
        """Stop taking jobs and cancel every job, running ones included (they stop at their next step)."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        for job in [*self._batch, *self._waiting]:
            job.cancel()
        for task in self.trainings:
            task.cancel()
        self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._encoder.shutdown(wait=False, cancel_futures=True)
        if self._own_adapter_dir:
            shutil.rmtree(self.adapter_files.directory, ignore_errors=True)
