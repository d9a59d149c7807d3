"""LoRA training on a worker's device: a resumable, cancellable loop (its presets: :func:`app.worker.protocol.plan`).

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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image as PILImage
from safetensors.torch import save, save_file

from app.worker.protocol import TrainingPlan

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""The UNet's attention projections: what diffusers' LoRA training example adapts."""


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
        plan: TrainingPlan,
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
        self.step = 0

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
            "plan": msgspec.structs.asdict(self.plan),
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
        if state.get("plan") != msgspec.structs.asdict(self.plan):
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

    def resume(self) -> int:
        """Load the last checkpoint, if any; returns the steps already done (where :meth:`advance` goes on)."""
        self.step = self._resume()
        return self.step

    @property
    def done(self) -> bool:
        return self.step >= self.plan.steps

    def advance(
        self,
        *,
        until: float = math.inf,
        on_step: Callable[[int, int, float], None] = lambda step, total, loss: None,
        should_stop: Callable[[], bool] = lambda: False,
        on_checkpoint: Callable[[int, Path], None] = lambda step, path: None,
    ) -> None:
        """Run steps until the plan's last one or the monotonic time ``until``, whichever comes first.

        ``on_step(step, total, loss)`` follows each step and ``on_checkpoint(step, path)`` each checkpoint;
        ``should_stop()`` is asked before each step, and stops the training with :class:`TrainingCancelled` (the
        last checkpoint stays as it was).
        """
        total = self.plan.steps
        while self.step < total:
            step = self.step + 1
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
            self.step = step
            on_step(step, total, value)
            if step % self.plan.checkpoint_every == 0 and step < total:
                self._save_checkpoint(step)
                on_checkpoint(step, self._checkpoint_path())
            if time.monotonic() >= until:
                return

    def weights(self) -> dict[str, torch.Tensor]:
        """The adapter's weights, named as diffusers loads them (``unet.…lora_A.weight``)."""
        return {f"unet.{k}": v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self.unet).items()}

    def run(
        self,
        on_step: Callable[[int, int, float], None] = lambda step, total, loss: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> dict[str, torch.Tensor]:
        """Train from the last checkpoint (if any) to the plan's last step; returns the adapter's weights."""
        self.resume()
        self.advance(on_step=on_step, should_stop=should_stop)
        return self.weights()

    @torch.no_grad()
    def preview(self, prompt: str, seed: int, steps: int = 20) -> PILImage.Image:
        """An image of ``prompt`` drawn with the adapter as trained so far (the served model is left as it was)."""
        served = self.pipe.unet
        self.unet.eval()
        try:
            self.pipe.unet = self.unet
            side = self.plan.resolution
            return self.pipe(
                prompt,
                height=side,
                width=side,
                num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil",
            ).images[0]
        finally:
            self.pipe.unet = served
            self.unet.train()


def adapter_bytes(weights: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The adapter as a safetensors file."""
    return save(weights, metadata=metadata)


def save_adapter(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the adapter whole: a temporary file, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(weights, tmp, metadata=metadata)
    os.replace(tmp, path)
