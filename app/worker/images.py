"""Preparing edit inputs for diffusers pipelines (Pillow only, no torch).

Masks follow OpenAI: where the mask is fully transparent (alpha 0), the image is redrawn. A mask without an alpha
channel is read as diffusers reads masks (white: redraw). Every input honours its EXIF orientation.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps


class InvalidInput(ValueError):
    """A job's own input is unusable: the job fails as an invalid request (every other error is the server's)."""


def load(data: bytes) -> Image.Image:
    """Decode an input image, turned upright by its EXIF orientation.

    Raises:
        InvalidInput: the bytes do not decode.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"an input image could not be decoded: {e}") from None
    return ImageOps.exif_transpose(image) or image


def rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if "transparency" in image.info:  # palette or single-colour transparency, without an alpha band
        image = image.convert("RGBA")
    if "A" in image.getbands():  # transparent pixels become white, not black
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return canvas
    return image.convert("RGB")


def redraw_mask(mask: Image.Image) -> Image.Image:
    """An ``L`` mask for diffusers (255: redraw) from an OpenAI mask (alpha 0: redraw) or a greyscale one."""
    if "transparency" in mask.info:  # palette or single-colour transparency, without an alpha band
        mask = mask.convert("RGBA")
    if "A" in mask.getbands():
        return mask.getchannel("A").point(lambda a: 255 if a == 0 else 0)
    return mask.convert("L").point(lambda v: 255 if v >= 128 else 0)


def resized(image: Image.Image, width: int, height: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), resample)


def outpaint_canvas(
    image: Image.Image, width: int, height: int, mask: Image.Image | None = None
) -> tuple[Image.Image, Image.Image]:
    """Centre ``image`` (scaled down if it does not fit) on a ``width`` x ``height`` canvas.

    Returns the canvas and its redraw mask: everything outside the image, plus the masked area within it. The new
    area starts as the image's stretched edges, a better starting point for the model than a flat colour.
    """
    scale = min(1.0, width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    image = resized(rgb(image), w, h)
    left, top = (width - w) // 2, (height - h) // 2
    canvas = image.resize((width, height), Image.Resampling.BILINEAR)
    canvas.paste(image, (left, top))
    redraw = Image.new("L", (width, height), 255)
    inner = Image.new("L", (w, h), 0) if mask is None else resized(redraw_mask(mask), w, h, Image.Resampling.NEAREST)
    redraw.paste(inner, (left, top))
    return canvas, redraw


def cut_out(image: Image.Image, foreground: Image.Image) -> Image.Image:
    """``image`` with alpha 0 wherever ``foreground`` (``L``, 255: keep) is dark."""
    out = rgb(image).convert("RGBA")
    out.putalpha(resized(foreground.convert("L"), out.width, out.height, Image.Resampling.BILINEAR))
    return out
