"""Aspect ratio tables: the sizes behind ``/infer_api/v1/aspect_ratios`` and ``/output_image_dimensions/{ratio}``.

The reference is the 1-megapixel table of Replicate's flux fine-tuner, the one Astria's API takes as well. A model
whose native resolution is not 1024x1024 gets the same table scaled to its side, on its size grid and within its side
limits, so every answer is a size that model accepts.

Attributes:
    RATIOS_1MP: Ratio ("W:H") -> (width, height) at about one megapixel, in the reference's order.
    FAMILY_SIDES: Model family (as workers report it) -> its native side in pixels.
"""

from __future__ import annotations

import math
import re

RATIOS_1MP: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}

_REFERENCE_SIDE = 1024

# Workers report "sd" for SD 1.x and SD 2.x alike; 512 is the side both base models train at (only SD 2's v-model is
# 768, and such a model's default_size cannot override its family here, so configure its limits instead). The
# short names ("qwen", "lumina", ...) are the spellings people use; the long ones are what app.worker.families says.
FAMILY_SIDES: dict[str, int] = {
    "sd": 512,
    **dict.fromkeys(
        (
            "sdxl",
            "sd3",
            "flux",
            "flux2",
            "chroma",
            "qwen",
            "qwen_image",
            "sana",
            "pixart",
            "wan",
            "kandinsky",
            "cogview",
            "hidream",
            "lumina",
            "lumina2",
            "auraflow",
            "z_image",
            "hunyuandit",
        ),
        1024,
    ),
}

_RATIO = re.compile(r"\s*(\d+)\s*[:xX×_/-]\s*(\d+)\s*")
_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")


def _nearest(value: float, multiple: int) -> int:
    # Half rounds up, not to even: Python's round() would send 8.5 grid steps one way and 9.5 the other.
    return math.floor(value / multiple + 0.5) * multiple


def dimensions(base_side: int, multiple: int, min_side: int, max_side: int) -> dict[str, tuple[int, int]]:
    """The ratio table for a model whose native resolution is ``base_side`` x ``base_side``.

    Each size of :data:`RATIOS_1MP` is scaled by ``base_side / 1024`` and each side rounded to the nearest multiple of
    ``multiple``. A size that then breaks the side limits is first rescaled as a whole (its long side down to
    ``max_side``, or its short side up to ``min_side``) so the ratio survives, and only then is each side clamped onto
    the grid within the limits: down to a multiple at most ``max_side``, up to one at least ``min_side``. The last step
    bends the ratio only where no size keeps it (21:9 with limits 512-768, say).

    Args:
        base_side: The model's native side in pixels (see :func:`base_side`).
        multiple: Width and height must be multiples of this (the model's ``size_multiple``).
        min_side: The smallest width or height the model accepts.
        max_side: The largest width or height the model accepts.

    Returns:
        Ratio -> (width, height), in the order of :data:`RATIOS_1MP`.

    Raises:
        ValueError: ``base_side`` or ``multiple`` is not positive, or no multiple of ``multiple`` lies within
            ``[min_side, max_side]``.
    """
    if base_side <= 0 or multiple <= 0:
        raise ValueError(f"base_side ({base_side}) and multiple ({multiple}) must be positive")
    low, high = math.ceil(min_side / multiple) * multiple, (max_side // multiple) * multiple
    low = max(low, multiple)  # a side of 0 is no size, whatever min_side says
    if low > high:
        raise ValueError(f"no multiple of {multiple} lies within {min_side}-{max_side}")
    scale = base_side / _REFERENCE_SIDE
    table: dict[str, tuple[int, int]] = {}
    for ratio, (ref_w, ref_h) in RATIOS_1MP.items():
        w, h = _nearest(ref_w * scale, multiple), _nearest(ref_h * scale, multiple)
        if max(w, h) > high:
            fit = high / max(ref_w, ref_h)
            w, h = _nearest(ref_w * fit, multiple), _nearest(ref_h * fit, multiple)
        elif min(w, h) < low:
            fit = low / min(ref_w, ref_h)
            w, h = _nearest(ref_w * fit, multiple), _nearest(ref_h * fit, multiple)
        table[ratio] = (min(max(w, low), high), min(max(h, low), high))
    return table


def normalize(ratio: str) -> str:
    """The canonical "W:H" spelling of a ratio given as "16:9", "16x9", "16-9", "16_9", "16/9" or " 16 : 9 ".

    Args:
        ratio: The ratio as a client wrote it (a path parameter, say).

    Returns:
        "W:H" without leading zeros, or ``ratio`` stripped when it is not two numbers with a separator.
    """
    match = _RATIO.fullmatch(ratio)
    if match is None:
        return ratio.strip()
    return f"{int(match[1])}:{int(match[2])}"


def base_side(family: str | None, default_size: str) -> int:
    """The native side of a model: from its family when known, else from its configured default size.

    Args:
        family: The family its workers report ("sd", "sdxl", "flux", ...), or None where none was reported.
        default_size: The model's ``default_size``, "WxH".

    Returns:
        :data:`FAMILY_SIDES`'s side for a known family, else ``round(sqrt(W * H))``: the side of the square with the
        default size's pixel count.

    Raises:
        ValueError: The family is unknown and ``default_size`` is not "WxH" with positive sides.
    """
    if family is not None:
        side = FAMILY_SIDES.get(family.strip().lower())
        if side is not None:
            return side
    match = _SIZE.fullmatch(default_size)
    if match is None or not int(match[1]) or not int(match[2]):
        raise ValueError(f"default_size {default_size!r} is not WxH")
    return round(math.sqrt(int(match[1]) * int(match[2])))
