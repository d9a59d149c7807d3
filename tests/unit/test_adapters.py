"""LoRA adapters on the worker: loaded on demand by digest, applied per batch, scale 0 exact, an LRU per model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app.config import demo_model
from app.worker.adapters import AdapterFiles, LoadedAdapters, adapter_name
from app.worker.engine import Engine
from app.worker.protocol import Failed, GenerationParams, Image, LoraRef, Started
from tests.lora import make_lora
from tests.unit.test_batching import events_of, pictures

MODEL = "imagegate-demo"


@pytest.fixture(scope="module")
def loras(data_dir) -> dict[str, tuple[Path, str]]:
    model = data_dir / "models" / MODEL
    return {
        name: make_lora(model, data_dir / "loras" / f"{name}.safetensors", seed)
        for name, seed in zip("abc", (1, 2, 3), strict=True)
    }


@pytest.fixture
async def engine(data_dir, loras, tmp_path):
    config = demo_model(str(data_dir))
    config.max_loaded_adapters = 2
    engine = Engine("cpu", [config], adapter_dir=tmp_path / "adapters")
    for path, digest in loras.values():
        engine.adapter_files.put(digest, path.read_bytes())
    await engine.start()
    yield engine
    await engine.stop()


def params(*loras: LoraRef, seed: int = 5, **kw) -> GenerationParams:
    return GenerationParams(
        model=MODEL, prompt="a red fox", width=64, height=64, steps=6, guidance=7.5, seed=seed, loras=loras, **kw
    )


async def image_of(engine: Engine, p: GenerationParams) -> np.ndarray:
    return pictures(await events_of(engine.submit(p)))[0]


async def test_adapters_change_the_image_and_scale_zero_does_not(engine, loras):
    a, b = (LoraRef(digest=loras[k][1], scale=1.0) for k in "ab")
    base = await image_of(engine, params())
    with_a = await image_of(engine, params(a))
    with_b = await image_of(engine, params(b))
    both = await image_of(engine, params(LoraRef(a.digest, 0.6), LoraRef(b.digest, 0.8)))
    zero = await image_of(engine, params(LoraRef(a.digest, 0.0)))
    again = await image_of(engine, params())
    assert np.abs(with_a - base).mean() > 1 and np.abs(with_b - base).mean() > 1
    assert np.abs(both - with_a).mean() > 1 and np.abs(both - with_b).mean() > 1
    assert np.array_equal(zero, base)  # scale 0 is no adapter, exactly
    assert np.array_equal(again, base)  # and after adapters ran, none gives the base model's image again
    assert np.array_equal(await image_of(engine, params(a)), with_a)  # same seed and adapters: same image


async def test_the_lru_evicts_and_reloads(engine, loras):
    adapters = engine.models[MODEL].adapters
    assert adapters is not None and engine.health().details[MODEL].lora
    refs = [LoraRef(digest=loras[k][1], scale=1.0) for k in "abc"]
    first = await image_of(engine, params(refs[0]))
    for ref in refs[1:]:
        await image_of(engine, params(ref))
    assert len(adapters.loaded) == 2 and adapters.evictions == 1  # a went first
    assert np.array_equal(await image_of(engine, params(refs[0])), first)  # reloaded, the same image
    assert adapters.loads == 4


async def test_adapter_sets_do_not_share_a_batch(engine, loras):
    a = LoraRef(digest=loras["a"][1], scale=1.0)
    jobs = [engine.submit(params(a, seed=1)), engine.submit(params(seed=2)), engine.submit(params(a, seed=3))]
    started = [next(e for e in await events_of(job) if isinstance(e, Started)) for job in jobs]
    assert [s.batch_size for s in started] == [2, 1, 2]


async def test_unknown_or_unfit_adapters_fail_the_job_only(engine, data_dir, tmp_path):
    missing = await events_of(engine.submit(params(LoraRef(digest="0" * 64, scale=1.0))))
    assert isinstance(missing[-1], Failed) and missing[-1].kind == "invalid_request"
    bad = tmp_path / "bad.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 3)}, bad)
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    engine.adapter_files.put(digest, bad.read_bytes())
    unfit = await events_of(engine.submit(params(LoraRef(digest=digest, scale=1.0))))
    assert isinstance(unfit[-1], Failed) and unfit[-1].kind == "invalid_request"
    assert any(isinstance(e, Image) for e in await events_of(engine.submit(params())))


def test_files_are_kept_by_their_digest(tmp_path):
    files = AdapterFiles(tmp_path)
    data = b"not really an adapter"
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError):
        files.put(digest, data + b"x")
    with pytest.raises(ValueError):
        files.path("../etc/passwd")
    assert not files.has(digest)
    files.put(digest, data)
    assert files.has(digest) and files.path(digest).read_bytes() == data


def test_the_lru_is_bounded_by_bytes_too(tmp_path):
    class Pipe:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def __getattr__(self, name):
            return lambda *a, **kw: self.calls.append((name, a))

    files = AdapterFiles(tmp_path)
    digests = []
    for k in range(3):
        data = bytes([k]) * 1000
        digests.append(hashlib.sha256(data).hexdigest())
        files.put(digests[-1], data)
    pipe = Pipe()
    adapters = LoadedAdapters(pipe, files, limit=10, max_bytes=2500)
    for d in digests:
        adapters.apply([LoraRef(d, 1.0)])
    assert len(adapters.loaded) == 2 and adapters.evictions == 1  # 3,000 bytes would be past 2,500
    adapters.apply([LoraRef(digests[1], 1.0), LoraRef(digests[2], 0.5)])
    assert ("delete_adapters", ([adapter_name(digests[0])],)) in pipe.calls
