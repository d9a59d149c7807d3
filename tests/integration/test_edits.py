"""Edits and variations through the real HTTP stack and the official SDK, served by a fake backend."""

from __future__ import annotations

import base64
import gzip
import io
import math
import os
import random
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from PIL import Image

import app.api.uploads as uploads
import app.services.inputs as inputs
from app.config import DEMO_MODEL, demo_model
from app.services.images import ImageService

from .conftest import make_client

EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"


# -- inputs -----------------------------------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png(w: int = 64, h: int = 64, colour: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, (w, h), colour), "PNG")


def noise(w: int, h: int, fmt: str = "PNG") -> bytes:
    """An incompressible image: its data spans many bytes, so cutting or flipping them hits the pixels."""
    return encode(Image.frombytes("RGB", (w, h), random.Random(w * h).randbytes(w * h * 3)), fmt)


def mask(w: int = 64, h: int = 64) -> bytes:
    """An OpenAI mask: opaque, with a transparent (redraw) square in the middle."""
    im = Image.new("RGBA", (w, h), (0, 0, 0, 255))
    im.paste((0, 0, 0, 0), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return encode(im, "PNG")


def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb(w: int, h: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header claims ``w`` x ``h`` 8-bit grey pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


IMG = png()
MASK = mask()


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def post_edit(
    client,
    images: list[bytes] | bytes = IMG,
    *,
    field: str = "image",
    mask: bytes | None = None,
    path: str = EDITS,
    names: tuple[str, str] = ("in.png", "image/png"),
    **fields: str,
):
    """A raw multipart edit: every image under ``field`` (repeated), then the mask; scalars as strings."""
    images = [images] if isinstance(images, bytes) else images
    files = [(field, (f"{k}-{names[0]}", data, names[1])) for k, data in enumerate(images)]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    if path == EDITS:
        fields.setdefault("prompt", "make it blue")
    return client.post(path, files=files, data={k: v for k, v in fields.items() if v is not None})


def error(r, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    return body


def sse_types(text: str) -> list[str]:
    return [line.removeprefix("event: ") for line in text.split("\n") if line.startswith("event: ")]


@pytest.fixture
def bodies(client) -> list[bytes]:
    """The raw bodies of the requests the test client sends."""
    sent: list[bytes] = []
    client.event_hooks["request"].append(lambda request: sent.append(request.read()))
    return sent


# -- forms ------------------------------------------------------------------------------------------------------


def test_sdk_list_of_one_image_is_sent_as_image_brackets(sdk, fake, bodies):
    result = sdk.images.edit(image=[("a.png", IMG, "image/png")], prompt="make it blue", size="128x64")
    assert b'name="image[]"' in bodies[-1]
    assert [size_of(d.b64_json) for d in result.data] == [(128, 64)]
    assert result.size == "128x64" and result.background == "opaque" and result.output_format == "png"
    p = fake.last_params
    assert p.task == "img2img" and p.prompt == "make it blue" and (p.width, p.height) == (128, 64)
    assert fake.last_attachments == [IMG] and p.image_bytes == len(IMG) and p.mask_bytes == 0


def test_sdk_single_image_is_sent_as_image(sdk, fake, bodies):
    result = sdk.images.edit(image=("a.png", IMG, "image/png"), prompt="p")
    assert b'name="image"' in bodies[-1] and b'name="image[]"' not in bodies[-1]
    assert len(result.data) == 1 and fake.last_params.task == "img2img"
    assert fake.last_attachments == [IMG]


def test_several_images_are_refused_in_every_form(sdk, client, fake):
    two = [("a.png", IMG, "image/png"), ("b.png", png(colour=(0, 0, 255)), "image/png")]
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.edit(image=two, prompt="p")
    assert err.value.body["param"] == "image" and err.value.body["code"] == "unsupported"
    for field in ("image", "image[]"):
        body = error(post_edit(client, [IMG, IMG], field=field))
        assert body["param"] == "image" and body["code"] == "unsupported"
        assert "reference images" in body["message"]
    assert fake.started == 0


def test_image_must_be_a_file(client, fake):
    r = client.post(EDITS, files=[("mask", ("m.png", MASK, "image/png"))], data={"image": "abc", "prompt": "p"})
    assert error(r)["param"] == "image"
    r = client.post(EDITS, files=[("mask", ("m.png", MASK, "image/png"))], data={"prompt": "p"})
    assert error(r)["param"] == "image" and "At least one image" in error(r)["message"]
    assert error(client.post(EDITS, data={"prompt": "p"}))["param"] is None  # urlencoded: not an edit form
    assert fake.started == 0


def test_at_most_sixteen_images(client, fake):
    sixteen = error(post_edit(client, [IMG] * 16))
    assert sixteen["code"] == "unsupported"  # within the limit: refused only because the model edits one image
    body = error(post_edit(client, [IMG] * 17))
    assert body["param"] == "image" and "At most 16" in body["message"]
    assert fake.started == 0


def test_a_mask_makes_an_inpaint_and_its_bytes_reach_the_backend_unchanged(sdk, fake):
    result = sdk.images.edit(
        image=("a.png", IMG, "image/png"), mask=("m.png", MASK, "image/png"), prompt="a cat", size="64x64"
    )
    assert len(result.data) == 1
    p = fake.last_params
    assert p.task == "inpaint" and p.strength == 1.0
    assert fake.last_attachments == [IMG, MASK]
    assert (p.image_bytes, p.mask_bytes) == (len(IMG), len(MASK))


@pytest.mark.parametrize(
    ("fields", "strength"),
    [({}, 0.75), ({"input_fidelity": "high"}, 0.5), ({"input_fidelity": "low"}, 0.75), ({"strength": "0.3"}, 0.3)],
)
def test_img2img_strength(client, fake, fields, strength):
    r = post_edit(client, **fields)
    assert r.status_code == 200, r.text
    assert fake.last_params.task == "img2img" and fake.last_params.strength == pytest.approx(strength)


@pytest.mark.parametrize("strength", ["0", "1.5", "-0.1", "strong"])
def test_strength_out_of_range(client, fake, strength):
    assert error(post_edit(client, strength=strength))["param"] == "strength"
    assert fake.started == 0


def test_scalars_arrive_as_strings_and_are_coerced(client, fake):
    r = post_edit(client, n="2", size="64x64", seed="7", guidance_scale="3.5", num_inference_steps="4")
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2
    p = fake.last_params
    assert (p.n, p.seed, p.guidance, p.steps) == (2, 7, 3.5, 4)
    r = post_edit(client, stream="true", partial_images="2", size="64x64")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert sse_types(r.text) == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": "two"}, "n"),
        ({"n": "11"}, "n"),
        ({"stream": "maybe"}, "stream"),
        ({"guidance_scale": "inf"}, "guidance_scale"),
        ({"guidance_scale": "NaN"}, "guidance_scale"),
        ({"guidance_scale": "1e999"}, "guidance_scale"),
        ({"num_inference_steps": "1" + "0" * 30}, "num_inference_steps"),
        ({"strength": "nan"}, "strength"),
    ],
)
def test_bad_scalars_name_their_field(client, fake, fields, param):
    assert error(post_edit(client, **fields))["param"] == param
    assert fake.started == 0


@pytest.mark.parametrize("prompt", [None, ""])
def test_prompt_is_required(client, fake, prompt):
    body = error(post_edit(client, prompt=prompt))
    assert body["param"] == "prompt"
    assert fake.started == 0


def test_background_removal_needs_no_prompt_and_is_transparent(client, fake):
    r = post_edit(client, type="background_removal", prompt=None)
    assert r.status_code == 200, r.text
    assert r.json()["background"] == "transparent" and r.json()["output_format"] == "png"
    assert fake.last_params.task == "background_removal" and fake.last_params.prompt == ""
    body = error(post_edit(client, type="background_removal", output_format="jpeg"))
    assert body["param"] == "output_format"


def test_transparent_background_needs_background_removal(client, fake):
    assert error(post_edit(client, background="transparent"))["param"] == "background"
    assert post_edit(client, background="auto").status_code == 200


def test_task_the_model_cannot_run_is_unsupported(client, fake):
    client.app.state.pool.members[0].tasks = {DEMO_MODEL: frozenset({"text2img"})}
    body = error(post_edit(client))
    assert body["code"] == "unsupported" and body["param"] == "image"
    body = error(post_edit(client, type="background_removal"))
    assert body["code"] == "unsupported" and body["param"] == "type"
    assert fake.started == 0
    assert client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"}).status_code == 200


def test_outpainting_needs_a_size(client, fake):
    for size in (None, "auto"):
        assert error(post_edit(client, type="outpainting", size=size))["param"] == "size"
    r = post_edit(client, type="outpainting", size="256x128")
    assert r.status_code == 200, r.text
    assert size_of(r.json()["data"][0]["b64_json"]) == (256, 128)
    assert fake.last_params.task == "outpaint" and fake.last_params.strength == 1.0


def test_inpainting_needs_a_mask(client, fake):
    assert error(post_edit(client, type="inpainting"))["param"] == "mask"
    assert post_edit(client, type="inpainting", mask=MASK).status_code == 200
    assert fake.last_params.task == "inpaint"


def test_output_size_is_the_requested_one_or_the_input_fitted_to_the_grid(client, fake):
    r = post_edit(client, png(100, 60), size="192x320")
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "192x320" and size_of(r.json()["data"][0]["b64_json"]) == (192, 320)
    assert error(post_edit(client, size="100x60"))["param"] == "size"  # not on the model's grid
    for size in (None, "auto"):
        r = post_edit(client, png(100, 60), size=size)
        assert r.status_code == 200, r.text
        w, h = size_of(r.json()["data"][0]["b64_json"])
        assert (w, h) == ImageService._fit(demo_model(""), 100, 60)
        assert r.json()["size"] == f"{w}x{h}"
        assert w % 16 == 0 and h % 16 == 0 and 64 <= h < w <= 1024  # on the grid, still landscape
        assert abs(w / h - 100 / 60) < 16 / h


def test_streamed_edit_with_the_sdk(sdk, fake):
    events = list(
        sdk.images.edit(image=("a.png", IMG, "image/png"), prompt="p", size="64x64", stream=True, partial_images=2)
    )
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert events[-1].usage.output_tokens == 16 and events[-1].size == "64x64"
    assert fake.last_params.partial_images == 2 and fake.last_attachments == [IMG]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_variations(sdk, client, fake):
    result = sdk.images.create_variation(image=("a.png", IMG, "image/png"), n=2)
    assert [size_of(d.b64_json) for d in result.data] == [(64, 64), (64, 64)]
    p = fake.last_params
    assert p.task == "img2img" and p.prompt == "" and p.strength == pytest.approx(0.6) and p.n == 2
    assert fake.last_attachments == [IMG]
    assert error(post_edit(client, path=VARIATIONS, stream="true"))["param"] == "stream"
    assert error(client.post(VARIATIONS, json={"image": data_url(IMG)}))["param"] is None


def test_json_edit_with_a_data_url(client, fake):
    body = {"images": [{"image_url": data_url(IMG)}], "prompt": "p", "n": 2, "mask": {"image_url": data_url(MASK)}}
    r = client.post(EDITS, json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2
    assert fake.last_params.task == "inpaint" and fake.last_attachments == [IMG, MASK]


@pytest.mark.parametrize(
    ("ref", "param"),
    [
        ({"file_id": "file-abc"}, "images[0]"),
        ({}, "images[0]"),
        ({"image_url": "ftp://example.com/a.png"}, "images[0]"),
        ({"image_url": "data:image/png,notbase64"}, "images[0]"),
        ({"image_url": "data:image/png;base64,!!!"}, "images[0]"),
    ],
)
def test_json_edit_refusals(client, fake, ref, param):
    body = error(client.post(EDITS, json={"images": [ref], "prompt": "p"}))
    assert body["param"] == param
    assert fake.started == 0


def test_usage_counts_the_input_image_tokens(client):
    r = post_edit(client, png(100, 60), size="64x64")
    usage = r.json()["usage"]
    assert usage["input_tokens_details"]["image_tokens"] == math.ceil(100 / 16) * math.ceil(60 / 16)
    assert usage["input_tokens"] == usage["input_tokens_details"]["text_tokens"] + 28
    assert usage["output_tokens"] == 16 and usage["total_tokens"] == usage["input_tokens"] + 16


# -- image URLs -------------------------------------------------------------------------------------------------


class ImageServer:
    """A tiny HTTP server on 127.0.0.1 that records the paths asked for."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.hits: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/image.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/gzip":
                    body = gzip.compress(b"\0" * 5_000_000)
                    self.send_response(200)
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path == "/slow":
                    server.release.wait(10)
                body = server.image + b"\0" * 10_000 if self.path.startswith("/big") else server.image
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if self.path != "/big-unannounced":  # HTTP/1.0 without a length: the body ends when we close
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


SERVED = png(80, 48, colour=(10, 200, 10))


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer(SERVED) as s:
        yield s


def json_edit(client, url: str):
    return client.post(EDITS, json={"images": [{"image_url": url}], "prompt": "p"})


def test_url_from_a_host_not_allowed_is_refused_without_a_request(client, fake, server):
    body = error(json_edit(client, f"{server.base}/image.png"))
    assert body["param"] == "images[0]" and "not allowed" in body["message"]
    assert server.hits == [] and fake.started == 0


def test_url_from_an_allowed_host_is_fetched_and_used(tmp_path, fake, server):
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], image_url_allowlist=["127.0.0.1"]) as tc:
        r = json_edit(tc, f"{server.base}/image.png")
    assert r.status_code == 200, r.text
    assert server.hits == ["/image.png"]
    assert fake.last_attachments == [SERVED]
    assert r.json()["size"] == "{}x{}".format(*ImageService._fit(demo_model(""), 80, 48))


def test_redirects_are_not_followed(tmp_path, fake, server):
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], image_url_allowlist=["127.0.0.1"]) as tc:
        body = error(json_edit(tc, f"{server.base}/redirect"))
    assert body["param"] == "images[0]" and "302" in body["message"]
    assert server.hits == ["/redirect"] and fake.started == 0


@pytest.mark.parametrize("path", ["/big", "/big-unannounced", "/gzip"])
def test_url_body_over_max_image_bytes_is_refused(tmp_path, fake, server, path):
    limit = len(SERVED) + 100
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], image_url_allowlist=["127.0.0.1"], max_image_bytes=limit) as tc:
        assert json_edit(tc, f"{server.base}/image.png").status_code == 200  # within the limit
        body = error(json_edit(tc, f"{server.base}{path}"))
    assert body["param"] == "images[0]" and str(limit) in body["message"]
    assert fake.started == 1


def test_slow_url_times_out(tmp_path, fake, server):
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], image_url_allowlist=["127.0.0.1"], image_url_timeout=0.5) as tc:
        started = time.monotonic()
        body = error(json_edit(tc, f"{server.base}/slow"))
        elapsed = time.monotonic() - started
    assert body["param"] == "images[0]" and "Timeout" in body["message"]
    assert elapsed < 3
    assert fake.started == 0


# -- hardening --------------------------------------------------------------------------------------------------


def test_the_type_comes_from_the_bytes_not_the_name(client, fake):
    r = post_edit(client, IMG, names=("x.jpg", "text/plain"))
    assert r.status_code == 200, r.text
    assert fake.last_attachments == [IMG]


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.new("RGB", (64, 64), "red"), "GIF"),
        b"just some text, not an image\n" * 10,
        random.Random(1).randbytes(4000),
        b"",
        b"\x89PN",
    ],
    ids=["gif", "text", "random", "empty", "short"],
)
def test_other_formats_are_refused(client, fake, data):
    body = error(post_edit(client, data, names=("x.png", "image/png")))
    assert body["code"] == "invalid_image_format" and body["param"] == "image"
    assert fake.started == 0


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_are_accepted(client, fake, fmt):
    data = encode(Image.new("RGB", (96, 64), "blue"), fmt)
    r = post_edit(client, data, names=("x.png", "image/png"))
    assert r.status_code == 200, r.text
    assert fake.last_attachments == [data] and r.json()["size"] == "96x64"


def test_image_over_max_image_bytes(tmp_path, fake):
    big = noise(64, 64)
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], max_image_bytes=len(big) - 1) as tc:
        body = error(post_edit(tc, big))
        assert body["code"] == "image_too_large" and body["param"] == "image"
        body = error(post_edit(tc, IMG, mask=big))
        assert body["code"] == "image_too_large" and body["param"] == "mask"
    assert fake.started == 0


@pytest.mark.parametrize(
    "side",
    [
        8000,  # over max_image_pixels, under Pillow's own bomb limit: the gateway's check refuses it
        60000,  # past Pillow's own guard: refused as too large all the same
    ],
)
def test_decompression_bomb_is_refused_from_its_header(client, fake, side):
    data = bomb(side, side)
    assert len(data) < 300
    started = time.monotonic()
    r = post_edit(client, data)
    assert time.monotonic() - started < 1  # 8000x8000 or more pixels were never decoded
    body = error(r)
    assert body["param"] == "image" and fake.started == 0
    assert body["code"] == "image_too_large"


def test_decompression_bomb_is_refused_fast_whatever_its_code(client, fake):
    data = bomb(60000, 60000)
    started = time.monotonic()
    r = post_edit(client, data)
    assert time.monotonic() - started < 1
    assert error(r)["code"] in ("image_too_large", "invalid_image")
    assert fake.started == 0


def _flip_idat(data: bytes) -> bytes:
    at = data.index(b"IDAT") + 4 + 100
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 16]) + data[at + 16 :]


@pytest.mark.parametrize(
    "data",
    [
        noise(64, 64)[: len(noise(64, 64)) // 2],
        _flip_idat(noise(64, 64)),
        noise(64, 64, "JPEG")[: len(noise(64, 64, "JPEG")) // 2],
        encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:200],
        noise(64, 64, "WEBP")[: len(noise(64, 64, "WEBP")) // 2],
    ],
    ids=["truncated-png", "corrupt-png", "truncated-jpeg", "truncated-flat-jpeg", "truncated-webp"],
)
def test_truncated_or_corrupt_images(client, fake, data):
    body = error(post_edit(client, data))
    assert body["code"] == "invalid_image" and body["param"] == "image"
    assert fake.started == 0


def test_mask_of_another_size_is_refused(client, fake):
    body = error(post_edit(client, IMG, mask=mask(64, 32)))
    assert body["param"] == "mask" and "64x32" in body["message"]
    assert error(post_edit(client, IMG, mask=b"not a mask"))["code"] == "invalid_image_format"
    assert fake.started == 0


def test_exif_orientation_is_honoured(client, fake):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored 96x48 displays as 48x96
    data = encode(Image.new("RGB", (96, 48), "red"), "JPEG", exif=exif)
    r = post_edit(client, data, size="auto")
    assert r.status_code == 200, r.text
    w, h = size_of(r.json()["data"][0]["b64_json"])
    assert h > w and (w, h) == ImageService._fit(demo_model(""), 48, 96)
    assert r.json()["usage"]["input_tokens_details"]["image_tokens"] == 3 * 6
    assert post_edit(client, data, mask=mask(48, 96)).status_code == 200
    assert fake.last_params.task == "inpaint" and fake.last_attachments[0] == data
    assert error(post_edit(client, data, mask=mask(96, 48)))["param"] == "mask"


def test_body_over_max_upload_size_is_413(tmp_path, fake):
    big = noise(200, 200)
    assert len(big) > 100_000
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], max_upload_size=100_000) as tc:
        body = error(post_edit(tc, big), 413)
        assert body["code"] == "payload_too_large"
        body = error(tc.post(EDITS, json={"images": [{"image_url": data_url(big)}], "prompt": "p"}), 413)
        assert body["code"] == "payload_too_large"
        chunks = (big[i : i + 10_000] for i in range(0, len(big), 10_000))  # no content-length: counted as read
        r = tc.post(EDITS, content=chunks, headers={"content-type": "multipart/form-data; boundary=x"})
        assert error(r, 413)["code"] == "payload_too_large"
        assert post_edit(tc, IMG).status_code == 200  # a small one still passes
    assert fake.started == 1


# -- temporary files --------------------------------------------------------------------------------------------


@pytest.fixture
def tracked(monkeypatch) -> list[Any]:
    """Every file the gateway inspects or spools for an input image (uploads, data: URLs, downloads)."""
    files: list[Any] = []
    real_inspect, real_spool = inputs.inspect, inputs.new_spool

    def inspect(file, settings, param):
        files.append(file)
        return real_inspect(file, settings, param)

    def new_spool():
        files.append(real_spool())
        return files[-1]

    monkeypatch.setattr(inputs, "inspect", inspect)
    monkeypatch.setattr(inputs, "new_spool", new_spool)
    monkeypatch.setattr(uploads, "new_spool", new_spool)
    return files


def _all_closed(files: list[Any], count: int) -> None:
    deadline = time.monotonic() + 2  # a stream's job closes its files as the response ends
    while not all(f.closed for f in files) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(files) >= count and all(f.closed for f in files), [f.closed for f in files]


def test_input_files_are_closed_however_the_request_ends(client, fake, tracked):
    json_ok = {"images": [{"image_url": data_url(IMG)}], "mask": {"image_url": data_url(MASK)}, "prompt": "p"}
    json_bad_mask = {**json_ok, "mask": {"image_url": data_url(mask(32, 32))}}
    json_bad_second = {"images": [{"image_url": data_url(IMG)}, {"image_url": "data:image/png;base64,AAAA"}]}
    cases = [
        (lambda: client.post(EDITS, json=json_ok), 200, 4),
        (lambda: client.post(EDITS, json={**json_ok, "stream": True, "partial_images": 1}), 200, 4),
        (lambda: client.post(EDITS, json=json_bad_mask), 400, 4),
        (lambda: client.post(EDITS, json={**json_bad_second, "prompt": "p"}), 400, 4),
        (lambda: client.post(EDITS, json={**json_ok, "size": "65x64"}), 400, 4),
        (lambda: post_edit(client, IMG, mask=MASK), 200, 2),
        (lambda: post_edit(client, IMG, stream="true"), 200, 1),
        (lambda: post_edit(client, [IMG, b"GIF89a" + b"\0" * 100], field="image[]"), 400, 2),
        (lambda: post_edit(client, IMG, mask=mask(32, 32)), 400, 2),
        (lambda: post_edit(client, [IMG, IMG], path=VARIATIONS), 200, 2),
    ]
    for k, (send, status, count) in enumerate(cases):
        tracked.clear()
        r = send()
        assert r.status_code == status, (k, r.text)
        _all_closed(tracked, count)


def test_no_deleted_temp_file_stays_open(client, fake):
    """Inputs over the spool threshold live on disk; none of their descriptors outlives its request."""

    def deleted_fds() -> set[str]:
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.endswith("(deleted)"):
                out.add(target)
        return out

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    big = noise(700, 700)
    assert len(big) > inputs.SPOOL_BYTES
    before = deleted_fds()
    probe = inputs.spool(big)  # the check sees an input spooled to disk...
    assert len(deleted_fds() - before) == 1
    probe.close()  # ...and its closing
    assert deleted_fds() <= before
    assert post_edit(client, big, size="64x64").status_code == 200
    assert error(post_edit(client, big, mask=mask(64, 64)))["param"] == "mask"
    assert client.post(EDITS, json={"images": [{"image_url": data_url(big)}], "prompt": "p"}).status_code == 200
    assert deleted_fds() <= before
    assert fake.last_attachments == [big]


# -- the multipart parser ---------------------------------------------------------------------------------------

BOUNDARY = "imagegate-test-boundary"


def part(name: str, data: bytes, *, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"Content-Disposition: {disposition}\r\n" + (f"Content-Type: {content_type}\r\n" if content_type else "")
    return f"--{BOUNDARY}\r\n{head}\r\n".encode() + data + b"\r\n"


def post_raw(client, *parts: bytes, path: str = EDITS, end: bool = True, boundary: str | None = BOUNDARY):
    body = b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if end else b"")
    content_type = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    return client.post(path, content=body, headers={"content-type": content_type})


def test_an_image_part_without_a_filename_is_the_image(client, fake, tracked):
    # What `curl -F image=<in.png` sends (and requests' files={"image": (None, data)}): no filename at all.
    r = post_raw(client, part("image", IMG), part("mask", MASK), part("prompt", b"a cat"))
    assert r.status_code == 200, r.text
    assert fake.last_params.task == "inpaint" and fake.last_attachments == [IMG, MASK]
    r = post_raw(client, part("image", IMG), path=VARIATIONS)
    assert r.status_code == 200, r.text
    assert fake.last_attachments == [IMG]
    _all_closed(tracked, 3)


def test_an_empty_file_input_is_no_file(client, fake):
    # A browser form whose mask input has no file chosen sends an empty part with an empty filename.
    empty_mask = part("mask", b"", filename="", content_type="application/octet-stream")
    r = post_raw(client, part("image", IMG, filename="in.png"), empty_mask, part("prompt", b"p"))
    assert r.status_code == 200, r.text
    assert fake.last_params.task == "img2img" and fake.last_attachments == [IMG]


@pytest.mark.parametrize("charset", ["utf-8", "latin-1", "utf-16", "shift_jis"])
def test_text_fields_are_read_in_their_charset(client, fake, charset):
    prompt = "café au lait" if charset != "shift_jis" else "猫の絵"
    field = part("prompt", prompt.encode(charset), content_type=f"text/plain; charset={charset}")
    r = post_raw(client, part("image", IMG, filename="a.png"), field)
    assert r.status_code == 200, r.text
    assert fake.last_params.prompt == prompt


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (part("prompt", b"caf\xe9"), "not valid utf-8 text"),
        (part("prompt", b"abc", content_type="text/plain; charset=x-no-such-charset"), "not a text encoding"),
        (part("prompt", b"616263", content_type="text/plain; charset=hex"), "not a text encoding"),
        (part("prompt", b"\xd8\x00", content_type="text/plain; charset=utf-16-be"), "not valid utf-16-be text"),
        (part("prompt", b"x" * (uploads.MAX_FIELD_BYTES + 1)), "is over"),
        (part("n", b"1") + part("n", b"2"), "sent 2 times"),
    ],
    ids=["not-utf8", "unknown-charset", "binary-codec", "lone-surrogate", "overlong", "duplicated"],
)
def test_unreadable_text_fields_name_themselves(client, fake, tracked, field, message):
    body = error(post_raw(client, part("image", IMG, filename="a.png"), part("prompt", b"p") + field))
    assert body["param"] in ("prompt", "n") and message in body["message"], body
    assert fake.started == 0
    _all_closed(tracked, 1)


def test_parts_the_request_does_not_read_are_skipped(client, fake):
    huge = part("notes", random.Random(2).randbytes(2 * uploads.MAX_FIELD_BYTES), filename="notes.bin")
    r = post_raw(client, huge, part("image", IMG, filename="a.png"), part("prompt", b"p"), part("x", b"\xff"))
    assert r.status_code == 200, r.text
    assert fake.last_attachments == [IMG]


def test_an_image_part_over_the_limit_is_refused_before_the_body_ends(tmp_path, fake):
    big = noise(64, 64)
    tail = part("image", random.Random(3).randbytes(len(big)), filename="more.png")  # never read
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], max_image_bytes=len(big) - 1) as tc:
        body = error(post_raw(tc, part("image", big + b"trailing", filename="a.png"), tail))
        assert body["code"] == "image_too_large" and body["param"] == "image"
    assert fake.started == 0


@pytest.mark.parametrize(
    ("kwargs", "parts", "message"),
    [
        ({"boundary": None}, [part("image", IMG)], "boundary"),
        ({"end": False}, [part("image", IMG, filename="a.png")], "malformed"),
        ({}, [b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: form-data\r\n"], "malformed"),
        ({}, [part("prompt", b"p")] * (uploads.MAX_PARTS + 1), "at most"),
        ({}, [part("prompt", b"p", content_type="text/plain; x=" + "y" * 5000)], "at most"),
    ],
    ids=["no-boundary", "unterminated", "cut-in-headers", "too-many-parts", "overlong-header"],
)
def test_malformed_bodies_are_400s(client, fake, tracked, kwargs, parts, message):
    body = error(post_raw(client, part("image", IMG, filename="a.png"), *parts, **kwargs))
    assert message in body["message"], body
    assert fake.started == 0
    _all_closed(tracked, 0 if "boundary" in kwargs else 1)  # without a boundary nothing is read
