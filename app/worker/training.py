"""LoRA training on a worker's device: presets, trigger words, and a resumable, cancellable training loop.

The loop is the one of diffusers' ``train_text_to_image_lora`` example for UNet models (SD 1.x/2.x and their
kin): latents and caption embeddings are computed once, then each step noises a latent at a random timestep and
fits the LoRA so the UNet predicts the noise (or the velocity, for v-prediction models). Training works on a copy
of the denoiser, so the model keeps serving unchanged, and every random draw of a step comes from ``seed`` and the
step's number: a run resumed from a checkpoint (LoRA weights, optimizer state, step, written whole or not at all)
ends with the same adapter as a run that never stopped.
"""

from __future__ import annotations

import copy
import math
import os
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image as PILImage
from safetensors.torch import save_file

Preset = Literal["fast", "high_quality"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""The UNet's attention projections: what diffusers' LoRA training example adapts."""


@dataclass(frozen=True)
class Plan:
    """The resolved hyperparameters of one training (returned with the training, so users see what ran)."""

    rank: int
    alpha: int
    steps: int
    learning_rate: float
    resolution: int
    batch_size: int
    checkpoint_every: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, float]] = {
    # rank, steps per training image (bounded below and above), learning rate, resolution as a share of the model's
    "fast": {"rank": 8, "steps_per_image": 40, "min_steps": 200, "max_steps": 800, "learning_rate": 2e-4, "scale": 0.5},
    "high_quality": {
        "rank": 16,
        "steps_per_image": 100,
        "min_steps": 500,
        "max_steps": 3000,
        "learning_rate": 1e-4,
        "scale": 1.0,
    },
}


def plan(preset: Preset, images: int, strength: float, native_side: int, *, max_steps: int | None = None) -> Plan:
    """The hyperparameters of ``preset`` for ``images`` training images at ``strength`` (0-10, 5 is the preset).

    Steps grow with the number of images (``steps_per_image``, within the preset's bounds); ``strength`` scales
    the learning rate and the steps by ``2 ** ((strength - 5) / 5)``, so 0 halves both, 10 doubles both: how far
    the adapter moves towards the training images. ``resolution`` is the model's native side times the preset's
    ``scale``, on a multiple of 64. ``max_steps`` caps the steps (tests, small demos).
    """
    if not 0 <= strength <= 10:
        raise ValueError("strength must be within 0-10")
    p = PRESETS[preset]
    factor = 2 ** ((strength - 5) / 5)
    steps = min(max(p["min_steps"], p["steps_per_image"] * images), p["max_steps"])
    steps = max(1, round(steps * factor))
    if max_steps is not None:
        steps = min(steps, max_steps)
    resolution = max(64, int(native_side * p["scale"]) // 64 * 64)
    rank = int(p["rank"])
    return Plan(
        rank=rank,
        alpha=rank,
        steps=steps,
        learning_rate=p["learning_rate"] * factor,
        resolution=resolution,
        batch_size=1,
        checkpoint_every=max(1, min(100, steps // 4)),
    )


def trigger_word(rng: random.Random | None = None) -> str:
    """A made-up token such as ``FJA90AB``: three letters, two digits, two letters (no word the model knows)."""
    rng = rng or random.Random()
    letters = string.ascii_uppercase
    return "".join(
        [
            *(rng.choice(letters) for _ in range(3)),
            *(rng.choice(string.digits) for _ in range(2)),
            *(rng.choice(letters) for _ in range(2)),
        ]
    )


def caption(trigger: str, text: str | None) -> str:
    """The caption a training image is fitted to: the trigger word, then the image's own caption if any."""
    return f"{trigger}, {text.strip()}" if text and text.strip() else trigger


class TrainingCancelled(Exception):
    """The training was stopped between two optimiser steps; its last checkpoint stands."""


def _to_tensor(image: PILImage.Image, side: int) -> torch.Tensor:
    """Centre-crop to a square, resize to ``side``, scale to [-1, 1], as the example's transforms do."""
    w, h = image.size
    s = min(w, h)
    square = image.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    pixels = np.asarray(square.resize((side, side), PILImage.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


class LoraTrainer:
    """Trains a LoRA for ``pipe``'s UNet on images and captions.

    Args:
        pipe: a loaded UNet pipeline (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``).
        plan: the hyperparameters.
        images: the training images.
        captions: one caption per image (see :func:`caption`).
        seed: every random draw of the training derives from it and the step.
        checkpoint_dir: where checkpoints go (and where a resumed run finds the last one).
    """

    def __init__(
        self,
        pipe: Any,
        plan: Plan,
        images: Sequence[PILImage.Image],
        captions: Sequence[str],
        *,
        seed: int,
        checkpoint_dir: Path,
    ) -> None:
        if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
            raise ValueError("LoRA training supports UNet models with one text encoder (SD 1.x/2.x) for now")
        if len(images) != len(captions) or not images:
            raise ValueError("one caption per training image, and at least one image")
        self.pipe = pipe
        self.plan = plan
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        self.device = pipe.unet.device
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.unet = copy.deepcopy(pipe.unet).train()
        self.unet.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the adapter's initial weights come from the seed too
            torch.manual_seed(seed)
            self.unet.add_adapter(
                LoraConfig(r=plan.rank, lora_alpha=plan.alpha, init_lora_weights="gaussian", target_modules=TARGETS)
            )
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=plan.learning_rate)
        self.latents, self.embeddings = self._encode(images, captions)

    @torch.no_grad()
    def _encode(self, images: Sequence[PILImage.Image], captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        pixels = torch.stack([_to_tensor(i, self.plan.resolution) for i in images]).to(self.device, pipe.vae.dtype)
        generator = torch.Generator().manual_seed(self.seed)
        dist = pipe.vae.encode(pixels).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(self.device, dist.mean.dtype)
        latents = (dist.mean + dist.std * noise) * pipe.vae.config.scaling_factor
        tokens = pipe.tokenizer(
            list(captions),
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return latents, pipe.text_encoder(tokens)[0]

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def _checkpoint_path(self) -> Path:
        return self.checkpoint_dir / "checkpoint.pt"

    def _save_checkpoint(self, step: int) -> None:
        """Write the state after ``step`` steps whole (a temporary file renamed), or leave the last one standing."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "lora": get_peft_model_state_dict(self.unet),
            "optimizer": self.optimizer.state_dict(),
            "plan": self.plan.as_dict(),
        }
        tmp = self.checkpoint_dir / f".checkpoint.{os.getpid()}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self._checkpoint_path())

    def _resume(self) -> int:
        """Load the last checkpoint if there is one of this plan; returns the steps it had done."""
        path = self._checkpoint_path()
        if not path.is_file():
            return 0
        state = torch.load(path, weights_only=True)
        if state.get("plan") != self.plan.as_dict():
            return 0
        set_peft_model_state_dict(self.unet, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    # -- the loop -------------------------------------------------------------------------------------------------

    def _loss(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        count = len(self.latents)
        index = torch.randint(0, count, (self.plan.batch_size,), generator=generator)
        latents, embeddings = self.latents[index], self.embeddings[index]
        noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (self.plan.batch_size,), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        predicted = self.unet(noisy, timesteps, embeddings).sample
        return torch.nn.functional.mse_loss(predicted.float(), target.float())

    def run(
        self,
        on_step: Callable[[int, int, float], None] = lambda step, total, loss: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> dict[str, torch.Tensor]:
        """Train from the last checkpoint (if any) to the plan's last step; returns the adapter's weights.

        The weights are named as diffusers loads them (``unet.…lora_A.weight``). ``on_step(step, total, loss)``
        follows each step; ``should_stop()`` is asked before each, and stops the run with
        :class:`TrainingCancelled` (the last checkpoint stays as it was).
        """
        total = self.plan.steps
        for step in range(self._resume() + 1, total + 1):
            if should_stop():
                raise TrainingCancelled(f"stopped before step {step} of {total}")
            loss = self._loss(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at step {step}: lower the learning rate or strength")
            on_step(step, total, value)
            if step % self.plan.checkpoint_every == 0 and step < total:
                self._save_checkpoint(step)
        return {f"unet.{k}": v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self.unet).items()}


def save_adapter(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the adapter whole: a temporary file, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(weights, tmp, metadata=metadata)
    os.replace(tmp, path)
