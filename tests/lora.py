"""Tiny random LoRA adapters for the demo model's UNet, saved as diffusers would (peft-format safetensors)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


def make_lora(model_dir: Path, out: Path, seed: int, rank: int = 4) -> tuple[Path, str]:
    """A LoRA with random A and B (so it changes the output) for the pipeline at ``model_dir``; (file, sha256)."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )
    pipe.unet.add_adapter(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out.parent, unet_lora_layers=get_peft_model_state_dict(pipe.unet), weight_name=out.name
    )
    return out, hashlib.sha256(out.read_bytes()).hexdigest()
