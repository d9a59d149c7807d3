"""Tiny random LoRA adapters for a pipeline's denoiser, saved in peft format as diffusers' trainers save them."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file


def random_lora(pipe: Any, out: Path, seed: int, rank: int = 4) -> str:
    """A LoRA on the attention projections of ``pipe``'s denoiser, random A and B (so it changes the output).

    Returns the file's SHA-256. The pipeline itself is left as it was (the adapter is made on a copy).
    """
    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    denoiser = copy.deepcopy(getattr(pipe, name))
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
    denoiser.add_adapter(config)
    weights = {f"{name}.{k}": v.contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def make_lora(model_dir: Path, out: Path, seed: int, rank: int = 4) -> tuple[Path, str]:
    """:func:`random_lora` for the pipeline saved at ``model_dir``; (file, sha256)."""
    return out, random_lora(DiffusionPipeline.from_pretrained(model_dir), out, seed, rank)
