"""The NSFW safety checker, run by the worker after the pipeline rather than inside it, and what it does to an image.

diffusers' Stable Diffusion pipelines carry ``StableDiffusionSafetyChecker`` (CLIP image embeddings against concept
embeddings) and black out what it flags inside every call. imagegate takes it out of the pipeline and runs it only
when a request asks (``moderation`` other than ``low`` on ``/v1``; ``safety_checker`` in the ModelsLab dialect), on the
model's own checker or one configured for a model that ships none (``ModelConfig.safety_checker``). A flagged image
is blacked out, blurred, pixelated, or replaced by a notice, as asked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFilter

log = logging.getLogger("imagegate.worker")

TREATMENTS = ("black", "blur", "pixelate", "sensitive_content_text")


class SafetyChecker:
    """A loaded checker and its feature extractor."""

    def __init__(self, checker: Any, extractor: Any) -> None:
        self.checker = checker
        self.extractor = extractor

    @classmethod
    def take_from(cls, pipe: Any) -> SafetyChecker | None:
        """The pipeline's own checker, taken out of it so that its calls no longer apply it; None if it has none."""
        checker, extractor = getattr(pipe, "safety_checker", None), getattr(pipe, "feature_extractor", None)
        if checker is None or extractor is None:
            return None
        pipe.register_modules(safety_checker=None)
        return cls(checker, extractor)

    @classmethod
    def load(cls, path: str, device: str, dtype: torch.dtype) -> SafetyChecker:
        """A checker saved at ``path`` (``save_pretrained`` of the checker and of its CLIP image processor)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        source = Path(path).expanduser()
        checker = StableDiffusionSafetyChecker.from_pretrained(source, torch_dtype=dtype).to(device)
        return cls(checker, CLIPImageProcessor.from_pretrained(source))

    @torch.no_grad()
    def flags(self, pictures: list[PILImage.Image]) -> list[bool]:
        """Whether each picture shows what the checker flags."""
        parameter = next(self.checker.parameters())
        clip_input = self.extractor(pictures, return_tensors="pt").pixel_values.to(parameter.device, parameter.dtype)
        arrays = np.stack([np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0 for p in pictures])
        _, flagged = self.checker(images=arrays, clip_input=clip_input)
        return [bool(f) for f in flagged]


def treat(picture: PILImage.Image, how: str) -> PILImage.Image:
    """A flagged picture, made safe: ``black``, ``blur``, ``pixelate`` or ``sensitive_content_text`` (a notice)."""
    w, h = picture.size
    if how == "blur":
        return picture.filter(ImageFilter.GaussianBlur(radius=max(w, h) / 12))
    if how == "pixelate":
        small = picture.resize((max(1, w // 32), max(1, h // 32)), PILImage.Resampling.BILINEAR)
        return small.resize((w, h), PILImage.Resampling.NEAREST)
    if how == "sensitive_content_text":
        notice = PILImage.new("RGB", (w, h), (40, 40, 40))
        ImageDraw.Draw(notice).text((max(2, w // 16), h // 2 - 6), "Sensitive content", fill=(235, 235, 235))
        return notice
    return PILImage.new("RGB", (w, h), (0, 0, 0))
