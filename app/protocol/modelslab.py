"""The ModelsLab dialect (seed 004: ``/api/v6/images/*``, ``/api/v1/enterprise/*``), as a translation.

The key travels in the body (``key``) and is any imagegate credential. Values arrive as numbers or strings, flags as
``"yes"``/``"no"``, booleans or 0/1: :func:`decode` reads them leniently, then the same image service checks them as
strictly as any request. Every generation is a job of the job layer; the answer is ``success`` when it ends within
the server's ``modelslab_wait``, else ``processing`` with ``id``, ``eta``, ``fetch_result`` and ``future_links``
(the final URLs, 404 until the job is done). Errors are ``{"status": "error", "message": …}`` (with the legacy
``messege`` too) and the HTTP status of imagegate's error.
"""

from __future__ import annotations

from typing import Any

import msgspec

from app.errors import ApiError, InvalidRequest, Overloaded, RateLimited
from app.protocol.images import MAX_LORA_SCALE, ImageGenerateRequest, LoraSpec, checked_request

SCHEDULERS: dict[str, str | None] = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "kdpm2",
    "DPMSolverSinglestepScheduler": "dpmpp_sde",
    "KDPM2AncestralDiscreteScheduler": "kdpm2_a",
    "UniPCMultistepScheduler": "unipc",
    "DEISMultistepScheduler": "deis",
    "LCMScheduler": "lcm",
    "DDIMInverseScheduler": None,
    "IPNDMScheduler": None,
    "KarrasVeScheduler": None,
    "ScoreSdeVeScheduler": None,
}
"""The seed's 18 scheduler names -> imagegate's (None: refused, see :data:`REFUSED`)."""
REFUSED = {
    "DDIMInverseScheduler": "it inverts images into noise (for image editing methods); it cannot generate",
    "IPNDMScheduler": "it ignores the model's noise schedule and draws from its own",
    "KarrasVeScheduler": "it is deprecated in diffusers and its step does not fit Stable Diffusion pipelines",
    "ScoreSdeVeScheduler": "it is for score-based VE models and has no step for Stable Diffusion pipelines",
}
UNSUPPORTED_FLAGS = ("panorama", "self_attention", "upscale", "highres_fix", "multi_lingual")
"""Flags imagegate does not run: ``"yes"`` is refused, never silently skipped."""
MAX_SIDE = 1024
MAX_SAMPLES = 4
SAFETY_TYPES = ("blur", "sensitive_content_text", "pixelate", "black")


class Request(msgspec.Struct, kw_only=True):
    """A text2img, img2img or inpaint body, every field as clients send it (validated in :func:`generation`)."""

    key: str | None = None
    model_id: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    init_image: str | None = None
    mask_image: str | None = None
    width: Any = 512
    height: Any = 512
    samples: Any = 1
    num_inference_steps: Any = None
    guidance_scale: Any = None
    strength: Any = None
    scheduler: str | None = None
    use_karras_sigmas: Any = "yes"
    algorithm_type: str | None = None
    tomesd: Any = None
    vae: str | None = None
    lora_model: str | None = None
    lora_strength: Any = None
    clip_skip: Any = None
    safety_checker: Any = None
    safety_checker_type: str | None = None
    enhance_prompt: Any = None
    seed: Any = None
    webhook: str | None = None
    track_id: Any = None
    base64: Any = None
    temp: Any = None
    panorama: Any = None
    self_attention: Any = None
    upscale: Any = None
    highres_fix: Any = None
    multi_lingual: Any = None
    request_id: Any = None
    """The id to fetch (``POST …/fetch`` with the id in the body)."""


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: str
    """Always ``error``."""
    message: str
    messege: str
    """The same text under the legacy misspelt key some clients read."""
    retry_after: float | None = None


def error_body(error: ApiError) -> ErrorBody:
    retry = error.retry_after if isinstance(error, Overloaded | RateLimited) else None
    return ErrorBody(status="error", message=error.message, messege=error.message, retry_after=retry)


def decode(body: bytes) -> Request:
    try:
        raw = msgspec.json.decode(body or b"{}")
        if not isinstance(raw, dict):
            raise InvalidRequest("The body must be a JSON object.")
        return msgspec.convert(raw, Request, strict=False)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise InvalidRequest(f"Invalid request: {e}") from None


def flag(value: Any, name: str) -> bool:
    """``"yes"``/``"no"``, true/false, 1/0 (any case) as a boolean; None or empty is no."""
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "1", "y", "on"):
        return True
    if text in ("no", "false", "0", "n", "off", "none", "null"):
        return False
    raise InvalidRequest(f"{name} must be yes or no, not {value!r}.", param=name)


def number(value: Any, name: str, kind: type = int) -> Any:
    """An int or float sent as a number or a string; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a number, not {value!r}.", param=name)
    try:
        result = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be a number, not {value!r}.", param=name) from None
    if kind is int and float(value) != result:
        raise InvalidRequest(f"{name} must be a whole number, not {value!r}.", param=name)
    return result


def scheduler(req: Request) -> tuple[str | None, bool]:
    """Imagegate's scheduler for the request (None: the model's default) and whether Karras sigmas apply."""
    karras = flag(req.use_karras_sigmas, "use_karras_sigmas")
    algorithm = (req.algorithm_type or "none").strip().lower()
    if algorithm not in ("none", "", "dpmsolver++"):
        raise InvalidRequest(
            f"algorithm_type {req.algorithm_type!r} is not available here (the SDE variants of DPM-Solver are not "
            "offered); leave it out or send none.",
            param="algorithm_type",
        )
    if not req.scheduler:
        return None, False
    if req.scheduler not in SCHEDULERS:
        raise InvalidRequest(
            f"Unknown scheduler {req.scheduler!r}. Known: {', '.join(n for n, s in SCHEDULERS.items() if s)}.",
            param="scheduler",
        )
    name = SCHEDULERS[req.scheduler]
    if name is None:
        raise InvalidRequest(
            f"The scheduler {req.scheduler} cannot be used: {REFUSED[req.scheduler]}.", param="scheduler"
        )
    if name == "dpmpp_2m" and karras:
        return "dpmpp_2m_karras", True
    return name, False


def loras(req: Request) -> list[LoraSpec] | None:
    """``lora_model`` (comma-separated adapter ids) with ``lora_strength`` (one per adapter, or one for all)."""
    if not req.lora_model or not str(req.lora_model).strip():
        return None
    names = [n.strip() for n in str(req.lora_model).split(",") if n.strip()]
    raw = req.lora_strength
    strengths = [s.strip() for s in str(raw).split(",")] if raw not in (None, "") else []
    if len(strengths) not in (0, 1, len(names)):
        raise InvalidRequest(
            f"lora_strength has {len(strengths)} values for {len(names)} LoRA models; give one, or one each.",
            param="lora_strength",
        )
    values = [number(s, "lora_strength", float) for s in strengths] or [1.0]
    if len(values) == 1:
        values *= len(names)
    if any(not 0 <= v <= MAX_LORA_SCALE for v in values):
        raise InvalidRequest(f"lora_strength must be within 0-{MAX_LORA_SCALE:g}.", param="lora_strength")
    return [LoraSpec(id=n, scale=v) for n, v in zip(names, values, strict=True)]


def check(req: Request) -> None:
    """Refuse what imagegate does not run (rather than skip it silently)."""
    for name in UNSUPPORTED_FLAGS:
        if flag(getattr(req, name), name):
            raise InvalidRequest(f"{name} is not supported by this server; send no.", param=name)
    for name in ("temp", "base64", "tomesd", "enhance_prompt"):  # read later: refuse a bad one before anything runs
        flag(getattr(req, name), name)
    if req.vae not in (None, "", "null", "none", "None"):
        raise InvalidRequest(f"The VAE {req.vae!r} is not available; leave vae out to use the model's.", param="vae")
    clip_skip = number(req.clip_skip, "clip_skip")
    if clip_skip is not None and not 1 <= clip_skip <= 8:
        raise InvalidRequest("clip_skip must be within 1-8.", param="clip_skip")


def safety(req: Request) -> str | None:
    """The treatment of what the safety checker flags, when the request asks for the checker (else None)."""
    if not flag(req.safety_checker, "safety_checker"):
        return None
    how = (req.safety_checker_type or "sensitive_content_text").strip().lower()
    if how not in SAFETY_TYPES:
        raise InvalidRequest(
            f"safety_checker_type must be one of {', '.join(SAFETY_TYPES)}.", param="safety_checker_type"
        )
    return how


def generation(req: Request, model: str, prompt: str, seed: int | None) -> ImageGenerateRequest:
    """The image request of a text2img body (img2img and inpaint add their images to it)."""
    width, height = number(req.width, "width") or 512, number(req.height, "height") or 512
    if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE) or width % 8 or height % 8:
        raise InvalidRequest(f"width and height must be multiples of 8 up to {MAX_SIDE}.", param="width")
    samples = number(req.samples, "samples") or 1
    if not 1 <= samples <= MAX_SAMPLES:
        raise InvalidRequest(f"samples must be within 1-{MAX_SAMPLES}.", param="samples")
    guidance = number(req.guidance_scale, "guidance_scale", float)
    if guidance is not None and not 1 <= guidance <= 20:
        raise InvalidRequest("guidance_scale must be within 1-20.", param="guidance_scale")
    name, _ = scheduler(req)
    return checked_request(
        ImageGenerateRequest,
        safety_checker=safety(req),
        moderation=None if safety(req) else "low",  # "no": the model's checker does not run either
        model=model,
        prompt=prompt,
        negative_prompt=req.negative_prompt or None,
        n=samples,
        size=f"{width}x{height}",
        seed=seed,
        num_inference_steps=number(req.num_inference_steps, "num_inference_steps"),
        guidance_scale=guidance,
        scheduler=name,
        response_format="url",
        loras=loras(req),
        clip_skip=number(req.clip_skip, "clip_skip"),
    )


def meta(req: Request, wire: dict[str, Any], job_id: str, output: list[str], enhanced: bool) -> dict[str, Any]:
    """The ``meta`` object of a generation: ``wire``, the stored image request it ran as, with flags as yes/no."""
    yes = {True: "yes", False: "no"}
    width, _, height = (wire.get("size") or "x").partition("x")
    _, karras = scheduler(req)
    return {
        "prompt": wire["prompt"],
        "model_id": wire["model"],
        "negative_prompt": wire.get("negative_prompt") or "",
        "scheduler": req.scheduler or "default",
        "safety_checker": yes[safety(req) is not None],
        "safety_checker_type": safety(req) or req.safety_checker_type,
        "W": int(width) if width.isdigit() else None,
        "H": int(height) if height.isdigit() else None,
        "guidance_scale": wire.get("guidance_scale"),
        "seed": wire.get("seed"),
        "steps": wire.get("num_inference_steps"),
        "n_samples": wire.get("n", 1),
        "enhance_prompt": yes[enhanced],
        "use_karras_sigmas": yes[karras],
        "algorithm_type": "no",
        "tomesd": "no",
        "vae": None,
        "lora": req.lora_model,
        "lora_strength": req.lora_strength,
        "clip_skip": number(req.clip_skip, "clip_skip") or 1,
        "temp": yes[flag(req.temp, "temp")],
        "base64": yes[flag(req.base64, "base64")],
        "webhook": req.webhook,
        "track_id": req.track_id,
        "id": job_id,
        "output": output,
    }
