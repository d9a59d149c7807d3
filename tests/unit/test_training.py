"""LoRA training on the demo model (CPU): presets, trigger words, an adapter that changes the image, resume, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import re

import msgspec
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DiffusionPipeline
from PIL import Image as PILImage

from app.config import demo_model
from app.worker.engine import Engine
from app.worker.protocol import Done, Failed, GenerationParams, LoraRef, TrainingPlan, caption, plan, trigger_word
from app.worker.training import LoraTrainer, TrainingCancelled, save_adapter
from tests.unit.test_batching import events_of, pictures

MODEL = "imagegate-demo"


@pytest.fixture(scope="module")
def pipe(data_dir):
    return DiffusionPipeline.from_pretrained(data_dir / "models" / MODEL)


def product_photos() -> list[PILImage.Image]:
    """A handful of 'product photos': a red square on white, placed differently."""
    out = []
    for k in range(4):
        image = PILImage.new("RGB", (96, 96), (255, 255, 255))
        image.paste((220, 20, 20), (10 + 8 * k, 20, 60 + 8 * k, 70))
        out.append(image)
    return out


# A few steps at a high rate, so that seconds of CPU make an adapter that visibly moves the demo model.
SMALL = TrainingPlan(rank=4, alpha=4, steps=6, learning_rate=5e-3, resolution=64, batch_size=1, checkpoint_every=3)


def train(pipe, tmp_path, **kw) -> dict[str, torch.Tensor]:
    trigger = "FJA90AB"
    trainer = LoraTrainer(
        pipe,
        SMALL,
        product_photos(),
        [caption(trigger, c) for c in ("a red box", None, "", "a box on white")],
        seed=11,
        checkpoint_dir=tmp_path / "checkpoints",
    )
    return trainer.run(**kw)


def test_presets_scale_with_images_and_strength():
    fast, quality = plan("fast", 10, 5, 1024), plan("high_quality", 10, 5, 1024)
    assert (fast.rank, fast.steps, fast.resolution) == (8, 400, 512)
    assert (quality.rank, quality.steps, quality.resolution) == (16, 1000, 1024)
    assert plan("fast", 2, 5, 1024).steps == 200 and plan("fast", 100, 5, 1024).steps == 800  # within the bounds
    weak, strong = plan("fast", 10, 0, 512), plan("fast", 10, 10, 512)
    assert weak.steps == 200 and strong.steps == 800
    assert weak.learning_rate == pytest.approx(1e-4) and strong.learning_rate == pytest.approx(4e-4)
    assert plan("fast", 10, 5, 512).resolution == 256
    with pytest.raises(ValueError):
        plan("fast", 10, 11, 512)


def test_trigger_words_and_captions():
    words = {trigger_word(random.Random(k)) for k in range(50)}
    assert len(words) == 50 and all(re.fullmatch(r"[A-Z]{3}[0-9]{2}[A-Z]{2}", w) for w in words)
    assert caption("FJA90AB", " a red box ") == "FJA90AB, a red box" and caption("FJA90AB", "") == "FJA90AB"


async def test_a_trained_adapter_changes_the_image_and_loads_like_any_other(pipe, data_dir, tmp_path):
    losses: list[tuple[int, float]] = []
    weights = train(pipe, tmp_path, on_step=lambda step, total, loss: losses.append((step, loss)))
    assert [s for s, _ in losses] == list(range(1, 7)) and all(np.isfinite(v) for _, v in losses)
    assert weights and all(k.startswith("unet.") and "lora_" in k for k in weights)
    path = tmp_path / "adapter.safetensors"
    save_adapter(weights, path, {"trigger_word": "FJA90AB"})
    engine = Engine("cpu", [demo_model(str(data_dir))], adapter_dir=tmp_path / "worker")
    await engine.start()
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        engine.adapter_files.put(digest, path.read_bytes())
        p = GenerationParams(model=MODEL, prompt="FJA90AB", width=64, height=64, steps=6, guidance=7.5, seed=2)
        base = pictures(await events_of(engine.submit(p)))[0]
        trained = pictures(
            await events_of(
                engine.submit(
                    GenerationParams(
                        **{**{f: getattr(p, f) for f in p.__struct_fields__}, "loras": (LoraRef(digest, 1.0),)}
                    )
                )
            )
        )[0]
        assert np.abs(trained - base).mean() > 0.5
    finally:
        await engine.stop()
    # the served model was not touched by the training
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_a_cancelled_training_resumes_from_its_checkpoint_to_the_same_adapter(pipe, tmp_path):
    whole = train(pipe, tmp_path / "whole")
    seen: list[int] = []
    with pytest.raises(TrainingCancelled):  # the worker is lost (or a cancel comes) before step 5
        train(pipe, tmp_path / "cut", on_step=lambda s, t, loss: seen.append(s), should_stop=lambda: len(seen) == 4)
    assert seen == [1, 2, 3, 4] and (tmp_path / "cut" / "checkpoints" / "checkpoint.pt").is_file()
    resumed_steps: list[int] = []
    resumed = train(pipe, tmp_path / "cut", on_step=lambda s, t, loss: resumed_steps.append(s))
    assert resumed_steps == [4, 5, 6]  # from the checkpoint after step 3, not from the start
    for name, value in whole.items():
        assert torch.allclose(value, resumed[name], atol=1e-6), name
    assert not list((tmp_path / "cut" / "checkpoints").glob(".checkpoint*"))  # nothing half-written left


def test_unsupported_models_and_inputs_are_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match="one caption per training image"):
        LoraTrainer(pipe, SMALL, product_photos(), ["x"], seed=1, checkpoint_dir=tmp_path)

    class NoUnet:
        unet = None

    with pytest.raises(ValueError, match="UNet models"):
        LoraTrainer(NoUnet(), SMALL, product_photos(), ["x"] * 4, seed=1, checkpoint_dir=tmp_path)


def png(image: PILImage.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


async def test_the_engine_trains_between_inference_jobs_and_resumes_from_a_checkpoint_it_sent(data_dir, tmp_path):
    """Through the worker's engine: step events, checkpoints, previews, the adapter; a rerun resumes."""
    from app.worker.protocol import AdapterFile, Checkpoint, Partial, Started, TrainingParams, TrainingStep

    engine = Engine("cpu", [demo_model(str(data_dir))], adapter_dir=tmp_path / "worker")
    await engine.start()
    files = [png(p) for p in product_photos()]
    params = TrainingParams(
        model=MODEL,
        plan=SMALL,
        seed=11,
        trigger_word="FJA90AB",
        captions=[caption("FJA90AB", None)] * 4,
        image_bytes=[len(f) for f in files],
        preview_every=3,
    )
    try:
        assert engine.health().details[MODEL].trainable
        training = engine.train(params, files, None)
        # an inference job submitted meanwhile runs between two slices of the training, not after it
        p = GenerationParams(model=MODEL, prompt="a box", width=64, height=64, steps=2, guidance=7.5, seed=2)
        generated, trained = await asyncio.gather(events_of(engine.submit(p)), events_of(training))
        assert isinstance(generated[-1], Done)
        assert isinstance(trained[0], Started) and isinstance(trained[-1], Done), trained[-1]
        assert [e.step for e in trained if isinstance(e, TrainingStep)] == list(range(1, 7))
        checkpoints = [e for e in trained if isinstance(e, Checkpoint)]
        assert [c.step for c in checkpoints] == [3]
        assert [e.partial_index for e in trained if isinstance(e, Partial)] == [3, 6]
        whole = next(e for e in trained if isinstance(e, AdapterFile)).data
        assert not engine.health().training

        # a rerun sent the checkpoint after step 3 goes on from step 4, and ends with the same adapter
        again = msgspec.structs.replace(params, checkpoint_bytes=len(checkpoints[0].data), preview_every=0)
        resumed = await events_of(engine.train(again, files, checkpoints[0].data))
        assert [e.step for e in resumed if isinstance(e, TrainingStep)] == [4, 5, 6]
        a = safetensors.torch.load(whole)
        b = safetensors.torch.load(next(e for e in resumed if isinstance(e, AdapterFile)).data)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

        # cancelled between two steps: no adapter
        cancelled = engine.train(again, files, None)
        first = await asyncio.wait_for(cancelled.events.get(), 60)
        cancelled.cancel()
        rest = [first, *await events_of(cancelled)]
        assert isinstance(rest[-1], Failed) and rest[-1].kind == "cancelled"
        assert not any(isinstance(e, AdapterFile) for e in rest)

        # a corrupt training image fails the training as the request's fault
        bad = engine.train(msgspec.structs.replace(params, image_bytes=[3]), [b"xyz"], None)
        failed = await events_of(bad)
        assert isinstance(failed[-1], Failed) and failed[-1].kind == "invalid_request"
    finally:
        await engine.stop()
