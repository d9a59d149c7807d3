"""The AUTOMATIC1111 dialect (``/sdapi/v1``), as a translation: what Open WebUI, SillyTavern and many tools speak.

``txt2img`` and ``img2img`` become jobs of the job layer (surface ``sdapi``) that the route waits for, so each
caller's generation has a progress (``/progress``, with the newest of three previews) and can be stopped
(``/interrupt``; the stopped request answers with no images, as A1111 does) — per caller, never globally as in the
original. ``/options`` holds the caller's current model (per principal).

Mapping: ``sampler_name`` (+ ``scheduler`` ``karras``) onto imagegate's schedulers (:data:`SAMPLERS`);
``override_settings.sd_model_checkpoint`` (a ``/sd-models`` title) picks the model of one request;
``<lora:name:weight>`` tags in the prompt become ``loras``; ``batch_size × n_iter`` is ``n``; ``seed: -1`` is
random, and image ``i`` has seed ``seed + i`` (``info.all_seeds``); ``steps``/``cfg_scale`` left out take the
model's defaults. Unknown keys are ignored (SillyTavern forwards its own); features imagegate does not run
(``enable_hr``, ``restore_faces``, ``tiling``, scripts, a refiner) are refused rather than silently skipped.
Errors are A1111's ``{"error", "detail", "body", "errors"}``.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import msgspec

from app.errors import ApiError, InvalidRequest
from app.protocol.images import MAX_SEED, ImageEditJsonRequest, ImageGenerateRequest, checked_request

SAMPLERS: dict[str, tuple[str, list[str]]] = {
    "Euler": ("euler", ["k_euler"]),
    "Euler a": ("euler_a", ["k_euler_a", "k_euler_ancestral"]),
    "LMS": ("lms", ["k_lms"]),
    "Heun": ("heun", ["k_heun"]),
    "DPM2": ("kdpm2", ["k_dpm_2"]),
    "DPM2 a": ("kdpm2_a", ["k_dpm_2_a"]),
    "DPM++ 2M": ("dpmpp_2m", ["k_dpmpp_2m"]),
    "DPM++ SDE": ("dpmpp_sde", ["k_dpmpp_sde"]),
    "DDIM": ("ddim", []),
    "PLMS": ("pndm", []),
    "UniPC": ("unipc", []),
    "DDPM": ("ddpm", []),
    "DEIS": ("deis", []),
    "LCM": ("lcm", []),
}
"""A1111 sampler name -> (imagegate scheduler, aliases). ``DPM++ 2M`` with the ``karras`` schedule (or the older
name ``DPM++ 2M Karras``) is ``dpmpp_2m_karras``."""
SCHEDULES = {"automatic": "Automatic", "karras": "Karras"}
"""The A1111 noise schedules imagegate can honour (``karras`` with ``DPM++ 2M`` only)."""
UNSUPPORTED = {
    "enable_hr": "hires fix",
    "restore_faces": "face restoration",
    "tiling": "tiling",
    "refiner_checkpoint": "a refiner",
    "script_name": "scripts",
    "alwayson_scripts": "scripts",
    "inpainting_mask_invert": "an inverted mask",
}
_LORA = re.compile(r"<lora:([^:>]+)(?::([-0-9.]+))?>")


class Txt2Img(msgspec.Struct, kw_only=True):
    """The fields of ``POST /sdapi/v1/txt2img`` imagegate reads; every other key is ignored."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int = 512
    height: int = 512
    override_settings: dict[str, Any] = msgspec.field(default_factory=dict)
    enable_hr: bool = False
    restore_faces: bool = False
    tiling: bool = False
    refiner_checkpoint: str | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = msgspec.field(default_factory=dict)
    samples_format: str | None = None


class Img2Img(Txt2Img, kw_only=True):
    """``POST /sdapi/v1/img2img``.

    ``init_images``: base64 or ``data:`` URLs (the first is used); ``mask``: greyscale, white is redrawn.
    """

    init_images: list[str] = msgspec.field(default_factory=list)
    mask: str | None = None
    denoising_strength: float = 0.75
    inpainting_mask_invert: int = 0


class Options(msgspec.Struct, kw_only=True):
    sd_model_checkpoint: str
    samples_format: str = "png"
    CLIP_stop_at_last_layers: int = 1
    sd_vae: str = "Automatic"


class SdModel(msgspec.Struct, kw_only=True):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class Sampler(msgspec.Struct, kw_only=True):
    name: str
    aliases: list[str]
    options: dict[str, str] = msgspec.field(default_factory=dict)


class Schedule(msgspec.Struct, kw_only=True):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class ProgressState(msgspec.Struct, kw_only=True):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(msgspec.Struct, kw_only=True):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None = None


class GenerationResponse(msgspec.Struct, kw_only=True):
    images: list[str]
    """Base64 PNG (or ``samples_format``), no ``data:`` prefix."""
    parameters: dict[str, Any]
    """The request as sent."""
    info: str
    """A JSON string: prompts, seeds, size, sampler, steps, model, as A1111 writes it."""


class A1111Error(msgspec.Struct, kw_only=True):
    error: str
    detail: str
    body: str = ""
    errors: str = ""


def error_body(error: ApiError) -> A1111Error:
    return A1111Error(error=type(error).__name__, detail=error.message)


def decode(body: bytes, type: type) -> tuple[Any, dict[str, Any]]:
    """The request (numbers also as strings), and its fields as sent to echo as ``parameters``.

    Only the fields imagegate reads are echoed: clients forward keys of their own (SillyTavern its ``auth``), and
    A1111 echoes its request model, not the body.
    """
    try:
        raw = msgspec.json.decode(body or b"{}")
        if not isinstance(raw, dict):
            raise InvalidRequest("The body must be a JSON object.")
        known = set(type.__struct_fields__)
        return msgspec.convert(raw, type, strict=False), {k: v for k, v in raw.items() if k in known}
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise InvalidRequest(f"Invalid request: {e}") from None


def model_title(title: Any) -> str:
    """A ``/sd-models`` title (``name``, or A1111's ``name.safetensors [hash]``) as a model name."""
    if not isinstance(title, str):
        raise InvalidRequest("sd_model_checkpoint must be a model title (a string).", param="sd_model_checkpoint")
    return title.split(" [", 1)[0].removesuffix(".safetensors").removesuffix(".ckpt").strip()


def scheduler(req: Txt2Img) -> str | None:
    """Imagegate's scheduler for the request's sampler and schedule (None: the model's default)."""
    name = (req.sampler_name or req.sampler_index or "").strip()
    schedule = (req.scheduler or "automatic").strip().lower()
    if name.endswith(" Karras"):
        name, schedule = name.removesuffix(" Karras"), "karras"
    if not name:
        return None
    found = next((s for n, (s, aliases) in SAMPLERS.items() if name in (n, *aliases)), None)
    if found is None:
        raise InvalidRequest(f"Sampler not found: '{name}'. Available: {', '.join(SAMPLERS)}.", param="sampler_name")
    if schedule not in SCHEDULES:
        raise InvalidRequest(f"Scheduler '{req.scheduler}' is not supported; use automatic.", param="scheduler")
    if schedule == "karras":
        if found != "dpmpp_2m":
            raise InvalidRequest(f"The karras schedule works with DPM++ 2M only, not '{name}'.", param="scheduler")
        return "dpmpp_2m_karras"
    return found


def _prompt(text: str) -> tuple[str, list[dict[str, Any]] | None]:
    """The prompt without its ``<lora:name:weight>`` tags, and those adapters."""
    loras = []
    for m in _LORA.finditer(text):
        try:
            loras.append({"id": m.group(1), "scale": float(m.group(2) or 1.0)})
        except ValueError:
            raise InvalidRequest(f"The LoRA tag {m.group(0)} has no valid weight.", param="prompt") from None
    return _LORA.sub("", text).strip(), loras or None


def _check(req: Txt2Img) -> None:
    for field, what in UNSUPPORTED.items():
        if getattr(req, field, None):
            raise InvalidRequest(f"{what.capitalize()} ({field}) is not supported by this server.", param=field)
    if not req.prompt.strip():
        raise InvalidRequest("The prompt is empty.", param="prompt")


def seed(req: Txt2Img) -> int:
    return secrets.randbelow(2**31) if req.seed < 0 else min(req.seed, MAX_SEED)


def _fields(model: str, req: Txt2Img, first_seed: int) -> dict[str, Any]:
    """The image request's fields both routes share (the request checked first)."""
    _check(req)
    prompt, loras = _prompt(req.prompt)
    return {
        "moderation": "low",  # A1111 runs no safety checker
        "model": model,
        "prompt": prompt,
        "negative_prompt": req.negative_prompt or None,
        "n": max(1, req.batch_size) * max(1, req.n_iter),
        "size": f"{req.width}x{req.height}",
        "seed": first_seed,
        "num_inference_steps": req.steps,
        "guidance_scale": req.cfg_scale,
        "scheduler": scheduler(req),
        "output_format": _format(req.samples_format),
        "response_format": "url",
        "partial_images": 3,
        "loras": loras,
        "clip_skip": req.override_settings.get("CLIP_stop_at_last_layers"),
    }


def generation(model: str, req: Txt2Img, first_seed: int) -> ImageGenerateRequest:
    return checked_request(ImageGenerateRequest, **_fields(model, req, first_seed))


def edit(model: str, req: Img2Img, first_seed: int) -> ImageEditJsonRequest:
    fields = _fields(model, req, first_seed)
    if not req.init_images:
        raise InvalidRequest("init_images needs one image.", param="init_images")
    return checked_request(
        ImageEditJsonRequest,
        **fields,
        images=[{"image_url": _data_url(req.init_images[0])}],
        mask={"image_url": _data_url(req.mask)} if req.mask else None,
        strength=req.denoising_strength,
    )


def _format(samples_format: str | None) -> str:
    fmt = (samples_format or "png").lower()
    return {"jpg": "jpeg"}.get(fmt, fmt) if fmt in ("png", "jpg", "jpeg", "webp") else "png"


def _data_url(image: str) -> str:
    return image if image.startswith("data:") else f"data:image/png;base64,{image}"


def info(req: Txt2Img, model: str, first_seed: int, n: int, sampler_name: str) -> str:
    """The ``info`` JSON string of a generation, with the fields A1111 writes that clients read."""
    seeds = [first_seed + i for i in range(n)]
    prompt, _ = _prompt(req.prompt)
    return msgspec.json.encode(
        {
            "prompt": prompt,
            "all_prompts": [prompt] * n,
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * n,
            "seed": first_seed,
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * n,
            "subseed_strength": 0,
            "width": req.width,
            "height": req.height,
            "sampler_name": sampler_name,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "restore_faces": False,
            "sd_model_name": model,
            "sd_model_hash": None,
            "denoising_strength": getattr(req, "denoising_strength", None),
            "index_of_first_image": 0,
            "infotexts": [f"{prompt}\nSteps: {req.steps}, Sampler: {sampler_name}, Seed: {s}" for s in seeds],
            "styles": [],
            "clip_skip": req.override_settings.get("CLIP_stop_at_last_layers", 1),
        }
    ).decode()
