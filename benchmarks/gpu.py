"""GPU throughput: raw diffusers vs the same requests through imagegate, with and without dynamic batching.

For each architecture (``sd15`` at 512x512, ``sdxl`` at 1024x1024), a full-size pipeline is built from the public
configs written inline below (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0) with random
weights (speed does not depend on the weights; nothing is downloaded), saved with ``save_pretrained`` to a temporary
directory, and measured in one run:

(a) raw diffusers: ``pipe(...)`` one image at a time in this process, plus the PNG encode the gateway also does;
    images/s, and the denoising step time (CUDA-synchronised step callbacks, in a separate call);
(b) the same requests through a real ``imagegate serve`` with the pipeline as a configured model on the device and
    batching off (``max_batch_pixels = 0``), one at a time -> ratio to (a) (target >= 0.97);
(c) ``--concurrency`` (8) clients at once through imagegate, batching off and batching on
    (``max_batch_pixels`` = concurrency x width x height) -> ratio to (a) (target >= 1.5 with batching), and the batch
    sizes the gateway's ``/metrics`` reports (``imagegate_batch_size``).

Raw and gateway blocks alternate round by round (``--rounds``), so drift hits both alike. Each server phase is a
fresh ``imagegate serve`` on a free port, stopped at the end; everything is written under a temporary directory.
The raw pipeline stays loaded in this process while the gateway's worker holds its own copy on the same device
(SDXL in fp16: about 7 GB each, plus the activations of a batch of 8 at 1024x1024); on a small card lower
``--max-batch-pixels``. The step time through imagegate comes from ``imagegate_denoising_step_seconds``.

Usage (any CUDA host; nothing is fetched)::

    python benchmarks/gpu.py [--device cuda:0] [--models sd15,sdxl] [--steps 25] [--rounds 3] [--dtype fp16|bf16]
    python benchmarks/gpu.py --smoke   # the whole flow on CPU with tiny configs, 2 steps, small sizes

Writes ``benchmarks/results/gpu.json`` and ``gpu.png`` (``gpu_smoke.*`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, concurrent_block, histogram_delta, scrape, start_server, stop
from plot import bar_chart

sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SIZES = {"sd15": 512, "sdxl": 1024}
SMOKE_SIZE = 128
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
PROMPT = "a red fox in the snow, photograph"
GUIDANCE = 7.5
CLIP_VOCAB = 49408  # the real CLIP vocabulary size: the embedding table has its real size, whatever the tokenizer


# --- pipelines from their public configs ---------------------------------------------------------------------------


def clip_text_config(tok, *, hidden: int, layers: int, heads: int, ffn: int, act: str, projection: int, tiny: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok) if tiny else CLIP_VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=projection,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


# CLIP ViT-L/14's text tower: SD 1.x's text encoder and SDXL's first one.
VIT_L = {"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072, "act": "quick_gelu", "projection": 768}
# OpenCLIP ViT-bigG/14's text tower: SDXL's second text encoder (with projection).
VIT_BIGG = {"hidden": 1280, "layers": 32, "heads": 20, "ffn": 5120, "act": "gelu", "projection": 1280}
TINY_TEXT = {"hidden": 32, "layers": 2, "heads": 4, "ffn": 37, "act": "quick_gelu", "projection": 32}


def sd_vae(tiny: bool, **extra: Any):
    from diffusers import AutoencoderKL

    if tiny:  # 4 blocks: latents 8x smaller than the image, as in the real one
        return AutoencoderKL(
            block_out_channels=[8, 16, 32, 32],
            norm_num_groups=8,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            **extra,
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="silu",
        **extra,
    )


def build_sd15(tiny: bool):
    """runwayml/stable-diffusion-v1-5: UNet 860M, CLIP ViT-L/14 text encoder 123M, VAE 84M, PNDM."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from app.worker.pipelines import clip_tokenizer

    tok = clip_tokenizer()
    if tiny:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
            act_fn="silu",
            norm_num_groups=32,
            norm_eps=1e-5,
            flip_sin_to_cos=True,
            freq_shift=0,
            downsample_padding=1,
            mid_block_scale_factor=1,
            center_input_sample=False,
        )
    text_encoder = CLIPTextModel(clip_text_config(tok, **(TINY_TEXT if tiny else VIT_L), tiny=tiny))
    vae = sd_vae(tiny, sample_size=512, scaling_factor=0.18215)
    with torch.device("cpu"):  # scheduler tensors stay on the CPU, whatever device the modules are built on
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
        )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_sdxl(tiny: bool):
    """stabilityai/stable-diffusion-xl-base-1.0: UNet 2.6B, text encoders ViT-L 123M + bigG 695M, VAE 84M, Euler."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from app.worker.pipelines import clip_tokenizer

    tok = clip_tokenizer()
    text1, text2 = (TINY_TEXT, TINY_TEXT) if tiny else (VIT_L, VIT_BIGG)
    time_dim = 8 if tiny else 256
    common = {
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        # 6 micro-conditioning numbers (original size, crop, target size) x time_dim + the pooled text embedding
        "projection_class_embeddings_input_dim": 6 * time_dim + text2["projection"],
        "cross_attention_dim": text1["hidden"] + text2["hidden"],
    }
    if tiny:
        unet = UNet2DConditionModel(
            **common,
            block_out_channels=(32, 64),
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            norm_num_groups=1,
        )
    else:
        unet = UNet2DConditionModel(
            **common,
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            addition_embed_type_num_heads=64,
            act_fn="silu",
            norm_num_groups=32,
            norm_eps=1e-5,
            flip_sin_to_cos=True,
            freq_shift=0,
            downsample_padding=1,
            center_input_sample=False,
        )
    text_encoder = CLIPTextModel(clip_text_config(tok, **text1, tiny=tiny))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tok, **text2, tiny=tiny))
    vae = sd_vae(tiny, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    with torch.device("cpu"):
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            interpolation_type="linear",
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
            use_karras_sigmas=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl}


def params_m(pipe) -> dict[str, float]:
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            out[name] = round(sum(p.numel() for p in module.parameters()) / 1e6, 2)
    return out


def build_and_save(kind: str, path: Path, tiny: bool, device: str, dtype) -> dict:
    """Build with random weights (on the device when it is a GPU: much faster), save in ``dtype``; returns facts."""
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device if device.startswith("cuda") else "cpu"):
        pipe = BUILDERS[kind](tiny)
    pipe.to(dtype=dtype)
    built = time.perf_counter() - t0
    info = {"params_m": params_m(pipe), "build_seconds": round(built, 2)}
    pipe.save_pretrained(path)
    info["save_seconds"] = round(time.perf_counter() - t0 - built, 2)
    info["disk_mb"] = round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)
    del pipe
    free_memory(device)
    return info


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- measurements --------------------------------------------------------------------------------------------------


class Raw:
    """The pipeline in this process, called as the worker calls it (CPU generators, PIL out), plus the PNG encode."""

    def __init__(self, path: Path, device: str, dtype, size: int, steps: int) -> None:
        import torch
        from diffusers import DiffusionPipeline

        from app.worker.pipelines import quiet_libraries

        quiet_libraries()
        t0 = time.perf_counter()
        self.pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - t0
        self.device, self.size, self.steps = device, size, steps
        self.cuda = device.startswith("cuda")
        self.torch = torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def __call__(self, seed: int, callback=None) -> tuple[float, float]:
        """One image; returns (seconds in all, of which the PNG encode)."""
        from app.worker.previews import encode_image

        kwargs: dict[str, Any] = {}
        if callback is not None:
            kwargs = {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}
        t = time.perf_counter()
        image = self.pipe(
            PROMPT,
            height=self.size,
            width=self.size,
            num_inference_steps=self.steps,
            guidance_scale=GUIDANCE,
            generator=[self.torch.Generator("cpu").manual_seed(seed)],
            output_type="pil",
            **kwargs,
        ).images[0]
        t_enc = time.perf_counter()
        encode_image(image, "png", None)
        done = time.perf_counter()
        return done - t, done - t_enc

    def block(self, images: int, seed: int) -> dict:
        t = time.perf_counter()
        encode = sum(self(seed + i)[1] for i in range(images))
        wall = time.perf_counter() - t
        return {"images": images, "seconds": wall, "encode_seconds": encode}

    def step_seconds(self) -> float:
        """Median time of one denoising step (steps 2..n: the first also carries the prompt encoding)."""
        marks: list[float] = []

        def on_step(pipe, i, t, kw):
            self.sync()
            marks.append(time.perf_counter())
            return kw

        self.sync()
        self(0, on_step)
        return statistics.median(b - a for a, b in itertools.pairwise(marks)) if len(marks) > 1 else float("nan")


def gateway_block(client: httpx.Client, body: dict, images: int, seed: int) -> dict:
    t = time.perf_counter()
    for i in range(images):
        r = client.post("/v1/images/generations", json={**body, "seed": seed + i})
        r.raise_for_status()
    return {"images": images, "seconds": time.perf_counter() - t}


def rate(blocks: list[dict]) -> float:
    return statistics.median(b["images"] / b["seconds"] for b in blocks)


def summary(blocks: list[dict]) -> dict:
    return {
        "images_per_s": round(rate(blocks), 4),
        "images_per_s_per_round": [round(b["images"] / b["seconds"], 4) for b in blocks],
        **(
            {"latency_median_s": round(statistics.median(b["latency_median_s"] for b in blocks), 4)}
            if "latency_median_s" in blocks[0]
            else {}
        ),
    }


def model_config(name: str, path: Path, device: str, dtype: str, size: int, steps: int, batch_pixels: int) -> dict:
    return {
        "name": name,
        "path": str(path),
        "devices": [device],
        "dtype": dtype,
        "default_size": f"{size}x{size}",
        "min_side": 64,
        "max_side": max(1024, size),
        "size_multiple": 8,
        "default_steps": steps,
        "max_steps": max(100, steps),
        "default_guidance": GUIDANCE,
        # The pipeline's own scheduler is used; these only have to load (lms would need scipy on the host).
        "schedulers": ["ddim", "euler"],
        "max_batch_pixels": batch_pixels,
    }


def run_model(kind: str, args, work: Path, dtype_name: str) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    size = args.size or (SMOKE_SIZE if args.smoke else SIZES[kind])
    path = work / "models" / kind
    out: dict[str, Any] = {"size": f"{size}x{size}", "steps": args.steps}
    print(f"[{kind}] building {'tiny' if args.smoke else 'full-size'} pipeline ...", flush=True)
    out["pipeline"] = build_and_save(kind, path, args.smoke, args.device, dtype)
    print(f"[{kind}] {out['pipeline']}", flush=True)

    raw = Raw(path, args.device, dtype, size, args.steps)
    out["pipeline"]["raw_load_seconds"] = round(raw.load_seconds, 2)
    for i in range(args.warmup):
        raw(10_000 + i)
    out["raw_step_seconds"] = round(raw.step_seconds(), 5)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)

    body = {"model": kind, "prompt": PROMPT, "size": f"{size}x{size}", "num_inference_steps": args.steps}
    body["guidance_scale"] = GUIDANCE
    batch_pixels = args.max_batch_pixels or args.concurrency * size * size
    blocks: dict[str, list[dict]] = {}
    metrics: dict[str, Any] = {}
    for batching in (False, True):
        phase = "batching" if batching else "no_batching"
        settings = {"models": [model_config(kind, path, args.device, dtype_name, size, args.steps, 0)]}
        if batching:
            settings["models"][0]["max_batch_pixels"] = batch_pixels
        if args.batch_window_ms is not None:
            settings["batch_window_ms"] = args.batch_window_ms
        config = work / f"{kind}-{phase}.json"
        config.write_text(json.dumps(settings, indent=2))
        data_dir = work / f"data-{kind}-{phase}"
        print(f"[{kind}] starting imagegate ({phase}) ...", flush=True)
        proc, url, ready = start_server(data_dir, "--config", str(config), timeout=args.start_timeout)
        out.setdefault("gateway_start_seconds", {})[phase] = round(ready, 2)
        try:
            with httpx.Client(base_url=url, timeout=3600) as client:
                for i in range(args.warmup):  # warm-up: one alone, then one burst (batch shapes, allocator)
                    gateway_block(client, body, 1, 20_000 + i)
                concurrent_block(url, body, args.concurrency, 1, 30_000)
                before = scrape(url)
                for r in range(args.rounds):
                    seed = 1000 * (r + 1)
                    blocks.setdefault(f"raw_sequential_{phase}", []).append(raw.block(args.images, seed))
                    blocks.setdefault(f"gateway_sequential_{phase}", []).append(
                        gateway_block(client, body, args.images, seed)
                    )
                    blocks.setdefault(f"gateway_c{args.concurrency}_{phase}", []).append(
                        concurrent_block(url, body, args.concurrency, args.per_client, seed)
                    )
                    print(f"[{kind}] {phase} round {r + 1}/{args.rounds}: " + _brief(blocks), flush=True)
                after = scrape(url)
            metrics[phase] = {
                "batch_size": histogram_delta(before, after, "imagegate_batch_size", kind),
                "denoising_step_seconds": histogram_delta(before, after, "imagegate_denoising_step_seconds", kind),
                "generation_duration_seconds": histogram_delta(
                    before, after, "imagegate_generation_duration_seconds", kind
                ),
            }
        finally:
            stop(proc)
            shutil.rmtree(data_dir, ignore_errors=True)
    if args.device.startswith("cuda"):
        out["raw_peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2)
    del raw
    free_memory(args.device)

    raw_all = blocks["raw_sequential_no_batching"] + blocks["raw_sequential_batching"]
    raw_rate = rate(raw_all)
    encode = statistics.median(b["encode_seconds"] / b["images"] for b in raw_all)
    out["raw_sequential"] = {
        **summary(raw_all),
        "seconds_per_image": round(1 / raw_rate, 4),
        "png_encode_seconds_per_image": round(encode, 4),
        "step_seconds": out.pop("raw_step_seconds"),
    }
    c = args.concurrency
    out["gateway_sequential_no_batching"] = summary(blocks["gateway_sequential_no_batching"])
    out["gateway_sequential_batching"] = summary(blocks["gateway_sequential_batching"])
    out[f"gateway_c{c}_no_batching"] = summary(blocks[f"gateway_c{c}_no_batching"])
    out[f"gateway_c{c}_batching"] = {**summary(blocks[f"gateway_c{c}_batching"]), "max_batch_pixels": batch_pixels}
    out["gateway_metrics"] = metrics
    # Sequential ratio against the raw blocks of the same server phase (interleaved with it round by round).
    raw_nb = rate(blocks["raw_sequential_no_batching"])
    ratios = {
        "gateway_sequential_over_raw": rate(blocks["gateway_sequential_no_batching"]) / raw_nb,
        "gateway_sequential_batching_on_over_raw": rate(blocks["gateway_sequential_batching"])
        / rate(blocks["raw_sequential_batching"]),
        f"c{c}_no_batching_over_raw_sequential": rate(blocks[f"gateway_c{c}_no_batching"]) / raw_rate,
        f"c{c}_batching_over_raw_sequential": rate(blocks[f"gateway_c{c}_batching"]) / raw_rate,
        f"c{c}_batching_over_c{c}_no_batching": rate(blocks[f"gateway_c{c}_batching"])
        / rate(blocks[f"gateway_c{c}_no_batching"]),
    }
    out["ratios"] = {k: round(v, 4) for k, v in ratios.items()}
    out["targets"] = {
        "gateway_sequential_over_raw >= 0.97": ratios["gateway_sequential_over_raw"] >= 0.97,
        f"c{c}_batching_over_raw_sequential >= 1.5": ratios[f"c{c}_batching_over_raw_sequential"] >= 1.5,
    }
    return out


def _brief(blocks: dict[str, list[dict]]) -> str:
    return ", ".join(f"{k} {b[-1]['images'] / b[-1]['seconds']:.3f} img/s" for k, b in blocks.items())


def device_facts(device: str) -> dict:
    import diffusers
    import torch
    import transformers

    facts = {
        "device": device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        facts.update(
            device_name=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
        )
    else:
        facts["device_name"] = platform.processor() or platform.machine()
    return facts


def chart(path: Path, out: dict, concurrency: int) -> Path:
    bars: dict[str, float] = {}
    for kind, m in out["models"].items():
        if "ratios" not in m:
            continue
        r = m["ratios"]
        bars[f"{kind}\nimagegate\nsequential"] = r["gateway_sequential_over_raw"]
        bars[f"{kind}\nc{concurrency}\nno batching"] = r[f"c{concurrency}_no_batching_over_raw_sequential"]
        bars[f"{kind}\nc{concurrency}\nbatching"] = r[f"c{concurrency}_batching_over_raw_sequential"]
    facts = out["host"]
    title = f"{facts['device_name']} ({out['dtype']}, {out['steps']} steps{', smoke' if out['smoke'] else ''})"
    return bar_chart(path, f"Throughput / raw diffusers sequential\n{title}", bars, "ratio (raw sequential = 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda:0 (cpu with --smoke)")
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw / gateway rounds per server phase")
    parser.add_argument("--images", type=int, default=4, help="images per sequential block")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=2, help="requests each concurrent client sends per round")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 (fp32 on a CPU)")
    parser.add_argument("--size", type=int, default=0, help="override the image side (default: sd15 512, sdxl 1024)")
    parser.add_argument("--max-batch-pixels", type=int, default=0, help="default: concurrency x width x height")
    parser.add_argument("--batch-window-ms", type=float, default=None, help="default: the gateway's")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--smoke", action="store_true", help="tiny configs on CPU, 2 steps, 1 round: checks the flow")
    parser.add_argument("--out", default="", help="result path without suffix (default: results/gpu or gpu_smoke)")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda:0")
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    if args.smoke:
        args.steps, args.rounds, args.images, args.per_client, args.warmup = 2, 1, 2, 1, 1
    dtype_name = DTYPES[args.dtype]
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = set(kinds) - set(BUILDERS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join(BUILDERS)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"{args.device}: CUDA is not available here (use --smoke to check the flow on CPU)")

    out: dict[str, Any] = {
        "smoke": args.smoke,
        "dtype": dtype_name,
        "steps": args.steps,
        "rounds": args.rounds,
        "images_per_sequential_block": args.images,
        "concurrency": args.concurrency,
        "requests_per_client_per_round": args.per_client,
        "guidance_scale": GUIDANCE,
        "weights": "random (full-size public configs)" if not args.smoke else "random (tiny configs)",
        "host": device_facts(args.device),
        "models": {},
    }
    work = Path(tempfile.mkdtemp(prefix="imagegate-gpu-"))
    result = Path(args.out) if args.out else RESULTS / ("gpu_smoke" if args.smoke else "gpu")
    t0 = time.perf_counter()
    try:
        for kind in kinds:
            try:
                out["models"][kind] = run_model(kind, args, work, dtype_name)
            except Exception as e:  # record it and go on with the next architecture
                import traceback

                traceback.print_exc()
                out["models"][kind] = {"error": f"{type(e).__name__}: {e}"}
            finally:
                shutil.rmtree(work / "models" / kind, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    png = chart(result, out, args.concurrency)
    print(json.dumps(out, indent=2))
    print(f"wrote {result.with_suffix('.json')} and {png}")
    if any("error" in m for m in out["models"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
