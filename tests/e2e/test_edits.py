"""Edits and variations through a real `imagegate serve` on the demo model, with the official SDK and raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from .conftest import Server

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"


def png(size=(128, 96), colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def hole_mask(size=(128, 96)) -> bytes:
    """Opaque everywhere but a transparent rectangle: OpenAI's 'redraw here'."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 32, 96, 64))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_edit_with_a_list_of_one_image(sdk):
    result = sdk.images.edit(model=MODEL, image=[("fox.png", png(), "image/png")], prompt="make it blue")
    assert decode(result.data[0].b64_json).size == (128, 96)  # size auto: the input's
    assert result.usage.input_tokens_details.image_tokens == 8 * 6


def test_edit_with_a_single_file(sdk):
    result = sdk.images.edit(model=MODEL, image=("fox.png", png()), prompt="make it blue", size="64x64", n=2)
    assert [decode(d.b64_json).size for d in result.data] == [(64, 64), (64, 64)]


def test_edit_with_a_mask(sdk):
    # Same seed and strength with and without the mask: only the mask differs, so the pictures must too. (What the
    # mask means pixel by pixel is tested on the worker's own mask handling: this model's weights are random.)
    common = {"model": MODEL, "prompt": "a hole", "size": "128x96", "extra_body": {"seed": 3, "strength": 1.0}}
    masked = sdk.images.edit(image=("fox.png", png()), mask=("mask.png", hole_mask()), **common)
    plain = sdk.images.edit(image=("fox.png", png()), **common)
    again = sdk.images.edit(image=("fox.png", png()), mask=("mask.png", hole_mask()), **common)
    assert decode(masked.data[0].b64_json).size == (128, 96)
    assert masked.data[0].b64_json == again.data[0].b64_json
    assert masked.data[0].b64_json != plain.data[0].b64_json


def test_streamed_edit(sdk):
    events = list(sdk.images.edit(model=MODEL, image=("fox.png", png()), prompt="x", stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert decode(events[-1].b64_json).size == (128, 96)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks variations deprecated
def test_variation_n2(sdk):
    result = sdk.images.create_variation(model=MODEL, image=("fox.png", png()), n=2, size="64x64")
    images = [decode(d.b64_json) for d in result.data]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert result.data[0].b64_json != result.data[1].b64_json


def test_outpainting_grows_the_canvas(sdk):
    result = sdk.images.edit(
        model=MODEL, image=("fox.png", png()), prompt="more", size="256x128", extra_body={"type": "outpainting"}
    )
    assert decode(result.data[0].b64_json).size == (256, 128)


@pytest.mark.parametrize(
    ("field", "attach"),
    [("image", "@"), ("image[]", "@"), ("image", "<")],  # `<`: the file's bytes as a field, with no filename
)
def test_curl_multipart(server, tmp_path, field, attach):
    (tmp_path / "fox.png").write_bytes(png())
    done = subprocess.run(
        ["curl", "-sS", "--fail-with-body", f"{server.url}/v1/images/edits",
         "-F", f"model={MODEL}", "-F", "prompt=x", "-F", "n=1", "-F", "size=64x64", "-F", "stream=false",
         "-F", f"{field}={attach}{tmp_path / 'fox.png'}"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert decode(json.loads(done.stdout)["data"][0]["b64_json"]).size == (64, 64)


def test_json_edit_with_a_data_url(server):
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    r = httpx.post(
        f"{server.url}/v1/images/edits",
        json={"model": MODEL, "prompt": "x", "size": "64x64", "images": [{"image_url": url}]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]["b64_json"]).size == (64, 64)


def test_edit_errors_are_openai_errors(sdk):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.edit(model=MODEL, image=("notes.png", b"not an image at all"), prompt="x")
    assert err.value.body["param"] == "image" and err.value.body["code"] == "invalid_image_format"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.edit(model=MODEL, image=("a.png", png()), prompt="x", extra_body={"type": "background_removal"})
    assert err.value.body["code"] == "unsupported"


def test_oversized_body_is_refused_before_it_is_read(server):
    # The default limit is 801 MB; announce far more and send almost nothing: the answer must not wait for it.
    import socket

    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000000000\r\n\r\n--b\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    answer = answer.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"code":"payload_too_large"' in answer


SEGMENTER = textwrap.dedent(
    """
    import sys
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor
    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2], decoder_hidden_size=16,
        num_labels=2, id2label={0: "background", 1: "object"}, label2id={"background": 0, "object": 1})
    SegformerForSemanticSegmentation(cfg).save_pretrained(sys.argv[1])
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(sys.argv[1])
    """
)


def test_background_removal_with_a_segmentation_model(tmp_path):
    seg = tmp_path / "segmenter"
    subprocess.run([sys.executable, "-c", SEGMENTER, str(seg)], check=True, capture_output=True, timeout=120)
    config = tmp_path / "imagegate.toml"
    config.write_text(
        f"""
[[models]]
name = "cutter"
path = "{tmp_path / "models" / "cutter"}"
demo = true
default_size = "64x64"
size_multiple = 16
default_steps = 2
preview = "vae"
preview_downscale = 1
segmentation_model = "{seg}"
background_labels = ["background"]
"""
    )
    srv = Server(tmp_path, "--config", str(config))
    try:
        srv.wait_ready()
        sdk = srv.sdk()
        result = sdk.images.edit(
            model="cutter",
            image=("fox.png", png(size=(80, 48))),
            prompt="",
            output_format="png",
            extra_body={"type": "background_removal"},
        )
        image = decode(result.data[0].b64_json)
        assert image.mode == "RGBA" and image.size == (80, 48)
        assert result.background == "transparent"
        alpha = np.asarray(image.getchannel("A"))
        assert set(np.unique(alpha)) <= {0, 255}
        with pytest.raises(openai.BadRequestError) as err:
            sdk.images.edit(
                model="cutter",
                image=("f.png", png()),
                prompt="",
                output_format="jpeg",
                extra_body={"type": "background_removal"},
            )
        assert err.value.body["param"] == "output_format"
    finally:
        srv.stop()
