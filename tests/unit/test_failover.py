"""ImageService over a pool of several FakeBackends: failover, fallback models, deadlines, usage and metrics.

Prometheus metrics are process-global, so every test uses its own model and backend names.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from app.auth.guard import Guard
from app.auth.principals import Principal
from app.backends.fake import FakeBackend, fake_image
from app.config import load_settings
from app.errors import (
    BackendFailed,
    DeadlineExceeded,
    InvalidRequest,
    OutOfMemory,
    PermissionDenied,
    Unavailable,
)
from app.pool import Breaker, Pool, PowerOfTwoLeastWork, State
from app.protocol.images import (
    Fallback,
    ImageGenCompletedEvent,
    ImageGenerateRequest,
    ImageGenPartialImageEvent,
)
from app.services.images import ImageService
from app.store.files import ImageFiles
from app.store.keys import SqlKeyStore, Usage
from app.worker.protocol import Done, Failed, GenerationParams, Image, Progress, Started, WorkerEvent
from tests.helpers import InOrder, sample

NOW = 1_750_000_000.0
_ids = itertools.count()


def _n(prefix: str) -> str:
    return f"fo-{prefix}-{next(_ids)}"


def _model(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "path": f"/m/{name}", "default_size": "64x64", "default_steps": 4, **fields}


def _req(model: str, **fields: Any) -> ImageGenerateRequest:
    return ImageGenerateRequest(**{"prompt": "a red fox", "model": model, **fields})


def retries(model: str) -> float:
    return sample("imagegate_retries_total", model=model)


def failures(backend: FakeBackend) -> float:
    return sample("imagegate_backend_failures_total", backend=backend.name)


def fallbacks(model: str, fallback: str) -> float:
    return sample("imagegate_fallbacks_total", model=model, fallback=fallback)


class Scripted(FakeBackend):
    """Yields ``script``'s events in order; an exception in it is raised at that point."""

    def __init__(self, name: str, script: list[WorkerEvent | Exception]) -> None:
        super().__init__(name=name)
        self.script = script

    async def generate(
        self, params: GenerationParams, attachments: Sequence[BinaryIO] = ()
    ) -> AsyncIterator[WorkerEvent]:
        self.started += 1
        for item in self.script:
            if isinstance(item, Exception):
                raise item
            yield item


def _service(
    tmp_path: Path,
    models: list[dict[str, Any]],
    backends: list[tuple[FakeBackend, list[str]]],
    *,
    policy: Any = None,
    guard: Guard | None = None,
    **overrides: Any,
) -> ImageService:
    overrides = {"data_dir": str(tmp_path), "models": models, "cooldown_failures": 100, **overrides}
    settings = load_settings(environ={}, overrides=overrides)
    breaker = Breaker(settings.cooldown_failures, settings.cooldown_window, settings.cooldown_seconds)
    pool = Pool(settings.resolved_models(), policy or InOrder(), breaker=breaker)
    for backend, served in backends:
        pool.add(backend, served, state=State.READY)
    files = ImageFiles(tmp_path / "images", b"s" * 32, 600, clock=lambda: NOW)
    return ImageService(settings, pool, files, clock=lambda: NOW, guard=guard)


def assert_released(service: ImageService) -> None:
    pool = service.pool
    for m in pool.members:
        assert (m.outstanding, m.outstanding_work, m.queued) == (0, 0.0, 0), m.name
    assert all(v == 0 for v in pool._outstanding.values()), pool._outstanding
    assert all(v == 0 for v in pool._queued.values()), pool._queued


async def _drain(stream, seen: list | None = None) -> list:
    """Every event of ``stream`` (into ``seen`` as they come), then close it."""
    seen = [] if seen is None else seen
    try:
        async for event in stream:
            seen.append(event)
    finally:
        await stream.aclose()
    return seen


# -- failover to another backend of the same model --------------------------------------------------------------


async def test_failure_before_any_event_moves_the_job_to_another_backend(tmp_path):
    model = _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(bad, [model]), (good, [model])])
    before = retries(model), sample("imagegate_images_total", model=model, outcome="success")

    response = await service.generate(_req(model, n=2), "http://h")

    assert len(response.data) == 2
    assert (bad.started, good.started, good.completed) == (1, 1, 1)
    assert retries(model) == before[0] + 1
    assert failures(bad) == 1
    assert failures(good) == 0
    assert sample("imagegate_backend_requests_total", backend=bad.name) == 1
    assert sample("imagegate_backend_requests_total", backend=good.name) == 1
    assert sample("imagegate_images_total", model=model, outcome="success") == before[1] + 2
    assert sample("imagegate_images_total", model=model, outcome="error") == 0
    assert_released(service)


async def test_a_backend_is_never_tried_twice(tmp_path):
    model = _n("m")
    bad = FakeBackend(_n("bad"), fail="before")
    service = _service(tmp_path, [_model(model)], [(bad, [model])], max_attempts=3)
    with pytest.raises(BackendFailed) as info:
        await service.generate(_req(model), "http://h")
    assert info.value.status == 502
    assert bad.started == 1, "the only backend was tried again"
    assert retries(model) == 0
    assert failures(bad) == 1
    assert sample("imagegate_images_total", model=model, outcome="error") == 1
    assert_released(service)


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
async def test_attempts_are_bounded_by_max_attempts(tmp_path, max_attempts):
    model = _n("m")
    bad = [FakeBackend(_n("bad"), fail="before") for _ in range(4)]
    service = _service(
        tmp_path,
        [_model(model)],
        [(b, [model]) for b in bad],
        policy=PowerOfTwoLeastWork(rng=random.Random(max_attempts)),
        max_attempts=max_attempts,
    )
    with pytest.raises(BackendFailed) as info:
        await service.generate(_req(model), "http://h")
    assert info.value.status == 502
    assert sum(b.started for b in bad) == max_attempts
    assert all(b.started <= 1 for b in bad), [b.started for b in bad]
    assert retries(model) == max_attempts - 1
    assert sum(failures(b) for b in bad) == max_attempts
    assert_released(service)


async def test_a_good_backend_past_max_attempts_is_not_reached(tmp_path):
    model = _n("m")
    bad = [FakeBackend(_n("bad"), fail="before") for _ in range(3)]
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [*((b, [model]) for b in bad), (good, [model])], max_attempts=3)
    with pytest.raises(BackendFailed):
        await service.generate(_req(model), "http://h")
    assert [b.started for b in bad] == [1, 1, 1]
    assert good.started == 0


async def test_random_routing_never_repeats_a_backend_within_a_request(tmp_path):
    model = _n("m")
    bad = [FakeBackend(_n("bad"), fail="before") for _ in range(3)]
    service = _service(
        tmp_path,
        [_model(model)],
        [(b, [model]) for b in bad],
        policy=PowerOfTwoLeastWork(rng=random.Random(42)),
        max_attempts=3,
    )
    for request in range(1, 11):
        with pytest.raises(BackendFailed):
            await service.generate(_req(model), "http://h")
        assert [b.started for b in bad] == [request] * 3  # each backend exactly once per request
    assert_released(service)


async def test_the_circuit_breaker_takes_a_failing_backend_out(tmp_path):
    model = _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(bad, [model]), (good, [model])], cooldown_failures=2)
    bad_member = service.pool.members[0]
    await service.generate(_req(model), "http://h")
    assert bad_member.state is State.READY
    await service.generate(_req(model), "http://h")
    assert bad_member.state is State.COOLING_DOWN
    await service.generate(_req(model), "http://h")
    assert (bad.started, good.started) == (2, 3)  # out of the pool: the third request went straight to good
    assert retries(model) == 2
    assert sample("imagegate_backend_cooldowns_total", backend=bad.name) == 1


# -- what is retried and what is not ----------------------------------------------------------------------------


async def test_a_stream_that_broke_after_its_first_partial_is_not_retried(tmp_path):
    model = _n("m")
    broken, good = FakeBackend(_n("broken"), fail="after_partial"), FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(broken, [model]), (good, [model])])
    stream = await service.stream(_req(model, stream=True, partial_images=2))
    seen: list = []
    with pytest.raises(BackendFailed, match="closed the stream"):
        await _drain(stream, seen)
    assert len(seen) == 1 and isinstance(seen[0], ImageGenPartialImageEvent)
    assert good.started == 0, "a stream the client already saw a partial of was restarted on another backend"
    assert retries(model) == 0
    assert failures(broken) == 1
    assert_released(service)


async def test_a_stream_that_broke_before_its_first_partial_is_retried(tmp_path):
    model = _n("m")
    broken = Scripted(
        _n("broken"), [Started(queue_seconds=0.0), Progress(step=1, total=4), BackendFailed("connection reset")]
    )
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(broken, [model]), (good, [model])])
    seen = await _drain(await service.stream(_req(model, stream=True, partial_images=2)))
    assert [type(e) for e in seen] == [ImageGenPartialImageEvent] * 2 + [ImageGenCompletedEvent]
    assert (broken.started, good.started, good.completed) == (1, 1, 1)
    assert retries(model) == 1
    assert failures(broken) == 1
    assert_released(service)


async def test_a_non_streamed_job_that_broke_after_a_partial_is_retried(tmp_path):
    model = _n("m")
    broken, good = FakeBackend(_n("broken"), fail="after_partial"), FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(broken, [model]), (good, [model])])
    # previews asked of the backend, but the answer is sent at once: nothing reached the client when it broke
    job = service.prepare(_req(model, n=2, stream=True, partial_images=2))
    assert job.params.partial_images == 2
    response = await service.respond(job, "http://h")
    assert len(response.data) == 2
    assert (broken.started, good.started, good.completed) == (1, 1, 1)
    assert retries(model) == 1
    assert failures(broken) == 1
    assert_released(service)


async def test_a_backend_that_ends_without_a_result_is_retried(tmp_path):
    model = _n("m")
    cut = Scripted(_n("cut"), [Started(queue_seconds=0.0)])
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(cut, [model]), (good, [model])])
    await service.generate(_req(model), "http://h")
    assert (cut.started, good.completed) == (1, 1)
    assert failures(cut) == 1


async def test_an_invalid_request_is_not_retried(tmp_path):
    model = _n("m")
    invalid, good = FakeBackend(_n("invalid"), fail="invalid"), FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(invalid, [model]), (good, [model])])
    with pytest.raises(InvalidRequest) as info:
        await service.generate(_req(model), "http://h")
    assert info.value.param == "prompt"
    assert (invalid.started, good.started) == (1, 0)
    assert retries(model) == 0
    assert failures(invalid) == 0, "a bad request was counted against the backend"
    assert_released(service)


async def test_out_of_memory_is_not_retried(tmp_path):
    model = _n("m")
    oom = Scripted(_n("oom"), [Started(queue_seconds=0.0), Failed(message="CUDA out of memory", kind="out_of_memory")])
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(oom, [model]), (good, [model])])
    with pytest.raises(OutOfMemory) as info:
        await service.generate(_req(model), "http://h")
    assert info.value.status == 503
    assert (oom.started, good.started) == (1, 0)
    assert retries(model) == 0
    assert failures(oom) == 0
    assert_released(service)


async def test_an_error_inside_the_pipeline_is_not_retried(tmp_path):
    model = _n("m")
    broken = Scripted(_n("internal"), [Started(queue_seconds=0.0), Failed(message="NaN in latents")])
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(broken, [model]), (good, [model])])
    with pytest.raises(BackendFailed, match="NaN in latents"):
        await service.generate(_req(model), "http://h")
    assert good.started == 0
    assert retries(model) == 0
    assert_released(service)


# -- fallback models --------------------------------------------------------------------------------------------


async def test_fallback_model_serves_when_the_primary_has_no_ready_backend(tmp_path):
    primary, fallback = _n("m"), _n("m")
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(primary), _model(fallback)], [(good, [fallback])])
    before = sample("imagegate_images_total", model=fallback, outcome="success")

    response = await service.generate(_req(primary, n=2, fallbacks=[fallback]), "http://h")

    assert len(response.data) == 2
    assert good.last_params.model == fallback
    assert (good.last_params.width, good.last_params.height, good.last_params.n) == (64, 64, 2)
    assert fallbacks(primary, fallback) == 1
    assert sample("imagegate_images_total", model=fallback, outcome="success") == before + 2
    assert_released(service)


async def test_fallback_model_serves_when_the_primarys_queue_is_full(tmp_path):
    primary, fallback = _n("m"), _n("m")
    busy, good = FakeBackend(_n("busy")), FakeBackend(_n("good"))
    service = _service(
        tmp_path, [_model(primary, max_queue=0), _model(fallback)], [(busy, [primary]), (good, [fallback])]
    )
    held = service.pool.acquire(primary, 1.0)  # the primary's only place is taken
    await service.generate(_req(primary, fallbacks=[fallback]), "http://h")
    assert (busy.started, good.completed) == (0, 1)
    assert fallbacks(primary, fallback) == 1
    held.release(succeeded=False)
    assert_released(service)


async def test_without_fallbacks_the_primary_error_stands(tmp_path):
    primary, other = _n("m"), _n("m")
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(primary), _model(other)], [(good, [other])])
    with pytest.raises(Unavailable):
        await service.generate(_req(primary), "http://h")
    assert good.started == 0


async def test_fallback_model_serves_when_the_primary_fails_on_every_backend(tmp_path):
    primary, fallback = _n("m"), _n("m")
    bad = [FakeBackend(_n("bad"), fail="before") for _ in range(2)]
    good = FakeBackend(_n("good"))
    service = _service(
        tmp_path,
        [_model(primary), _model(fallback)],
        [(bad[0], [primary]), (bad[1], [primary]), (good, [fallback])],
        max_attempts=3,
    )
    response = await service.generate(_req(primary, fallbacks=[fallback]), "http://h")
    assert len(response.data) == 1
    assert [b.started for b in bad] == [1, 1]
    assert good.last_params.model == fallback
    assert retries(primary) == 1
    assert fallbacks(primary, fallback) == 1
    assert sample("imagegate_images_total", model=fallback, outcome="success") == 1
    assert_released(service)


async def test_fallback_follows_max_attempts_even_with_primary_backends_left(tmp_path):
    primary, fallback = _n("m"), _n("m")
    bad = [FakeBackend(_n("bad"), fail="before") for _ in range(3)]
    good = FakeBackend(_n("good"))
    service = _service(
        tmp_path,
        [_model(primary), _model(fallback)],
        [*((b, [primary]) for b in bad), (good, [fallback])],
        max_attempts=2,
    )
    await service.generate(_req(primary, fallbacks=[fallback]), "http://h")
    assert [b.started for b in bad] == [1, 1, 0]
    assert good.completed == 1


async def test_a_streamed_request_falls_back_too(tmp_path):
    primary, fallback = _n("m"), _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(primary), _model(fallback)], [(bad, [primary]), (good, [fallback])])
    seen = await _drain(await service.stream(_req(primary, stream=True, partial_images=1, fallbacks=[fallback])))
    assert [type(e) for e in seen] == [ImageGenPartialImageEvent, ImageGenCompletedEvent]
    assert good.last_params.model == fallback
    assert fallbacks(primary, fallback) == 1
    assert_released(service)


@pytest.mark.parametrize(
    "form",
    ["plain", "provider/model", "object", "object without provider"],
)
async def test_fallback_forms_resolve(tmp_path, form):
    primary, fallback = _n("m"), _n("m")
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(primary), _model(fallback)], [(good, [fallback])])
    item: str | Fallback = {
        "plain": fallback,
        "provider/model": f"openai/{fallback}",
        "object": Fallback(provider="openai", model=fallback),
        "object without provider": Fallback(model=fallback),
    }[form]
    await service.generate(_req(primary, fallbacks=[item]), "http://h")
    assert good.last_params.model == fallback


async def test_fallback_to_a_model_whose_name_has_a_slash(tmp_path):
    primary, fallback = _n("m"), f"acme/{_n('m')}"
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(primary), _model(fallback)], [(good, [fallback])])
    assert service._fallback_name(fallback) == fallback
    owner, _, name = fallback.partition("/")
    assert service._fallback_name(Fallback(provider=owner, model=name)) == fallback
    await service.generate(_req(primary, fallbacks=[fallback]), "http://h")
    assert good.last_params.model == fallback


@pytest.mark.parametrize("item", ["no-such-model", "openai/no-such-model", Fallback(provider="x", model="nope")])
async def test_unknown_fallback_is_an_invalid_request(tmp_path, item):
    primary = _n("m")
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(primary)], [(good, [primary])])
    with pytest.raises(InvalidRequest) as info:
        await service.generate(_req(primary, fallbacks=[item]), "http://h")
    assert info.value.status == 400
    assert info.value.param == "fallbacks"
    assert info.value.code == "model_not_found"
    assert good.started == 0  # refused before admission, even though the primary was ready
    assert_released(service)


async def test_a_fallback_whose_limits_cannot_take_the_request_is_skipped(tmp_path):
    primary, small, big = _n("m"), _n("m"), _n("m")
    small_backend, big_backend = FakeBackend(_n("small")), FakeBackend(_n("big"))
    service = _service(
        tmp_path,
        [_model(primary), _model(small, max_side=128), _model(big)],
        [(small_backend, [small]), (big_backend, [big])],
    )
    await service.generate(_req(primary, size="256x256", fallbacks=[small, big]), "http://h")
    assert small_backend.started == 0
    assert big_backend.last_params.model == big
    assert (big_backend.last_params.width, big_backend.last_params.height) == (256, 256)
    assert fallbacks(primary, small) == 0
    assert fallbacks(primary, big) == 1

    with pytest.raises(Unavailable):  # no fallback can take it: the primary's own error
        await service.generate(_req(primary, size="256x256", fallbacks=[small]), "http://h")
    few_steps = _n("m")
    service = _service(tmp_path, [_model(primary), _model(few_steps, max_steps=10)], [(small_backend, [few_steps])])
    with pytest.raises(Unavailable):
        await service.generate(_req(primary, num_inference_steps=20, fallbacks=[few_steps]), "http://h")
    assert small_backend.started == 0


async def test_configured_fallbacks_come_after_the_requests(tmp_path):
    primary, asked, configured = _n("m"), _n("m"), _n("m")
    asked_backend, configured_backend = FakeBackend(_n("asked")), FakeBackend(_n("conf"))
    service = _service(
        tmp_path,
        [_model(primary, fallbacks=[configured]), _model(asked), _model(configured)],
        [(asked_backend, [asked]), (configured_backend, [configured])],
    )
    await service.generate(_req(primary), "http://h")  # the configured fallback alone
    assert (asked_backend.started, configured_backend.started) == (0, 1)

    await service.generate(_req(primary, fallbacks=[asked]), "http://h")  # the request's first
    assert (asked_backend.started, configured_backend.started) == (1, 1)

    service.pool.set_state(service.pool.members[0], State.DOWN)  # the request's cannot: the configured one
    await service.generate(_req(primary, fallbacks=[asked]), "http://h")
    assert (asked_backend.started, configured_backend.started) == (1, 2)
    assert fallbacks(primary, configured) == 2
    assert fallbacks(primary, asked) == 1


async def test_a_fallback_the_principal_may_not_use_is_forbidden(tmp_path):
    primary, other = _n("m"), _n("m")
    good, other_backend = FakeBackend(_n("good")), FakeBackend(_n("other"))
    service = _service(tmp_path, [_model(primary), _model(other)], [(good, [primary]), (other_backend, [other])])
    principal = Principal(id=_n("p"), alias="p", kind="virtual_key", models=(primary,))
    with pytest.raises(PermissionDenied) as info:
        await service.generate(_req(primary, fallbacks=[other]), "http://h", principal)
    assert info.value.status == 403
    assert info.value.param == "fallbacks"
    assert info.value.code == "model_not_allowed"
    assert (good.started, other_backend.started) == (0, 0)
    assert_released(service)


async def test_a_configured_fallback_the_principal_may_not_use_is_skipped(tmp_path):
    primary, other = _n("m"), _n("m")
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(primary, fallbacks=[other]), _model(other)], [(good, [other])])
    principal = Principal(id=_n("p"), alias="p", kind="virtual_key", models=(primary,))
    with pytest.raises(Unavailable):
        await service.generate(_req(primary), "http://h", principal)
    assert good.started == 0
    allowed = Principal(id=_n("p"), alias="p", kind="virtual_key", models=(primary, other))
    await service.generate(_req(primary), "http://h", allowed)
    assert good.completed == 1


# -- deadline ---------------------------------------------------------------------------------------------------


async def test_a_hung_backend_hits_the_deadline_and_is_counted(tmp_path):
    model = _n("m")
    hung, good = FakeBackend(_n("hung"), fail="hang"), FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(hung, [model]), (good, [model])], request_timeout=0.3)
    with pytest.raises(DeadlineExceeded) as info:
        await service.generate(_req(model), "http://h")
    assert info.value.status == 504
    assert hung.cancelled == 1  # the job was stopped
    assert good.started == 0  # the deadline covers every attempt: nothing is left to retry with
    assert failures(hung) == 1
    assert retries(model) == 0
    assert_released(service)


async def test_a_hung_backend_hits_the_deadline_in_a_stream(tmp_path):
    model = _n("m")
    hung = FakeBackend(_n("hung"), fail="hang")
    service = _service(tmp_path, [_model(model)], [(hung, [model])], request_timeout=0.3)
    stream = await service.stream(_req(model, stream=True, partial_images=1))
    with pytest.raises(DeadlineExceeded):
        await _drain(stream)
    assert hung.cancelled == 1
    assert failures(hung) == 1
    assert_released(service)


# -- usage ------------------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = SqlKeyStore(tmp_path / "imagegate.db")
    yield s
    s.close()


def _principal() -> Principal:
    return Principal(id=_n("p"), alias="p", kind="virtual_key")


async def test_a_failed_request_is_not_charged(tmp_path, store):
    model = _n("m")
    guard = Guard(store, clock=lambda: NOW)
    bad = [FakeBackend(_n("bad"), fail="before") for _ in range(2)]
    service = _service(tmp_path, [_model(model)], [(b, [model]) for b in bad], guard=guard)
    p = _principal()
    with pytest.raises(BackendFailed):
        await service.generate(_req(model, n=3), "http://h", p)
    await guard.drain()
    assert await store.usage(p.id) == Usage(requests=1, images=0, pixel_steps=0)
    assert (guard._in_flight[p.id], guard._held[p.id]) == (0, 0)


async def test_a_request_that_hit_its_deadline_is_not_charged(tmp_path, store):
    model = _n("m")
    guard = Guard(store, clock=lambda: NOW)
    service = _service(
        tmp_path, [_model(model)], [(FakeBackend(_n("hung"), fail="hang"), [model])], guard=guard, request_timeout=0.3
    )
    p = _principal()
    with pytest.raises(DeadlineExceeded):
        await service.generate(_req(model, n=2), "http://h", p)
    await guard.drain()
    assert await store.usage(p.id) == Usage(requests=1, images=0, pixel_steps=0)
    assert (guard._in_flight[p.id], guard._held[p.id]) == (0, 0)


async def test_a_request_retried_after_a_partial_is_charged_once(tmp_path, store):
    model = _n("m")
    guard = Guard(store, clock=lambda: NOW)
    broken, good = FakeBackend(_n("broken"), fail="after_partial"), FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(broken, [model]), (good, [model])], guard=guard)
    p = _principal()
    job = service.prepare(_req(model, n=2, stream=True, partial_images=1))
    response = await service.respond(job, "http://h", p)
    assert len(response.data) == 2
    await guard.drain()
    assert await store.usage(p.id) == Usage(requests=1, images=2, pixel_steps=2 * 64 * 64 * 4)


async def test_a_stream_broken_after_a_partial_is_not_charged(tmp_path, store):
    model = _n("m")
    guard = Guard(store, clock=lambda: NOW)
    broken = FakeBackend(_n("broken"), fail="after_partial")
    service = _service(tmp_path, [_model(model)], [(broken, [model])], guard=guard)
    p = _principal()
    stream = await service.stream(_req(model, n=2, stream=True, partial_images=2), p)
    with pytest.raises(BackendFailed):
        await _drain(stream)
    await guard.drain()
    assert await store.usage(p.id) == Usage(requests=1, images=0, pixel_steps=0)
    assert (guard._in_flight[p.id], guard._held[p.id]) == (0, 0)


async def test_a_fallback_is_charged_for_what_it_delivered(tmp_path, store):
    primary, fallback = _n("m"), _n("m")
    guard = Guard(store, clock=lambda: NOW)
    service = _service(
        tmp_path,
        [_model(primary), _model(fallback)],
        [(FakeBackend(_n("bad"), fail="before"), [primary]), (FakeBackend(_n("good")), [fallback])],
        guard=guard,
    )
    p = _principal()
    await service.generate(_req(primary, n=2, fallbacks=[fallback]), "http://h", p)
    await guard.drain()
    assert await store.usage(p.id) == Usage(requests=1, images=2, pixel_steps=2 * 64 * 64 * 4)


# -- per-attempt metrics ----------------------------------------------------------------------------------------


def _histogram(name: str, model: str) -> tuple[float, float]:
    return sample(f"{name}_count", model=model), sample(f"{name}_sum", model=model)


async def test_batch_size_step_seconds_and_queue_wait_are_observed(tmp_path):
    model = _n("m")
    backend = Scripted(
        _n("batched"),
        [
            Started(queue_seconds=0.0, batch_size=3),
            *(Progress(step=s, total=5) for s in range(1, 6)),
            *_result(),
        ],
    )
    service = _service(tmp_path, [_model(model)], [(backend, [model])])
    await service.generate(_req(model, num_inference_steps=5), "http://h")
    assert _histogram("imagegate_batch_size", model) == (1, 3)
    step_count, step_sum = _histogram("imagegate_denoising_step_seconds", model)
    assert step_count == 4  # between 5 steps
    assert step_sum >= 0
    assert _histogram("imagegate_queue_wait_seconds", model)[0] == 1
    assert _histogram("imagegate_generation_duration_seconds", model)[0] == 1


def _result() -> list[WorkerEvent]:
    return [Image(index=0, data=fake_image(64, 64, 1), seed=1), Done(seconds=0.0)]


async def test_queue_wait_is_observed_on_every_attempt(tmp_path):
    model = _n("m")
    broken = Scripted(_n("broken"), [Started(queue_seconds=0.0), BackendFailed("reset")])
    good = FakeBackend(_n("good"))
    service = _service(tmp_path, [_model(model)], [(broken, [model]), (good, [model])])
    await service.generate(_req(model), "http://h")
    assert _histogram("imagegate_queue_wait_seconds", model)[0] == 2
    assert _histogram("imagegate_batch_size", model) == (2, 2)
    assert _histogram("imagegate_generation_duration_seconds", model)[0] == 1
