"""Dynamic batching in the worker's engine, in process, on the demo model (real diffusers, CPU)."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from app.config import demo_model
from app.worker.engine import Engine, Job
from app.worker.protocol import (
    DIFFUSION_SCHEDULERS,
    Done,
    Failed,
    GenerationParams,
    Image,
    Partial,
    Progress,
    Started,
    WorkerEvent,
)

MODEL = "imagegate-demo"
SIDE = 64
STEPS = 8
# Most a pixel may differ between an image made alone and in a batch (float noise of batched kernels).
TOLERANCE = 3


async def started_engine(data_dir: Path, *, max_batch_pixels: int = 2_097_152, window_ms: float = 5.0) -> Engine:
    config = demo_model(str(data_dir))
    config.max_batch_pixels = max_batch_pixels
    engine = Engine("cpu", [config], batch_window_ms=window_ms)
    await engine.start()
    return engine


@pytest.fixture
async def engine(data_dir):
    engine = await started_engine(data_dir)
    yield engine
    await engine.stop()


def params(seed: int, **kw) -> GenerationParams:
    base = {"model": MODEL, "prompt": f"prompt {seed}", "width": SIDE, "height": SIDE, "steps": STEPS}
    return GenerationParams(**{**base, "guidance": 7.5, "seed": seed, "scheduler": "ddim", **kw})


async def events_of(job: Job) -> list[WorkerEvent]:
    """Every event of ``job`` up to and including its Done or Failed."""
    events: list[WorkerEvent] = []
    while not events or not isinstance(events[-1], Done | Failed):
        events.append(await asyncio.wait_for(job.events.get(), 120))
    return events


async def run_all(engine: Engine, *jobs: tuple[GenerationParams, bytes | None, bytes | None]) -> list[list]:
    """Submit ``jobs`` in one go (so they queue together) and collect their events."""
    submitted = [engine.submit(p, image, mask) for p, image, mask in jobs]
    return list(await asyncio.gather(*(events_of(job) for job in submitted)))


async def alone(engine: Engine, p: GenerationParams, image: bytes | None = None, mask: bytes | None = None) -> list:
    [events] = await run_all(engine, (p, image, mask))
    assert started(events).batch_size == 1
    return pictures(events)


def started(events: list[WorkerEvent]) -> Started:
    [event] = [e for e in events if isinstance(e, Started)]
    return event


def pictures(events: list[WorkerEvent]) -> list[np.ndarray]:
    assert isinstance(events[-1], Done), events[-1]
    found = [e for e in events if isinstance(e, Image)]
    assert [e.index for e in found] == list(range(len(found)))
    return [np.asarray(PILImage.open(io.BytesIO(e.data)).convert("RGB"), dtype=np.int16) for e in found]


def partial_pictures(events: list[WorkerEvent]) -> list[np.ndarray]:
    found = sorted((e for e in events if isinstance(e, Partial)), key=lambda e: (e.image_index, e.partial_index))
    return [np.asarray(PILImage.open(io.BytesIO(e.data)).convert("RGB"), dtype=np.int16) for e in found]


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.abs(x - y).max() <= TOLERANCE


def png(colour: tuple[int, int, int], mode: str = "RGB", size: tuple[int, int] = (SIDE, SIDE)) -> bytes:
    buf = io.BytesIO()
    PILImage.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def hole_mask() -> bytes:
    mask = PILImage.new("RGBA", (SIDE, SIDE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    return buf.getvalue()


async def test_compatible_jobs_form_one_batch_with_the_images_they_make_alone(engine):
    jobs = [params(seed) for seed in (1, 2, 3, 4)]
    together = await run_all(engine, *((p, None, None) for p in jobs))
    assert [started(events).batch_size for events in together] == [4, 4, 4, 4]
    for p, events in zip(jobs, together, strict=True):
        assert_same(pictures(events), await alone(engine, p))
    assert (engine.health().completed, engine.health().failed, engine.health().running) == (8, 0, 0)


@pytest.mark.parametrize("scheduler", DIFFUSION_SCHEDULERS)
async def test_a_seed_fixes_the_image_with_every_scheduler_alone_and_in_a_batch(engine, scheduler):
    # Stochastic schedulers (euler_a, ddpm) draw noise at every step: it must come from the job's own generators.
    p = params(5, scheduler=scheduler, partial_images=1)
    first = await alone(engine, p)
    torch.randn(8)  # moves torch's global RNG, which must play no part
    assert [x.tobytes() for x in await alone(engine, p)] == [x.tobytes() for x in first]
    batched, _ = await run_all(engine, (p, None, None), (params(6, scheduler=scheduler), None, None))
    assert started(batched).batch_size == 2
    assert_same(pictures(batched), first)


async def test_the_images_differ_by_seed(engine):
    # The equality checks above mean something only if different seeds make different images.
    a, b = await run_all(engine, (params(1), None, None), (params(2), None, None))
    assert np.abs(pictures(a)[0] - pictures(b)[0]).max() > 20


async def test_negative_prompts_mix_with_jobs_without_one(engine):
    jobs = [params(1, negative_prompt="blurry"), params(2), params(3, negative_prompt="dark")]
    together = await run_all(engine, *((p, None, None) for p in jobs))
    assert [started(events).batch_size for events in together] == [3, 3, 3]
    for p, events in zip(jobs, together, strict=True):
        assert_same(pictures(events), await alone(engine, p))


async def test_each_job_gets_its_own_partial_images(engine):
    jobs = [params(1, partial_images=1), params(2), params(3, n=2, partial_images=3), params(4, partial_images=2)]
    together = await run_all(engine, *((p, None, None) for p in jobs))
    assert {started(events).batch_size for events in together} == {4}
    for p, events in zip(jobs, together, strict=True):
        partials = [(e.image_index, e.partial_index) for e in events if isinstance(e, Partial)]
        expected = {(i, k) for i in range(p.n) for k in range(p.partial_images)}
        assert sorted(partials) == sorted(expected)
        assert len(pictures(events)) == p.n
        progress = [e.step for e in events if isinstance(e, Progress)]
        assert progress == list(range(1, STEPS + 1))
        # Its partial images show its own images, as they do when it runs alone.
        [unbatched] = await run_all(engine, (p, None, None))
        assert started(unbatched).batch_size == 1
        assert_same(partial_pictures(events), partial_pictures(unbatched))


async def test_each_job_of_a_batch_gets_its_own_spans(engine):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from app import telemetry

    exporter = InMemorySpanExporter()
    telemetry.setup(telemetry.WORKER, exporter=exporter)
    try:
        roots = [telemetry.start_span(f"job {k}", server=True) for k in range(2)]
        jobs = [
            engine.submit(params(k + 1, partial_images=k + 1), trace=telemetry.context_with(root))
            for k, root in enumerate(roots)
        ]
        together = await asyncio.gather(*(events_of(job) for job in jobs))
        for job in jobs:
            job.spans.finish()  # as the server does when the job's request ends
        for root in roots:
            root.end()  # the engine's spans ended before the events they made were sent
    finally:
        telemetry.shutdown()
    assert [started(events).batch_size for events in together] == [2, 2]
    spans = exporter.get_finished_spans()
    for k, root in enumerate(roots):
        mine = [s for s in spans if s.context.trace_id == root.get_span_context().trace_id]
        names = sorted(s.name for s in mine)
        assert names == sorted([f"job {k}", "queue", "pipeline", "denoising", "encode", *["preview"] * (k + 1)])
        named = {s.name: s for s in mine}
        assert named["pipeline"].attributes["imagegate.batch_size"] == 2
        assert named["queue"].attributes["imagegate.batch_size"] == 2
        assert named["denoising"].parent.span_id == named["pipeline"].context.span_id
        assert [e.attributes["step"] for e in named["denoising"].events] == list(range(1, STEPS + 1))
        for name in ("queue", "pipeline", "encode"):
            assert named[name].parent.span_id == root.get_span_context().span_id
    assert telemetry.ENABLED is False


async def test_a_job_with_two_images_batches_with_a_job_with_one(engine):
    two, one = params(10, n=2), params(20)
    a, b = await run_all(engine, (two, None, None), (one, None, None))
    assert started(a).batch_size == started(b).batch_size == 2
    assert [(e.index, e.seed) for e in a if isinstance(e, Image)] == [(0, 10), (1, 11)]
    assert [(e.index, e.seed) for e in b if isinstance(e, Image)] == [(0, 20)]
    assert_same(pictures(a), await alone(engine, two))
    assert_same(pictures(b), await alone(engine, one))


async def test_cancelling_one_job_leaves_the_others_alone(engine):
    steps = 40
    jobs = [params(seed, steps=steps) for seed in (1, 2, 3)]
    submitted = [engine.submit(p) for p in jobs]
    victim = submitted[1]
    seen = []
    while not any(isinstance(e, Progress) for e in seen):
        seen.append(await asyncio.wait_for(victim.events.get(), 120))
    victim.cancel()
    survivors = await asyncio.gather(events_of(submitted[0]), events_of(submitted[2]))
    rest = await events_of(victim)
    assert isinstance(rest[-1], Failed) and rest[-1].kind == "cancelled"
    assert not any(isinstance(e, Image | Done) for e in rest)
    assert victim.events.empty()  # nothing after Failed, though the batch went on
    for p, events in zip([jobs[0], jobs[2]], survivors, strict=True):
        assert started(events).batch_size == 3
        assert len([e for e in events if isinstance(e, Progress)]) == steps
        assert_same(pictures(events), await alone(engine, p))
    health = engine.health()
    assert (health.completed, health.cancelled, health.failed, health.running) == (4, 1, 0, 0)


async def test_cancelling_every_job_stops_the_pipeline_call(engine):
    steps = 60
    submitted = [engine.submit(params(seed, steps=steps)) for seed in (1, 2)]
    first = await asyncio.wait_for(submitted[0].events.get(), 120)
    assert isinstance(first, Started)
    for job in submitted:
        job.cancel()
    for job in submitted:
        events = await events_of(job)
        assert events[-1] == Failed("the client went away", "cancelled")
        assert len([e for e in events if isinstance(e, Progress)]) < steps
    # The engine is free again at once: a new job runs (alone) and completes.
    assert len(await alone(engine, params(5, steps=2))) == 1
    health = engine.health()
    assert (health.completed, health.cancelled, health.running) == (1, 2, 0)


async def test_an_incompatible_job_in_the_queue_does_not_block_compatible_ones(engine):
    wide = params(7, width=2 * SIDE)
    a, b, c = await run_all(engine, (params(1), None, None), (wide, None, None), (params(3), None, None))
    assert (started(a).batch_size, started(b).batch_size, started(c).batch_size) == (2, 1, 2)
    assert started(b).queue_seconds > started(a).queue_seconds  # it ran after the batch of the other two
    assert_same(pictures(b), await alone(engine, wide))


async def test_the_oldest_job_starts_the_next_batch(engine):
    # a, b (compatible), c (other size), d (compatible with c): batch [a, b] then [c, d].
    other = {"width": 2 * SIDE}
    jobs = [params(1), params(2), params(3, **other), params(4, **other)]
    results = await run_all(engine, *((p, None, None) for p in jobs))
    assert [started(events).batch_size for events in results] == [2, 2, 2, 2]
    a, b, c, d = (started(events).queue_seconds for events in results)
    assert max(a, b) < min(c, d)


async def test_jobs_of_other_steps_or_guidance_do_not_share_a_call(engine):
    jobs = [params(1), params(2, steps=STEPS + 1), params(3, guidance=3.0), params(4, scheduler="euler")]
    results = await run_all(engine, *((p, None, None) for p in jobs))
    assert [started(events).batch_size for events in results] == [1, 1, 1, 1]


async def test_max_batch_pixels_caps_the_batch(data_dir):
    engine = await started_engine(data_dir, max_batch_pixels=2 * SIDE * SIDE)
    try:
        results = await run_all(engine, *((params(seed), None, None) for seed in range(5)))
        assert [started(events).batch_size for events in results] == [2, 2, 2, 2, 1]
        # A job of two images fills the batch; one of three is over the cap and runs alone.
        results = await run_all(
            engine, (params(1, n=2), None, None), (params(2), None, None), (params(3, n=3), None, None)
        )
        assert [started(events).batch_size for events in results] == [1, 1, 1]
        assert [len(pictures(events)) for events in results] == [2, 1, 3]
    finally:
        await engine.stop()


async def test_max_batch_pixels_zero_runs_every_job_alone(data_dir):
    engine = await started_engine(data_dir, max_batch_pixels=0)
    try:
        results = await run_all(engine, *((params(seed), None, None) for seed in range(3)))
        assert [started(events).batch_size for events in results] == [1, 1, 1]
    finally:
        await engine.stop()


async def test_a_batch_with_room_waits_the_window_and_a_full_one_starts(data_dir):
    engine = await started_engine(data_dir, max_batch_pixels=2 * SIDE * SIDE, window_ms=60_000)
    try:
        t0 = time.monotonic()
        first = engine.submit(params(1))
        while engine.health().queued:  # the engine has taken it and waits for company
            await asyncio.sleep(0.001)
        results = await asyncio.gather(events_of(first), events_of(engine.submit(params(2))))
        assert [started(events).batch_size for events in results] == [2, 2]
        assert time.monotonic() - t0 < 30  # the second job filled the batch: it did not wait out the window
    finally:
        await engine.stop()


async def test_without_a_window_a_job_starts_with_what_is_queued(data_dir):
    engine = await started_engine(data_dir, window_ms=0)
    try:
        first = engine.submit(params(1))
        while engine.health().queued:
            await asyncio.sleep(0.001)
        results = await asyncio.gather(events_of(first), events_of(engine.submit(params(2))))
        assert [started(events).batch_size for events in results] == [1, 1]
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("img2img", {"strength": 0.75}),
        ("inpaint", {"strength": 1.0}),
        ("outpaint", {"strength": 1.0, "width": 2 * SIDE}),
    ],
)
async def test_edits_batch_with_the_images_they_make_alone(engine, task, extra):
    mask = hole_mask() if task == "inpaint" else None
    jobs = [
        (params(1, task=task, **extra), png((200, 30, 30)), mask),
        (params(2, task=task, n=2, **extra), png((30, 200, 30)), mask),
        (params(3, task=task, partial_images=1, **extra), png((30, 30, 200)), mask),
    ]
    together = await run_all(engine, *jobs)
    assert [started(events).batch_size for events in together] == [3, 3, 3]
    for (p, image, mask_), events in zip(jobs, together, strict=True):
        assert_same(pictures(events), await alone(engine, p, image, mask_))


async def test_a_bad_input_fails_only_its_own_job(engine):
    good = (params(1, task="img2img", strength=0.75), png((200, 30, 30)), None)
    bad = (params(2, task="img2img", strength=0.75), b"not an image", None)
    ok, failed = await run_all(engine, good, bad)
    assert started(ok).batch_size == started(failed).batch_size == 2
    assert failed[-1].kind == "invalid_request" and "could not be decoded" in failed[-1].message
    assert_same(pictures(ok), await alone(engine, *good))
    health = engine.health()
    assert (health.completed, health.failed) == (2, 1)


def fail_batches(engine: Engine, error: Exception, *, alone_too: str | None = None) -> None:
    """Make the demo model's pipeline calls of several jobs (prompts) fail with ``error`` after denoising, and those of
    prompt ``alone_too`` at once."""
    loaded = engine.models[MODEL]
    pipeline_for = loaded.pipeline_for

    def failing(task, scheduler):
        pipe = pipeline_for(task, scheduler)

        def call(**kwargs):
            if kwargs["prompt"] == [alone_too]:
                raise error
            images = pipe(**kwargs).images
            if len(set(kwargs["prompt"])) > 1:  # at the end, as when decoding a batch runs out of memory
                raise error
            return type("Output", (), {"images": images})

        return call

    loaded.pipeline_for = failing  # type: ignore[method-assign]


async def test_out_of_memory_in_a_batch_reruns_its_jobs_alone(engine):
    jobs = [params(1, partial_images=2), params(2, prompt="too big"), params(3, n=2)]
    unbatched = [await alone(engine, p) for p in (jobs[0], jobs[2])]
    fail_batches(engine, torch.OutOfMemoryError("fake"), alone_too="too big")
    a, big, c = await run_all(engine, *((p, None, None) for p in jobs))
    assert big[-1].kind == "out_of_memory"
    assert not any(isinstance(e, Image) for e in big)
    assert_same(pictures(a), unbatched[0])
    assert_same(pictures(c), unbatched[1])
    # The batch sent partial images before it failed; the rerun does not send them again, nor Started.
    assert [started(events).batch_size for events in (a, big, c)] == [3, 3, 3]
    assert [e.partial_index for e in a if isinstance(e, Partial)] == [0, 1]
    health = engine.health()
    assert (health.completed, health.failed) == (4, 1)


@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("a diffusers check"), KeyError("latents")])
async def test_any_failure_in_a_batch_fails_only_the_job_at_fault(engine, error):
    jobs = [params(1), params(2, prompt="at fault"), params(3, partial_images=1)]
    unbatched = [await alone(engine, p) for p in (jobs[0], jobs[2])]
    fail_batches(engine, error, alone_too="at fault")
    a, bad, c = await run_all(engine, *((p, None, None) for p in jobs))
    # The pipeline's own errors are the server's (5xx), named with the model, never a 400 with library internals.
    assert bad[-1] == Failed(f"model {MODEL!r} failed: {type(error).__name__}: {error}", "internal")
    assert_same(pictures(a), unbatched[0])
    assert_same(pictures(c), unbatched[1])
    assert (engine.health().completed, engine.health().failed) == (4, 1)


def nan_output(engine: Engine, prompt: str) -> None:
    """Make the demo model's pipeline produce NaN for the rows of ``prompt`` (as a scheduler it cannot run does)."""
    loaded = engine.models[MODEL]
    pipeline_for = loaded.pipeline_for

    def patched(task, scheduler):
        pipe = pipeline_for(task, scheduler)

        def call(**kwargs):
            images = pipe(**kwargs).images
            for row, text in enumerate(kwargs["prompt"]):
                if text == prompt:
                    images[row] = np.nan
            return type("Output", (), {"images": images})

        return call

    loaded.pipeline_for = patched  # type: ignore[method-assign]


async def test_nan_values_fail_the_job_instead_of_a_black_image(engine):
    good = params(1)
    expected = await alone(engine, good)
    nan_output(engine, "poisoned")
    ok, poisoned = await run_all(engine, (good, None, None), (params(2, prompt="poisoned"), None, None))
    assert poisoned[-1].kind == "generation_failed" and "NaN" in poisoned[-1].message
    assert not any(isinstance(e, Image) for e in poisoned)
    assert_same(pictures(ok), expected)


async def test_a_preview_that_cannot_be_decoded_never_fails_the_request(engine, caplog):
    loaded = engine.models[MODEL]

    def broken(*args):
        raise RuntimeError("Expected 3D or 4D input")

    loaded.previewer = broken  # type: ignore[assignment]
    [first] = await run_all(engine, (params(1, partial_images=2), None, None))
    [second] = await run_all(engine, (params(2, partial_images=1), None, None))
    assert isinstance(first[-1], Done) and not any(isinstance(e, Partial) for e in first)
    assert len(pictures(first)) == len(pictures(second)) == 1
    assert sum("cannot be decoded" in r.getMessage() for r in caplog.records) == 1  # said once, not per step


def test_sizes_and_binning_go_to_pipelines_that_take_them():
    p = params(1, width=64, height=96)
    binning = frozenset({"prompt", "height", "width", "use_resolution_binning"})
    assert Engine._sizing(binning, p) == {"height": 96, "width": 64, "use_resolution_binning": False}
    assert Engine._sizing(frozenset({"prompt", "image", "strength"}), p) == {}  # SD img2img: its input's size


async def test_each_task_knows_what_its_pipeline_takes(engine):
    accepts = engine.models[MODEL].accepts
    assert set(accepts) == {"text2img", "img2img", "inpaint", "outpaint"}
    assert "height" in accepts["text2img"] and "height" not in accepts["img2img"]  # StableDiffusionImg2ImgPipeline
    assert "mask_image" in accepts["inpaint"]


async def test_clip_skip_is_applied_where_the_stack_can_and_refused_where_it_cannot(engine):
    """diffusers' clip_skip reaches the pipeline, and jobs with another clip_skip never share its call; on a stack
    whose text encoder lacks what diffusers reads for it (transformers 5), it is a clean refusal, not a crash."""
    loaded = engine.models[MODEL]
    if not hasattr(loaded.pipe.text_encoder, "text_model"):
        [events] = await run_all(engine, (params(4, clip_skip=1), None, None))
        assert isinstance(events[-1], Failed) and events[-1].kind == "invalid_request", events[-1]
        assert events[-1].param == "clip_skip"
        return
    plain, skipped, again = await run_all(
        engine, (params(4), None, None), (params(4, clip_skip=1), None, None), (params(4), None, None)
    )
    assert pictures(plain)[0].tolist() == pictures(again)[0].tolist()
    assert pictures(skipped)[0].tolist() != pictures(plain)[0].tolist()
    assert [started(e).batch_size for e in (plain, skipped, again)] == [2, 1, 2]


async def test_the_safety_checker_runs_when_asked_and_treats_what_it_flags(data_dir, tmp_path):
    from app.worker.protocol import Image as ImageEvent
    from tests.safety import make_checker

    config = demo_model(str(data_dir))
    config.safety_checker = str(make_checker(tmp_path / "checker"))
    engine = Engine("cpu", [config])
    await engine.start()
    try:
        assert engine.health().details[MODEL].safety_checker
        outcomes = await run_all(
            engine,
            *((params(5, safety=how), None, None) for how in (None, "auto", "black", "blur", "pixelate")),
            (params(5, safety="sensitive_content_text"), None, None),
        )
        plain, auto, black, blur, pixelate, notice = (pictures(o)[0] for o in outcomes)
        nsfw = [next(e.nsfw for e in o if isinstance(e, ImageEvent)) for o in outcomes]
        assert nsfw == [False, True, True, True, True, True]  # this checker flags everything it is shown
        assert not black.any() and not auto.any()  # auto: blacked out, as diffusers does
        for treated in (blur, pixelate, notice):
            assert treated.any() and treated.tolist() != plain.tolist()
        assert np.abs(blur.astype(int) - plain).mean() < np.abs(notice.astype(int) - plain).mean()
    finally:
        await engine.stop()


async def test_a_model_without_a_checker_refuses_a_treatment_and_skips_auto(engine):
    [refused] = await run_all(engine, (params(6, safety="blur"), None, None))
    assert isinstance(refused[-1], Failed) and refused[-1].param == "safety_checker"
    [auto] = await run_all(engine, (params(6, safety="auto"), None, None))
    assert isinstance(auto[-1], Done)
