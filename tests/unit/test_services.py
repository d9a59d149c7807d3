"""ImageService on a pool of one FakeBackend: validation, generation, streaming, failures and lease accounting."""

from __future__ import annotations

import asyncio
import io
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest
from PIL import Image as PILImage
from prometheus_client import REGISTRY

from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL, Settings, load_settings
from app.errors import BackendFailed, DeadlineExceeded, InvalidRequest, NotFound, Overloaded, Unavailable
from app.pool import Member, Pool, State
from app.protocol.images import ImageGenCompletedEvent, ImageGenerateRequest, ImageGenPartialImageEvent
from app.services.images import SEED_RANGE, ImageService, image_tokens
from app.store.files import ImageFiles
from app.worker.protocol import DIFFUSION_SCHEDULERS, ModelDetails

NOW = 1_750_000_000.0


@dataclass
class Rig:
    service: ImageService
    member: Member
    backend: FakeBackend
    files: ImageFiles
    settings: Settings

    def assert_released(self) -> None:
        assert self.member.outstanding == 0
        assert self.member.outstanding_work == 0.0
        assert self.service.pool._queued[self.member_model] == 0
        assert self.service.pool._outstanding[self.member_model] == 0

    @property
    def member_model(self) -> str:
        (model,) = self.member.models
        return model


def _rig(tmp_path: Path, backend: FakeBackend | None = None, **overrides) -> Rig:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), **overrides})
    models = settings.resolved_models()
    pool = Pool(models)
    backend = backend or FakeBackend()
    member = pool.add(backend, [models[0].name], state=State.READY)
    files = ImageFiles(tmp_path / "images", b"s" * 32, 600, clock=lambda: NOW)
    return Rig(ImageService(settings, pool, files, clock=lambda: NOW), member, backend, files, settings)


@pytest.fixture
def rig(tmp_path) -> Rig:
    return _rig(tmp_path)


def _req(**fields) -> ImageGenerateRequest:
    return ImageGenerateRequest(**{"prompt": "a red fox", **fields})


def _png(data: bytes) -> PILImage.Image:
    """An image of a response or event: raw bytes in the struct, base64 once encoded to JSON."""
    image = PILImage.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def _images_total(outcome: str, model: str = DEMO_MODEL) -> float:
    return REGISTRY.get_sample_value("imagegate_images_total", {"model": model, "outcome": outcome}) or 0.0


# -- prepare: validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [None, "auto"])
def test_size_auto_or_absent_is_the_models_default(rig, size):
    job = rig.service.prepare(_req(size=size))
    assert (job.params.width, job.params.height) == (256, 256)
    assert job.size == "256x256"


def test_explicit_size(rig):
    job = rig.service.prepare(_req(size="512x768"))
    assert (job.params.width, job.params.height) == (512, 768)
    assert job.size == "512x768"


@pytest.mark.parametrize("size", ["huge", "512", "512x512x2", "2048x2048", "32x64", "64x1040", "500x500", "0x64"])
def test_bad_size(rig, size):
    with pytest.raises(InvalidRequest) as info:
        rig.service.prepare(_req(size=size))
    assert info.value.param == "size"
    assert info.value.status == 400


def test_n_above_the_models_max(tmp_path):
    rig = _rig(tmp_path, models=[{"name": "small", "path": "/m/small", "max_n": 2}])
    assert rig.service.prepare(_req(n=2)).params.n == 2
    with pytest.raises(InvalidRequest) as info:
        rig.service.prepare(_req(n=3))
    assert info.value.param == "n"


def test_steps_above_max(rig):
    assert rig.service.prepare(_req(num_inference_steps=100)).params.steps == 100
    with pytest.raises(InvalidRequest) as info:
        rig.service.prepare(_req(num_inference_steps=101))
    assert info.value.param == "num_inference_steps"


@pytest.mark.parametrize(
    ("quality", "label", "steps"),
    [
        ("low", "low", 10),  # half of the demo model's 20 default steps
        ("medium", "medium", 15),
        ("high", "high", 20),
        ("hd", "high", 20),
        ("standard", "high", 20),
        ("auto", "high", 20),
        (None, "high", 20),
    ],
)
def test_quality_scales_default_steps(rig, quality, label, steps):
    job = rig.service.prepare(_req(quality=quality))
    assert job.quality == label
    assert job.params.steps == steps


def test_explicit_steps_beat_quality(rig):
    job = rig.service.prepare(_req(quality="low", num_inference_steps=33))
    assert job.params.steps == 33
    assert job.quality == "low"


def test_guidance_default_and_max(rig):
    assert rig.service.prepare(_req()).params.guidance == 7.5
    assert rig.service.prepare(_req(guidance_scale=0.0)).params.guidance == 0.0
    with pytest.raises(InvalidRequest) as info:
        rig.service.prepare(_req(guidance_scale=30.5))
    assert info.value.param == "guidance_scale"


def test_scheduler_default_and_choice(rig):
    assert rig.service.prepare(_req()).params.scheduler == "ddim"  # the demo model's default_scheduler
    assert rig.service.prepare(_req(scheduler="euler")).params.scheduler == "euler"


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [("EulerAncestralDiscreteScheduler", "euler_a"), ("ddimscheduler", "ddim"), (" EULER ", "euler")],
)
def test_scheduler_class_names_are_accepted(rig, alias, canonical):
    assert rig.service.prepare(_req(scheduler=alias)).params.scheduler == canonical


# lcm is a known scheduler but not one the demo model's workers offer; flow_euler is for flow-matching models
@pytest.mark.parametrize("scheduler", ["warp_drive", "UniPCScheduler", "lcm", "flow_euler"])
def test_unknown_or_inapplicable_scheduler(rig, scheduler):
    rig.member.details = {rig.member_model: ModelDetails(family="sd", schedulers=list(DIFFUSION_SCHEDULERS))}
    with pytest.raises(InvalidRequest) as info:
        rig.service.prepare(_req(scheduler=scheduler))
    assert info.value.param == "scheduler"
    assert ", ".join(DIFFUSION_SCHEDULERS) in info.value.message  # lists what is available


def test_schedulers_and_defaults_come_from_the_config_else_from_what_the_workers_report(tmp_path):
    rig = _rig(tmp_path, models=[{"name": "m", "path": "/m"}])
    assert rig.service.prepare(_req(scheduler="lcm")).params.scheduler == "lcm"  # no worker has said: the worker checks
    assert (rig.service.prepare(_req()).params.steps, rig.service.prepare(_req()).params.guidance) == (30, 7.5)
    details = ModelDetails(family="flux", schedulers=["flow_euler"], default_steps=28, default_guidance=3.5)
    rig.member.details = {"m": details}
    assert rig.service.prepare(_req(scheduler="flow_euler")).params.scheduler == "flow_euler"
    with pytest.raises(InvalidRequest, match="Available: flow_euler"):
        rig.service.prepare(_req(scheduler="euler"))
    assert (rig.service.prepare(_req()).params.steps, rig.service.prepare(_req()).params.guidance) == (28, 3.5)
    configured = {"name": "m", "path": "/m", "schedulers": ["flow_unipc"], "default_steps": 9, "default_guidance": 2.0}
    rig = _rig(tmp_path / "c", models=[configured])
    rig.member.details = {"m": details}
    with pytest.raises(InvalidRequest, match="Available: flow_unipc"):
        rig.service.prepare(_req(scheduler="flow_euler"))
    assert (rig.service.prepare(_req()).params.steps, rig.service.prepare(_req()).params.guidance) == (9, 2.0)


def test_transparent_background_is_rejected(rig):
    with pytest.raises(InvalidRequest) as info:
        rig.service.prepare(_req(background="transparent"))
    assert info.value.param == "background"
    assert info.value.status == 400
    rig.service.prepare(_req(background="opaque"))
    rig.service.prepare(_req(background="auto"))


def test_unknown_model(rig):
    with pytest.raises(NotFound) as info:
        rig.service.prepare(_req(model="dall-e-9"))
    assert info.value.status == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert DEMO_MODEL in info.value.message


def test_model_may_be_omitted_when_one_is_served(rig):
    assert rig.service.prepare(_req()).params.model == DEMO_MODEL
    assert rig.service.prepare(_req(model=DEMO_MODEL)).params.model == DEMO_MODEL


def test_model_is_required_when_several_are_served(tmp_path):
    rig = _rig(tmp_path, models=[{"name": "a", "path": "/m/a"}, {"name": "b", "path": "/m/b"}])
    with pytest.raises(InvalidRequest) as info:
        rig.service.prepare(_req())
    assert info.value.param == "model"
    assert rig.service.prepare(_req(model="b")).params.model == "b"


def test_partial_images_only_when_streaming(rig):
    assert rig.service.prepare(_req(partial_images=2)).params.partial_images == 0
    assert rig.service.prepare(_req(partial_images=2, stream=False)).params.partial_images == 0
    assert rig.service.prepare(_req(partial_images=2, stream=True)).params.partial_images == 2
    assert rig.service.prepare(_req(stream=True)).params.partial_images == 0


def test_seed_fixed_when_given_random_otherwise(rig):
    assert rig.service.prepare(_req(seed=1234)).params.seed == 1234
    seeds = {rig.service.prepare(_req()).params.seed for _ in range(5)}
    assert len(seeds) > 1
    assert all(0 <= s < SEED_RANGE for s in seeds)


def test_other_params_are_carried(rig):
    job = rig.service.prepare(
        _req(negative_prompt="blurry", output_format="webp", output_compression=70, response_format="url")
    )
    p = job.params
    assert (p.prompt, p.negative_prompt, p.output_format, p.output_compression) == ("a red fox", "blurry", "webp", 70)
    assert job.response_format == "url"
    assert p.request_id.startswith("img_")
    defaults = rig.service.prepare(_req(negative_prompt="")).params
    assert defaults.negative_prompt is None
    assert defaults.output_format == "png"
    assert rig.service.prepare(_req()).response_format == "b64_json"


def test_image_tokens_round_up_to_16px_patches():
    assert image_tokens(16, 16) == 1
    assert image_tokens(17, 16) == 2
    assert image_tokens(1024, 1024) == 4096
    assert image_tokens(72, 40) == 5 * 3


# -- generate ---------------------------------------------------------------------------------------------------


async def test_generate_b64(rig):
    response = await rig.service.generate(_req(n=2, size="64x96", num_inference_steps=3, seed=5), "http://h")
    assert len(response.data) == 2
    for item in response.data:
        assert _png(item.b64_json).size == (64, 96)
        assert item.url is msgspec.UNSET
    assert _png(response.data[0].b64_json).getpixel((0, 0)) != _png(response.data[1].b64_json).getpixel((0, 0))
    assert response.created == int(NOW)
    assert (response.size, response.quality, response.output_format, response.background) == (
        "64x96",
        "high",
        "png",
        "opaque",
    )
    per_image = math.ceil(64 / 16) * math.ceil(96 / 16)
    prompt_tokens = 3 + 2  # FakeBackend reports words of the prompt + 2
    assert response.usage.output_tokens == 2 * per_image
    assert response.usage.input_tokens == prompt_tokens
    assert response.usage.input_tokens_details.text_tokens == prompt_tokens
    assert response.usage.total_tokens == prompt_tokens + 2 * per_image
    assert rig.backend.last_params.seed == 5
    assert rig.backend.completed == 1
    rig.assert_released()


async def test_generate_usage_rounds_partial_patches(tmp_path):
    rig = _rig(tmp_path, models=[{"name": "odd", "path": "/m/odd", "default_size": "72x88"}])
    response = await rig.service.generate(_req(num_inference_steps=1), "http://h")
    assert response.size == "72x88"
    assert response.usage.output_tokens == 5 * 6


async def test_generate_url(rig):
    response = await rig.service.generate(
        _req(n=2, size="64x64", num_inference_steps=2, response_format="url"), "http://gateway.local:8000/"
    )
    assert len(response.data) == 2
    for item in response.data:
        assert item.b64_json is msgspec.UNSET
        parts = urlsplit(item.url)
        assert parts.netloc == "gateway.local:8000"
        query = parse_qs(parts.query)
        name = parts.path.rsplit("/", 1)[1]
        path = rig.files.resolve(name, query["expires"][0], query["signature"][0])
        assert path is not None
        assert PILImage.open(path).size == (64, 64)
    rig.assert_released()


async def test_generate_url_prefers_public_url(tmp_path):
    rig = _rig(tmp_path, public_url="https://images.example.com", default_response_format="url")
    response = await rig.service.generate(_req(size="64x64", num_inference_steps=1), "http://internal:8000")
    assert response.data[0].url.startswith("https://images.example.com/files/images/img_")


async def test_generate_backend_invalid_request(tmp_path):
    rig = _rig(tmp_path, FakeBackend(fail="invalid"))
    with pytest.raises(InvalidRequest) as info:
        await rig.service.generate(_req(num_inference_steps=1), "http://h")
    assert info.value.param == "prompt"
    assert info.value.message == "the fake says no"
    rig.assert_released()


async def test_generate_backend_unreachable(tmp_path):
    rig = _rig(tmp_path, FakeBackend(fail="before"))
    with pytest.raises(BackendFailed):
        await rig.service.generate(_req(num_inference_steps=1), "http://h")
    rig.assert_released()


async def test_generate_deadline(tmp_path):
    rig = _rig(tmp_path, FakeBackend(step_delay=0.05), request_timeout=0.1)
    with pytest.raises(DeadlineExceeded) as info:
        await rig.service.generate(_req(size="64x64", num_inference_steps=50), "http://h")
    assert info.value.status == 504
    assert rig.backend.cancelled == 1  # the job was stopped, not left running
    assert rig.backend.completed == 0
    rig.assert_released()


async def test_generate_without_ready_backend_is_unavailable(rig):
    before = _images_total("rejected")
    rig.service.pool.set_state(rig.member, State.DOWN)
    with pytest.raises(Unavailable):
        await rig.service.generate(_req(n=3), "http://h")
    assert rig.backend.started == 0
    assert _images_total("rejected") == before + 3


async def test_generate_when_queue_is_full_is_overloaded(tmp_path):
    rig = _rig(tmp_path, models=[{"name": "tiny", "path": "/m/tiny", "max_queue": 0}])
    held = rig.service.pool.acquire("tiny", 1.0)
    with pytest.raises(Overloaded):
        await rig.service.generate(_req(num_inference_steps=1), "http://h")
    held.release(succeeded=False)
    await rig.service.generate(_req(num_inference_steps=1, size="64x64"), "http://h")
    rig.assert_released()


# -- stream -----------------------------------------------------------------------------------------------------


async def test_stream_events(rig):
    stream = await rig.service.stream(_req(n=2, size="64x64", num_inference_steps=4, partial_images=2, stream=True))
    assert rig.member.outstanding == 1  # admitted before the first event is asked for
    events = [event async for event in stream]
    await stream.aclose()

    partials = [e for e in events if isinstance(e, ImageGenPartialImageEvent)]
    completed = [e for e in events if isinstance(e, ImageGenCompletedEvent)]
    assert len(events) == len(partials) + len(completed)
    assert len(partials) == 2 * 2
    assert len(completed) == 2
    assert events[-2:] == completed  # every partial comes before the completed images
    for image in (0, 1):
        assert [e.partial_image_index for e in partials if e.image_index == image] == [0, 1]
    assert sorted(e.image_index for e in completed) == [0, 1]

    for e in partials:
        assert e.type == "image_generation.partial_image"
        assert _png(e.b64_json).size == (64, 64)
    per_image = image_tokens(64, 64)
    for e in completed:
        assert e.type == "image_generation.completed"
        assert (e.size, e.quality, e.background, e.output_format, e.created_at) == (
            "64x64",
            "high",
            "opaque",
            "png",
            int(NOW),
        )
        assert _png(e.b64_json).size == (64, 64)
        assert e.usage.output_tokens == per_image  # usage per image, not per request
        assert e.usage.total_tokens == e.usage.input_tokens + per_image
    rig.assert_released()


@pytest.mark.parametrize("partial_images", [0, 1, 3])
async def test_stream_partial_count(rig, partial_images):
    stream = await rig.service.stream(
        _req(size="64x64", num_inference_steps=2, partial_images=partial_images, stream=True)
    )
    events = [event async for event in stream]
    await stream.aclose()
    assert [type(e).__name__ for e in events] == ["ImageGenPartialImageEvent"] * partial_images + [
        "ImageGenCompletedEvent"
    ]
    assert [e.partial_image_index for e in events[:-1]] == list(range(partial_images))
    rig.assert_released()


async def test_stream_breaks_off_after_a_partial(tmp_path):
    rig = _rig(tmp_path, FakeBackend(fail="after_partial"))
    stream = await rig.service.stream(_req(size="64x64", num_inference_steps=4, partial_images=2, stream=True))
    seen = []
    with pytest.raises(BackendFailed):
        async for event in stream:
            seen.append(event)
    await stream.aclose()
    assert len(seen) == 1
    assert isinstance(seen[0], ImageGenPartialImageEvent)
    rig.assert_released()


async def test_stream_backend_invalid_request(tmp_path):
    rig = _rig(tmp_path, FakeBackend(fail="invalid"))
    stream = await rig.service.stream(_req(num_inference_steps=1, stream=True))
    with pytest.raises(InvalidRequest) as info:
        async for _ in stream:
            pass
    await stream.aclose()
    assert info.value.param == "prompt"
    rig.assert_released()


async def test_stream_validation_errors_raise_before_admission(rig):
    with pytest.raises(InvalidRequest):
        await rig.service.stream(_req(size="1x1", stream=True))
    assert rig.member.outstanding == 0


async def test_stream_closed_before_iteration_releases_the_lease(rig):
    before = _images_total("cancelled")
    stream = await rig.service.stream(_req(n=2, num_inference_steps=2, stream=True))
    assert rig.member.outstanding == 1
    await stream.aclose()
    rig.assert_released()
    assert rig.backend.started == 0
    assert _images_total("cancelled") == before + 2
    await stream.aclose()  # closing twice is harmless
    rig.assert_released()


async def test_stream_closed_mid_way_releases_the_lease(rig):
    stream = await rig.service.stream(_req(size="64x64", num_inference_steps=4, partial_images=2, stream=True))
    iterator = aiter(stream)
    first = await anext(iterator)
    assert isinstance(first, ImageGenPartialImageEvent)
    assert rig.member.outstanding == 1
    await stream.aclose()
    rig.assert_released()


async def test_stream_closed_mid_way_stops_the_backend_job_at_once(rig):
    stream = await rig.service.stream(_req(size="64x64", num_inference_steps=4, partial_images=2, stream=True))
    await anext(aiter(stream))
    await stream.aclose()
    assert rig.backend.cancelled == 1


async def test_stream_closed_mid_way_counts_cancelled_once(rig):
    before = _images_total("cancelled")
    stream = await rig.service.stream(_req(size="64x64", num_inference_steps=4, partial_images=2, stream=True))
    await anext(aiter(stream))
    await stream.aclose()
    for _ in range(5):  # let any finaliser of an orphaned generator run
        await asyncio.sleep(0.01)
    assert _images_total("cancelled") == before + 1


async def test_stream_deadline(tmp_path):
    rig = _rig(tmp_path, FakeBackend(step_delay=0.05), request_timeout=0.1)
    stream = await rig.service.stream(_req(size="64x64", num_inference_steps=50, partial_images=1, stream=True))
    with pytest.raises(DeadlineExceeded):
        async for _ in stream:
            pass
    await stream.aclose()
    assert rig.backend.cancelled == 1
    rig.assert_released()
