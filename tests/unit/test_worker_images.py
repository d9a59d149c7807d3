"""app.worker.images: decoding inputs upright, reading masks, outpainting canvases, cut-outs (Pillow only)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image

from app.worker.images import cut_out, load, outpaint_canvas, redraw_mask, resized, rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pixels(im: Image.Image) -> list:
    return [im.getpixel((x, y)) for y in range(im.height) for x in range(im.width)]


def close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def test_no_torch():
    code = "import sys, app.worker.images; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- load -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_load_turns_the_image_upright(fmt):
    stored = Image.new("RGB", (96, 48), BLUE)
    stored.paste(RED, (0, 0, 48, 48))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show it rotated 90 degrees clockwise
    image = load(encode(stored, fmt, exif=exif))
    assert image.size == (48, 96)
    # Turned clockwise, the left edge becomes the top edge: red on top, blue below.
    assert close(image.convert("RGB").getpixel((24, 12)), RED)
    assert close(image.convert("RGB").getpixel((24, 84)), BLUE)
    assert image.getexif().get(0x0112) in (None, 1)


def test_load_without_orientation_keeps_the_image():
    stored = Image.new("RGB", (30, 20), BLUE)
    stored.paste(RED, (0, 0, 15, 20))
    image = load(encode(stored, "PNG"))
    assert image.size == (30, 20) and image.getpixel((2, 10)) == RED and image.getpixel((28, 10)) == BLUE


@pytest.mark.parametrize(("orientation", "size"), [(1, (40, 20)), (3, (40, 20)), (5, (20, 40)), (8, (20, 40))])
def test_load_orientations(orientation, size):
    exif = Image.Exif()
    exif[0x0112] = orientation
    assert load(encode(Image.new("RGB", (40, 20), RED), "PNG", exif=exif)).size == size


# -- masks ------------------------------------------------------------------------------------------------------


def test_redraw_mask_from_alpha():
    mask = Image.new("RGBA", (4, 1))
    for x, alpha in enumerate((0, 1, 128, 255)):
        mask.putpixel((x, 0), (255, 255, 255, alpha))  # the colour does not matter, only the alpha
    out = redraw_mask(mask)
    assert out.mode == "L" and pixels(out) == [255, 0, 0, 0]
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (0, 255))
    assert pixels(redraw_mask(la)) == [255, 0]


def test_redraw_mask_without_alpha_is_white_for_redraw():
    grey = Image.new("L", (4, 1))
    for x, v in enumerate((0, 127, 128, 255)):
        grey.putpixel((x, 0), v)
    assert pixels(redraw_mask(grey)) == [0, 0, 255, 255]
    colour = Image.new("RGB", (2, 1), (0, 0, 0))
    colour.putpixel((1, 0), WHITE)
    out = redraw_mask(colour)
    assert out.mode == "L" and pixels(out) == [0, 255]


def test_redraw_mask_from_a_palette_png_with_transparency():
    mask = Image.new("P", (4, 1), 1)
    mask.putpalette([0, 0, 0, 200, 200, 200])  # 0: transparent black, 1: opaque light grey
    mask.paste(0, (0, 0, 2, 1))
    loaded = load(encode(mask, "PNG", transparency=0))
    assert pixels(redraw_mask(loaded)) == [255, 255, 0, 0]


# -- outpainting ------------------------------------------------------------------------------------------------


def test_outpaint_canvas_centres_the_image():
    canvas, redraw = outpaint_canvas(Image.new("RGB", (32, 16), RED), 64, 64)
    assert canvas.mode == "RGB" and canvas.size == (64, 64)
    assert redraw.mode == "L" and redraw.size == (64, 64)
    left, top = 16, 24
    assert Image.eval(redraw, lambda v: 255 - v).getbbox() == (left, top, left + 32, top + 16)  # 0 exactly inside
    assert pixels(redraw).count(0) == 32 * 16 and pixels(redraw).count(255) == 64 * 64 - 32 * 16
    assert canvas.crop((left, top, left + 32, top + 16)).getcolors() == [(32 * 16, RED)]
    assert canvas.getpixel((0, 0)) == RED  # the new area starts from the stretched edges, not a flat fill


def test_outpaint_canvas_scales_an_oversized_image_down_keeping_its_aspect():
    image = Image.new("RGB", (200, 100), BLUE)
    image.paste(RED, (0, 0, 100, 100))
    canvas, redraw = outpaint_canvas(image, 64, 96)
    assert canvas.size == (64, 96)
    inner = Image.eval(redraw, lambda v: 255 - v).getbbox()
    assert inner == (0, 32, 64, 64)  # 200x100 -> 64x32, centred vertically
    assert close(canvas.getpixel((10, 48)), RED) and close(canvas.getpixel((54, 48)), BLUE)


def test_outpaint_canvas_with_a_mask_redraws_its_transparent_area_too():
    image = Image.new("RGB", (32, 32), RED)
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half transparent: redraw it
    _, redraw = outpaint_canvas(image, 64, 32, mask)
    assert redraw.getpixel((5, 10)) == 255  # outside the image
    assert redraw.getpixel((16 + 4, 10)) == 255  # inside, masked
    assert redraw.getpixel((16 + 28, 10)) == 0  # inside, kept
    assert redraw.getpixel((60, 10)) == 255
    assert pixels(redraw).count(0) == 16 * 32


def test_outpaint_canvas_resizes_the_mask_with_the_image():
    image = Image.new("RGB", (128, 128), RED)
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (64, 0, 128, 128))  # right half transparent
    canvas, redraw = outpaint_canvas(image, 96, 64, mask)
    # 128x128 -> 64x64 at (16, 0): its left half kept, everything else redrawn.
    assert Image.eval(redraw, lambda v: 255 - v).getbbox() == (16, 0, 48, 64)
    assert canvas.size == (96, 64)


# -- cut-outs and rgb -------------------------------------------------------------------------------------------


def test_cut_out_takes_its_alpha_from_the_foreground():
    image = Image.new("RGB", (8, 4), RED)
    foreground = Image.new("L", (8, 4), 0)
    foreground.paste(255, (0, 0, 4, 4))
    out = cut_out(image, foreground)
    assert out.mode == "RGBA" and out.size == (8, 4)
    assert out.getpixel((1, 1)) == (*RED, 255) and out.getpixel((6, 1)) == (*RED, 0)
    assert pixels(out.getchannel("A")) == pixels(foreground)


def test_cut_out_resizes_a_smaller_foreground():
    foreground = Image.new("L", (4, 2), 0)
    foreground.paste(255, (0, 0, 2, 2))
    out = cut_out(Image.new("RGB", (40, 20), BLUE), foreground)
    assert out.size == (40, 20)
    assert out.getpixel((2, 10))[3] == 255 and out.getpixel((38, 10))[3] == 0


def test_rgb_turns_transparent_pixels_white():
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (*RED, 255))
    out = rgb(image)
    assert out.mode == "RGB" and pixels(out) == [WHITE, RED]
    assert pixels(rgb(Image.new("LA", (1, 1), (0, 0)))) == [WHITE]
    same = Image.new("RGB", (1, 1), BLUE)
    assert rgb(same) is same
    assert pixels(rgb(Image.new("L", (1, 1), 128))) == [(128, 128, 128)]


def test_rgb_turns_transparent_palette_pixels_white():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, *RED])
    image.putpixel((1, 0), 1)
    assert pixels(rgb(load(encode(image, "PNG", transparency=0)))) == [WHITE, RED]


def test_resized_keeps_an_image_of_the_right_size():
    image = Image.new("RGB", (8, 8))
    assert resized(image, 8, 8) is image
    assert resized(image, 16, 4).size == (16, 4)
