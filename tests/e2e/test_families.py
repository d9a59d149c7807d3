"""The families people serve through a real `imagegate serve` and the official SDK, each configured by name and path.

One server serves tiny SDXL, SD3, FLUX.1-dev, Qwen-Image, Sana and PixArt-Sigma pipelines (tests/families.py: each
family's real classes, latent shapes and published scheduler config) from one CPU worker.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI
from PIL import Image

from ..families import save_family
from .conftest import Server

pytestmark = pytest.mark.e2e

# Served name -> (family the worker finds, whether it has image-to-image and inpainting).
MODELS = {
    "sdxl": ("sdxl", True),
    "sd3": ("sd3", True),
    "flux": ("flux", True),
    "qwen_image": ("qwen_image", True),
    "sana": ("sana", False),
    "pixart_sigma": ("pixart", False),
}
SIZE = "64x64"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("families-e2e")
    lines = []
    for name in MODELS:
        path = save_family(name, data / "models" / name)
        lines += ["[[models]]", f'name = "{name}"', f'path = "{path}"', ""]
    (data / "config.toml").write_text("\n".join(lines))
    srv = Server(data, "--config", str(data / "config.toml"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sdk(served) -> OpenAI:
    return served.sdk()


def pictures(result) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def mask() -> bytes:
    buf = io.BytesIO()
    hole = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    hole.paste((0, 0, 0, 0), (16, 16, 48, 48))
    hole.save(buf, "PNG")
    return buf.getvalue()


def test_the_models_say_what_they_are(sdk):
    listed = {m.id: m.model_dump() for m in sdk.models.list().data}
    assert set(listed) == set(MODELS)
    for name, (family, edits) in MODELS.items():
        model = listed[name]
        assert model["family"] == family
        assert set(model["tasks"]) == {"text2img", *({"img2img", "inpaint", "outpaint"} if edits else set())}
        flow = family not in ("sdxl", "pixart")
        assert model["schedulers"] and all(s.startswith("flow_") == flow for s in model["schedulers"])
        assert model["default_steps"] >= 1 and model["default_guidance"] >= 0
    assert sdk.models.retrieve("flux").model_dump()["default_guidance"] == 3.5  # FLUX.1-dev's, not SD's 7.5


@pytest.mark.parametrize("name", MODELS)
def test_generate_stream_and_every_scheduler(sdk, name):
    extra = {"seed": 3, "num_inference_steps": 4}
    [image] = pictures(sdk.images.generate(model=name, prompt="a red fox", size="128x64", extra_body=extra))
    assert image.size == (128, 64)
    events = list(
        sdk.images.generate(model=name, prompt="a red fox", size=SIZE, stream=True, partial_images=2, extra_body=extra)
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    for scheduler in sdk.models.retrieve(name).model_dump()["schedulers"]:
        body = {"seed": 5, "num_inference_steps": 2, "scheduler": scheduler}
        a, b = (sdk.images.generate(model=name, prompt="a fox", size=SIZE, extra_body=body) for _ in range(2))
        assert a.data[0].b64_json == b.data[0].b64_json, scheduler  # stochastic samplers too


@pytest.mark.parametrize("name", [n for n, (_, edits) in MODELS.items() if edits])
def test_edits_return_the_size_asked_for(sdk, name):
    extra = {"seed": 3, "num_inference_steps": 4}
    edit = sdk.images.edit(model=name, image=("in.png", png()), prompt="blue", size=SIZE, extra_body=extra)
    assert [p.size for p in pictures(edit)] == [(64, 64)]
    inpaint = sdk.images.edit(
        model=name, image=("in.png", png()), mask=("m.png", mask()), prompt="a hat", size=SIZE, extra_body=extra
    )
    assert [p.size for p in pictures(inpaint)] == [(64, 64)]


def test_a_scheduler_of_another_kind_is_a_400_naming_the_valid_ones(sdk):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(model="flux", prompt="a fox", size=SIZE, extra_body={"scheduler": "euler_a"})
    assert err.value.body["param"] == "scheduler" and "flow_euler" in err.value.body["message"]


def test_a_streamed_request_batched_with_plain_ones_fails_none_of_them(sdk):
    # Qwen-Image's previews once crashed the pipeline call, and with it every request batched with the stream.
    def plain(seed: int):
        extra = {"seed": seed, "num_inference_steps": 6}
        return sdk.images.generate(model="qwen_image", prompt="a fox", size=SIZE, extra_body=extra)

    def streamed():
        extra = {"seed": 9, "num_inference_steps": 6}
        return list(
            sdk.images.generate(
                model="qwen_image", prompt="a fox", size=SIZE, stream=True, partial_images=2, extra_body=extra
            )
        )

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(streamed), *(pool.submit(plain, seed) for seed in (1, 2, 3))]
        results = [f.result(timeout=120) for f in futures]
    assert results[0][-1].type == "image_generation.completed"
    assert all(len(r.data) == 1 for r in results[1:])
