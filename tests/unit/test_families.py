"""The worker's engine on tiny pipelines of the families people serve (tests/families.py), each as it ships.

Every model is configured with only a name and a path. Each family is built and saved once per session.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage

from app.config import ModelConfig
from app.worker.engine import Engine
from app.worker.pipelines import ModelLoadError, load_model, quiet_libraries
from app.worker.previews import X0Tracker
from app.worker.protocol import (
    DIFFUSION_SCHEDULERS,
    FLOW_SCHEDULERS,
    Done,
    Failed,
    GenerationParams,
    Image,
    LoraRef,
    Partial,
    Progress,
    WorkerEvent,
)

from ..families import FAMILIES, save_family
from ..lora import random_lora

SIDE = 64
# Family name -> (its family in the worker, its edit tasks, whether its partial images decode).
EXPECTED = {
    "sdxl": ("sdxl", {"img2img", "inpaint", "outpaint"}, True),
    "sd3": ("sd3", {"img2img", "inpaint", "outpaint"}, True),
    "flux": ("flux", {"img2img", "inpaint", "outpaint"}, True),
    "qwen_image": ("qwen_image", {"img2img", "inpaint", "outpaint"}, True),
    "sana": ("sana", set(), True),
    "pixart_sigma": ("pixart", set(), True),
    "hunyuandit": ("hunyuandit", set(), True),
    "lumina2": ("lumina2", set(), True),
    "chroma": ("chroma", set(), True),
    "z_image": ("z_image", {"img2img", "inpaint", "outpaint"}, True),
    "flux2_klein": ("flux2", set(), False),  # reference images, not image-to-image; patchified BN-normalised latents
}
assert set(EXPECTED) == set(FAMILIES)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory) -> Iterator[Path]:
    quiet_libraries()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path_factory.mktemp("families")
    torch.set_num_threads(threads)


def saved(family_dir: Path, family: str) -> Path:
    path = family_dir / family
    if not path.exists():
        save_family(family, path)
    return path


@pytest.fixture(params=list(EXPECTED))
async def engine(request, family_dir) -> Iterator[Engine]:
    family = request.param
    engine = Engine("cpu", [ModelConfig(name=family, path=str(saved(family_dir, family)))])
    await engine.start()
    yield engine
    await engine.stop()


async def run(
    engine: Engine, p: GenerationParams, image: bytes | None = None, mask: bytes | None = None
) -> list[WorkerEvent]:
    job = engine.submit(p, image, mask)
    events: list[WorkerEvent] = []
    while not events or not isinstance(events[-1], Done | Failed):
        events.append(await asyncio.wait_for(job.events.get(), 120))
    return events


def images(events: list[WorkerEvent]) -> list[bytes]:
    assert isinstance(events[-1], Done), events[-1]
    return [e.data for e in events if isinstance(e, Image)]


def size(data: bytes) -> tuple[int, int]:
    return PILImage.open(io.BytesIO(data)).size


def params(engine: Engine, **kw) -> GenerationParams:
    (model,) = engine.models
    base = {"model": model, "prompt": "a red fox", "width": SIDE, "height": SIDE, "steps": 2, "guidance": 4.0}
    return GenerationParams(**{**base, "seed": 1, **kw})


def png() -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (SIDE, SIDE), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


async def test_a_name_and_a_path_are_enough_to_serve_it(engine):
    (name,) = engine.models
    loaded = engine.models[name]
    family, edits, previews = EXPECTED[name]
    details = engine.health().details[name]
    assert details.family == loaded.family.name == family
    assert set(engine.health().tasks[name]) == {"text2img", *edits}
    offered = FLOW_SCHEDULERS if loaded.family.flow else DIFFUSION_SCHEDULERS
    assert details.schedulers and set(details.schedulers) <= set(offered)
    assert "flow_euler" in details.schedulers or not loaded.family.flow
    assert loaded.previews_failed is not previews


async def test_every_offered_scheduler_fixes_the_image_by_its_seed(engine):
    (name,) = engine.models
    for scheduler in [None, *engine.models[name].schedulers]:
        first = images(await run(engine, params(engine, scheduler=scheduler)))
        assert [size(d) for d in first] == [(SIDE, SIDE)], scheduler
        assert images(await run(engine, params(engine, scheduler=scheduler))) == first, scheduler  # euler_a, ddpm too
        other = images(await run(engine, params(engine, scheduler=scheduler, seed=2)))
        assert other != first, scheduler


async def test_every_task_returns_the_size_asked_for_and_streams_never_fail(engine):
    (name,) = engine.models
    _, edits, previews = EXPECTED[name]
    events = await run(engine, params(engine, width=2 * SIDE, partial_images=2, steps=4))
    assert [size(d) for d in images(events)] == [(2 * SIDE, SIDE)]  # HunyuanDiT once drew 1024x1024 here
    partials = [e for e in events if isinstance(e, Partial)]
    assert len(partials) == (2 if previews else 0)  # Qwen-Image and FLUX.2 once failed every stream here
    assert all(size(e.data) == (2 * SIDE, SIDE) for e in partials)
    for task in sorted(edits & {"img2img", "inpaint"}):  # SD3, Flux and Qwen-Image once drew 1024x1024 here
        mask = png() if task == "inpaint" else None
        p = params(engine, task=task, strength=0.75, image_bytes=len(png()), mask_bytes=len(mask or b""))
        assert [size(d) for d in images(await run(engine, p, png(), mask))] == [(SIDE, SIDE)], task


async def test_a_scheduler_of_another_kind_is_refused_with_the_valid_names(engine):
    (name,) = engine.models
    loaded = engine.models[name]
    misfit = "euler" if loaded.family.flow else "flow_euler"
    [failed] = await run(engine, params(engine, scheduler=misfit))
    assert failed.kind == "invalid_request" and failed.param == "scheduler"
    assert ", ".join(loaded.schedulers) in failed.message


def test_configured_schedulers_that_do_not_apply_stop_the_start_with_the_fix(family_dir):
    path = str(saved(family_dir, "flux"))
    with pytest.raises(ModelLoadError, match=r"flow-matching model: scheduler\(s\) euler do not apply.*flow_euler"):
        load_model(ModelConfig(name="flux", path=path, schedulers=["flow_euler", "euler"]), "cpu")
    with pytest.raises(ModelLoadError, match=r"do not run with FluxPipeline: flow_heun: .*leave `schedulers` out"):
        load_model(ModelConfig(name="flux", path=path, schedulers=["flow_heun"]), "cpu")
    assert list(load_model(ModelConfig(name="flux", path=path, schedulers=["flow_unipc"]), "cpu").schedulers) == [
        "flow_unipc"
    ]


async def test_pixart_legacy_callback_reports_progress_and_stops_when_cancelled(family_dir):
    engine = Engine("cpu", [ModelConfig(name="pixart", path=str(saved(family_dir, "pixart_sigma")))])
    await engine.start()
    try:
        job = engine.submit(params(engine, steps=40))
        first = await asyncio.wait_for(job.events.get(), 60)
        while not isinstance(first, Progress):
            first = await asyncio.wait_for(job.events.get(), 60)
        job.cancel()
        events = [first]
        while not isinstance(events[-1], Done | Failed):
            events.append(await asyncio.wait_for(job.events.get(), 60))
        assert events[-1] == Failed("the client went away", "cancelled")
        assert max(e.step for e in events if isinstance(e, Progress)) < 40
    finally:
        await engine.stop()


@pytest.mark.parametrize("family", ["flux", "qwen_image", "sd3"])
async def test_a_negative_prompt_changes_the_picture(family_dir, family):
    # FLUX.1-dev once ignored negative prompts (no true CFG); Qwen-Image ran no CFG without one.
    engine = Engine("cpu", [ModelConfig(name=family, path=str(saved(family_dir, family)))])
    await engine.start()
    try:
        plain = images(await run(engine, params(engine)))
        negative = images(await run(engine, params(engine, negative_prompt="blurry, dark")))
        assert plain != negative
        assert images(await run(engine, params(engine, negative_prompt="blurry, dark"))) == negative
    finally:
        await engine.stop()


# -- the GPU features, where they run on a CPU ----------------------------------------------------------------


async def started(family_dir: Path, family: str, **config) -> Engine:
    engine = Engine("cpu", [ModelConfig(name=family, path=str(saved(family_dir, family)), **config)])
    await engine.start()
    return engine


async def test_vae_tiling_slicing_and_attention_backend(family_dir):
    engine = await started(family_dir, "sdxl", vae_tiling=True, vae_slicing=True, attention_backend="native")
    try:
        vae = engine.models["sdxl"].pipe.vae
        assert vae.use_tiling and vae.use_slicing
        assert [size(d) for d in images(await run(engine, params(engine, width=2 * SIDE, n=2)))] == [(128, 64)] * 2
    finally:
        await engine.stop()


async def test_step_cache_on_a_transformer(family_dir):
    engine = await started(family_dir, "flux", step_cache="first_block:0.5")
    try:
        first = images(await run(engine, params(engine, steps=6)))
        assert [size(d) for d in first] == [(SIDE, SIDE)]
        assert images(await run(engine, params(engine, steps=6))) == first
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("family", "config", "message"),
    [
        ("sdxl", {"step_cache": "first_block:0.1"}, "UNet2DConditionModel has no step caching"),
        ("flux", {"attention_backend": "no_such_backend"}, "no_such_backend"),
        ("flux", {"quantization": "bitsandbytes:8bit"}, "quantization bitsandbytes:8bit: is its package installed"),
    ],
)
def test_a_feature_the_model_or_host_lacks_stops_the_start_with_why(family_dir, family, config, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(ModelConfig(name=family, path=str(saved(family_dir, family)), **config), "cpu")


async def test_compiled_at_start_up_so_no_request_compiles(family_dir):
    from torch._dynamo.utils import counters

    engine = await started(family_dir, "flux", compile=True, default_size=f"{SIDE}x{SIDE}")
    try:
        compiled = dict(counters["stats"])
        assert compiled.get("unique_graphs", 0) > 0  # the repeated blocks compiled while starting
        first = images(await run(engine, params(engine, steps=3)))
        assert [size(d) for d in first] == [(SIDE, SIDE)]
        assert dict(counters["stats"]) == compiled  # nothing compiled during the request
    finally:
        await engine.stop()


@pytest.mark.parametrize("family", [name for name, (_, _, previews) in EXPECTED.items() if previews])
def test_partial_images_show_the_predicted_clean_image_not_the_noise(family_dir, family):
    """Half-way, the x0 a preview decodes is nearer the finished latents than the noisy latents it came from."""
    loaded = load_model(ModelConfig(name=family, path=str(saved(family_dir, family))), "cpu")
    trackers: list[X0Tracker] = []
    after: list[torch.Tensor] = []  # the latents after each step, so the input of the next
    x0: list[torch.Tensor] = []  # the x0 each step predicted from its input

    def track(scheduler) -> None:
        trackers.append(X0Tracker(scheduler))
        trackers[0].wanted = True

    def seen(latents: torch.Tensor) -> None:
        after.append(latents.clone())
        x0.append(trackers[0].latest.clone())

    final = loaded.latents(None, SIDE, SIDE, 8, on_step=seen, on_scheduler=track)
    noisy, predicted = after[3], x0[4]  # step 5's input, and what step 5 predicted from it
    assert predicted.shape == noisy.shape == final.shape
    assert ((predicted - final) ** 2).mean() < ((noisy - final) ** 2).mean()


async def test_quantized_denoiser(family_dir):
    engine = await started(family_dir, "flux", quantization="torchao:int8wo")
    try:
        weight = engine.models["flux"].pipe.transformer.transformer_blocks[0].attn.to_q.weight
        assert type(weight).__name__ == "Int8Tensor"  # torchao's, not a float tensor
        first = images(await run(engine, params(engine)))
        assert [size(d) for d in first] == [(SIDE, SIDE)]
        assert images(await run(engine, params(engine))) == first
        p = params(engine, task="img2img", strength=0.75, image_bytes=len(png()))  # edit pipelines share the weights
        assert [size(d) for d in images(await run(engine, p, png()))] == [(SIDE, SIDE)]
    finally:
        await engine.stop()


async def test_lora_adapters_apply_where_the_family_loads_them(engine, tmp_path):
    (name,) = engine.models
    loaded = engine.models[name]
    supported = engine.health().details[name].lora
    if not supported:  # PixArt and HunyuanDiT pipelines load no LoRA: the model says so, and a job asking fails
        assert loaded.adapters is None and name in ("pixart_sigma", "hunyuandit")
        refused = await run(engine, params(engine, loras=(LoraRef("0" * 64, 1.0),)))
        assert isinstance(refused[-1], Failed) and refused[-1].kind == "invalid_request"
        return
    path = tmp_path / "lora.safetensors"
    digest = random_lora(loaded.pipe, path, seed=7)
    engine.adapter_files.put(digest, path.read_bytes())
    base = images(await run(engine, params(engine)))[0]
    styled = images(await run(engine, params(engine, loras=(LoraRef(digest, 1.0),))))[0]
    zero = images(await run(engine, params(engine, loras=(LoraRef(digest, 0.0),))))[0]
    assert styled != base and zero == base
    assert images(await run(engine, params(engine)))[0] == base
