"""Loading diffusers pipelines for a worker, and the embedded demo model."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.auto_pipeline import (  # how from_pipe finds a family's edit pipelines
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    _get_task_class,
)

from app.config import ModelConfig
from app.worker.adapters import LoadedAdapters
from app.worker.families import Family, family_of
from app.worker.previews import Previewer
from app.worker.protocol import FLOW_SCHEDULERS, SCHEDULERS, TORCHAO_CONFIGS, parse_size
from app.worker.safety import SafetyChecker

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

log = logging.getLogger("imagegate.worker")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def view(cls: type, pipe: Any, scheduler: Any) -> Any:
    """A pipeline of class ``cls`` on ``pipe``'s components (the same weights) with its own ``scheduler``.

    What ``from_pipe`` does, without its cast of every component to a dtype, which quantized models refuse.
    """
    wanted = init_params(cls)
    config = {k: v for k, v in pipe.config.items() if k in wanted and not k.startswith("_")}
    parts = {k: v for k, v in pipe.components.items() if k in wanted}
    made = cls(**{**config, **parts, "scheduler": scheduler})
    made.set_progress_bar_config(disable=True)
    return made


@functools.cache
def init_params(pipeline_class: type) -> frozenset[str]:
    """The arguments a pipeline class's constructor takes (looked up once: every job builds a view)."""
    return frozenset(inspect.signature(pipeline_class.__init__).parameters)


@functools.cache
def call_params(pipeline_class: type) -> frozenset[str]:
    """The arguments a pipeline class's ``__call__`` takes."""
    return frozenset(inspect.signature(pipeline_class.__call__).parameters)


class ModelLoadError(Exception):
    """A configured model cannot be served; the message says why."""


@dataclass
class LoadedModel:
    config: ModelConfig
    pipe: Any
    previewer: Previewer
    family: Family
    classes: dict[str, type]
    """Task -> its pipeline class (background removal runs none)."""
    accepts: dict[str, frozenset[str]]
    """Task -> the arguments its pipeline's ``__call__`` takes."""
    schedulers: dict[str, Any] = field(default_factory=dict)
    """Scheduler name -> (class, extra config), checked to work with this pipeline."""
    tasks: frozenset[str] = frozenset({"text2img"})
    segmenter: Any = None
    """A transformers image-segmentation pipeline, for background_removal."""
    previews_failed: bool = False
    """Decoding a partial image failed once: the model sends none from then on (logged once)."""
    adapters: LoadedAdapters | None = None
    """The LoRA adapters loaded into the pipeline; None when its pipeline cannot load any."""
    safety: SafetyChecker | None = None
    """The NSFW checker requests may ask for (the pipeline's own, or ``safety_checker``); None: there is none."""

    def pipeline_for(self, task: str, scheduler: Any) -> Any:
        """A view of the pipeline for ``task`` that shares the weights and has its own scheduler and state."""
        return view(self.classes[task], self.pipe, scheduler)

    def make_scheduler(self, name: str | None) -> Any:
        """A fresh scheduler for one job, so no state is shared between jobs."""
        base = self.pipe.scheduler
        if name is None:
            return type(base).from_config(base.config)
        cls, extra = self.schedulers[name]
        if extra.get("use_flow_sigmas") and "flow_shift" not in base.config:  # a FlowMatch config names it shift
            extra = {**extra, "flow_shift": base.config.get("shift", 1.0)}
        return cls.from_config(base.config, **extra)

    def latents(
        self,
        scheduler: str | None,
        width: int,
        height: int,
        steps: int,
        *,
        prompt: str = "a red fox",
        on_step: Callable[[Any], None] | None = None,
        on_scheduler: Callable[[Any], object] | None = None,
    ) -> Any:
        """The final latents of a plain text-to-image call (seed 0).

        ``on_step`` sees the latents after each step; ``on_scheduler`` the call's fresh scheduler, before it runs.
        """
        fresh = self.make_scheduler(scheduler)
        if on_scheduler is not None:
            on_scheduler(fresh)
        pipe = self.pipeline_for("text2img", fresh)
        accepts = self.accepts["text2img"]
        extra: dict[str, Any] = {"use_resolution_binning": False} if "use_resolution_binning" in accepts else {}
        if on_step is not None and "callback_on_step_end" in accepts:
            extra["callback_on_step_end"] = lambda pipe_, i, t, kwargs: on_step(kwargs["latents"]) or kwargs
        elif on_step is not None:  # the legacy form (PixArt)
            extra.update(callback=lambda i, t, latents: on_step(latents), callback_steps=1)
        return pipe(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
            **extra,
        ).images

    def count_tokens(self, prompt: str) -> int:
        tok = getattr(self.pipe, "tokenizer", None)
        if tok is None:
            return len(prompt.split())
        return len(tok(prompt, truncation=True, max_length=tok.model_max_length)["input_ids"])


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer built in memory from a byte-level vocabulary: tokenizes like CLIP's, with no download."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_demo_pipeline(seed: int = 0) -> DiffusionPipeline:
    """A tiny Stable-Diffusion-architecture pipeline with random weights (about 9 MB).

    Same components as SD 1.x (CLIP text encoder, conditional UNet, 4-block VAE with 8x downsampling, DDIM), only
    narrow, so a 256x256 step takes well under 0.1 s on a CPU. It draws noise-like pictures, not foxes.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
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
    # Four blocks, so latents are 8x smaller than the image as in real SD; narrow, so decoding a partial image
    # costs about a third of a denoising step on a CPU.
    vae = AutoencoderKL(
        block_out_channels=[4, 4, 8, 16],
        norm_num_groups=4,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def save_pipeline(build: Callable[[], DiffusionPipeline], path: str | Path) -> Path:
    """Write ``build()`` to ``path`` with ``save_pretrained``, atomically: complete or absent.

    If another process creates ``path`` first, theirs is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build().save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "model_index.json").is_file():  # not another process that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def create_demo_model(path: str | Path) -> Path:
    """Write the demo pipeline to ``path`` (atomically: complete or absent)."""
    return save_pipeline(build_demo_pipeline, path)


def check_schedulers(loaded: LoadedModel) -> None:
    """Run every scheduler the model offers once, as requests run them: two steps at the smallest size.

    Configured names must all work (a start-up error names those that do not, and why); of the family's own list,
    those that fail with this checkpoint are left out and logged. The pipeline's own scheduler runs first and is
    required: it is what requests that name none get. This is also the model's warm-up.
    """
    model, family = loaded.config, loaded.family
    required = [*(model.schedulers or []), *([model.default_scheduler] if model.default_scheduler else [])]
    names = list(dict.fromkeys([*(family.schedulers if model.schedulers is None else []), *required]))
    misfits = [n for n in required if (n in FLOW_SCHEDULERS) != family.flow]
    if misfits:
        kind = "a flow-matching" if family.flow else "an ε/v-prediction"
        raise ModelLoadError(
            f"model {model.name!r} ({family.name}) is {kind} model: scheduler(s) {', '.join(misfits)} do not apply. "
            f"Use some of {', '.join(family.schedulers)}, or leave `schedulers` out for all of those that work."
        )
    loaded.schedulers = {}
    problems: dict[str, str] = {}
    for name in [None, *names]:
        try:
            if name is not None:
                cls_name, extra = SCHEDULERS[name]
                loaded.schedulers[name] = (getattr(diffusers, cls_name), extra)
            _trial_run(loaded, name)
        except Exception as e:  # a scheduler this pipeline cannot run, NaN, a missing optional dependency, ...
            if name is None:
                raise ModelLoadError(f"model {model.name!r}: a trial run failed: {type(e).__name__}: {e}") from e
            del loaded.schedulers[name]
            problems[name] = f"{name}: {type(e).__name__}: {e}"
    if failed := [problems[n] for n in required if n in problems]:
        raise ModelLoadError(
            f"model {model.name!r}: scheduler(s) that do not run with {type(loaded.pipe).__name__}: "
            + "; ".join(failed)
            + f". Remove them from its settings, or leave `schedulers` out for all of {family.name}'s that work."
        )
    if problems:
        log.info("model %s: leaving out scheduler(s) it cannot run: %s", model.name, "; ".join(problems.values()))


def _trial_run(loaded: LoadedModel, name: str | None, width: int = 0, height: int = 0) -> None:
    """Two steps with scheduler ``name`` (None: the pipeline's own), checked for NaN, at the smallest size by default.

    The pipeline's own run also decodes a partial image from the latents its step callback sees, as requests do;
    when that fails the model sends no partial images, and says so now.
    """
    config = loaded.config
    side = max(config.min_side, 64)
    side += -side % config.size_multiple
    width, height = width or side, height or side
    seen: list[Any] = []
    latents = loaded.latents(name, width, height, 2, on_step=seen.append if name is None else None)
    if isinstance(latents, torch.Tensor) and not torch.isfinite(latents).all():
        raise ValueError("it produced NaN values")
    if seen:
        try:
            loaded.previewer(seen[-1][:1], width, height)
        except Exception as e:
            loaded.previews_failed = True
            log.warning(
                "model %s: partial images cannot be decoded (%s: %s); streams of it carry none",
                config.name,
                type(e).__name__,
                e,
            )


def _denoiser(pipe: Any) -> Any:
    return getattr(pipe, "transformer", None) or pipe.unet


def _quantization(model: ModelConfig, path: Path) -> Any:
    """The quantization config diffusers loads the denoiser with, from the ``backend:kind`` setting."""
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig, TorchAoConfig

    backend, _, kind = model.quantization.partition(":")
    component = "transformer" if (path / "transformer").is_dir() else "unet"
    if backend == "torchao":
        import torchao.quantization

        config: Any = TorchAoConfig(getattr(torchao.quantization, TORCHAO_CONFIGS[kind])())
    elif kind == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[model.dtype]
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return PipelineQuantizationConfig(quant_mapping={component: config})


def _speed_features(model: ModelConfig, pipe: Any) -> None:
    """VAE tiling and slicing, the attention backend, step caching and compilation, as the model's settings ask."""
    try:
        if model.vae_tiling:
            pipe.vae.enable_tiling()
        if model.vae_slicing:
            pipe.vae.enable_slicing()
        denoiser = _denoiser(pipe)
        if model.attention_backend:
            denoiser.set_attention_backend(model.attention_backend)
        if model.step_cache:
            from diffusers import FirstBlockCacheConfig

            if not hasattr(denoiser, "enable_cache"):
                raise ValueError(f"{type(denoiser).__name__} has no step caching in diffusers")
            denoiser.enable_cache(FirstBlockCacheConfig(threshold=float(model.step_cache.partition(":")[2])))
        if model.compile:
            if getattr(denoiser, "_repeated_blocks", None):
                denoiser.compile_repeated_blocks()  # regional: each distinct block compiles once
            else:
                denoiser.compile()
    except Exception as e:  # a backend that is not installed or not for this device, a model without the feature
        raise ModelLoadError(f"model {model.name!r}: {type(e).__name__}: {e}") from e


def load_model(model: ModelConfig, device: str) -> LoadedModel:
    """Load ``model`` onto ``device`` through ``from_pretrained`` (creating the demo model first if asked)."""
    path = Path(model.path).expanduser()
    if model.demo and not (path / "model_index.json").is_file():
        log.info("creating demo model %s at %s", model.name, path)
        create_demo_model(path)
    source = str(path) if path.exists() else model.path
    try:
        extra = {"quantization_config": _quantization(model, path)} if model.quantization else {}
        pipe = DiffusionPipeline.from_pretrained(source, dtype=DTYPES[model.dtype], **extra)
    except Exception as e:
        hint = f" (quantization {model.quantization}: is its package installed?)" if model.quantization else ""
        raise ModelLoadError(f"model {model.name!r}: cannot load {source!r}{hint}: {type(e).__name__}: {e}") from e
    if model.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif model.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    safety = SafetyChecker.take_from(pipe)  # run after the pipeline, when a request asks, not inside every call
    if model.safety_checker:
        safety = SafetyChecker.load(model.safety_checker, device, DTYPES[model.dtype])
    _speed_features(model, pipe)
    accepted = call_params(type(pipe))
    steps_seen = "callback_on_step_end" in accepted or {"callback", "callback_steps"} <= accepted  # (PixArt: legacy)
    if not ({"num_inference_steps", "generator"} <= accepted and steps_seen):
        raise ModelLoadError(f"model {model.name!r}: {type(pipe).__name__} is not a supported text-to-image pipeline")
    tasks = {"text2img"}
    classes: dict[str, type] = {"text2img": type(pipe)}
    for task, mapping, needs in (
        ("img2img", AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, {"image", "strength"}),
        ("inpaint", AUTO_INPAINT_PIPELINES_MAPPING, {"image", "mask_image", "strength"}),
    ):
        cls = _get_task_class(mapping, type(pipe).__name__, throw_error_if_not_exist=False)
        if cls is None:
            log.info("model %s: no %s pipeline for %s", model.name, task, type(pipe).__name__)
            continue
        try:
            view(cls, pipe, pipe.scheduler)
        except Exception as e:  # its components do not fit the edit pipeline
            log.info("model %s: no %s pipeline (%s)", model.name, task, e)
            continue
        if not needs <= call_params(cls):  # e.g. a pipeline that takes reference images, not an image to redraw
            log.info("model %s: its %s pipeline takes no %s", model.name, task, ", ".join(needs - call_params(cls)))
            continue
        classes[task] = cls
        tasks.add(task)
        if task == "inpaint":
            tasks.add("outpaint")
            classes["outpaint"] = cls
    accepts = {task: call_params(cls) for task, cls in classes.items()}
    segmenter = None
    if model.segmentation_model:
        from transformers import pipeline as transformers_pipeline

        try:
            segmenter = transformers_pipeline("image-segmentation", model=model.segmentation_model, device=device)
        except Exception as e:
            raise ModelLoadError(
                f"model {model.name!r}: cannot load segmentation_model {model.segmentation_model!r}: {e}"
            ) from e
        tasks.add("background_removal")
    loaded = LoadedModel(
        config=model,
        pipe=pipe,
        previewer=Previewer.for_pipeline(pipe, model.preview, model.preview_downscale, model.taesd_path),
        family=family_of(pipe),
        classes=classes,
        accepts=accepts,
        tasks=frozenset(tasks),
        segmenter=segmenter,
        safety=safety,
    )
    check_schedulers(loaded)
    if model.compile:  # the request path's shapes compile now, not in a request
        _trial_run(loaded, None, *parse_size(model.default_size))
    log.info(
        "loaded %s (%s, family %s, %s) on %s: tasks %s, schedulers %s",
        model.name,
        type(pipe).__name__,
        loaded.family.name,
        model.dtype,
        device,
        sorted(tasks),
        list(loaded.schedulers),
    )
    return loaded


def quiet_libraries() -> None:
    """Silence progress bars and load reports of the model libraries (set before they are used)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
