"""The Hugging Face dialect: the text-to-image task API and a custom endpoint handler (seed 003), as a translation.

Two contracts reach the same image service as ``/v1/images/generations``:

- the **task API** that ``huggingface_hub.InferenceClient.text_to_image`` and the serverless router speak:
  ``{"inputs": prompt, "parameters": {negative_prompt, height, width, num_inference_steps, guidance_scale,
  scheduler, seed}}`` (also the legacy ``target_size`` and ``options``), answered with the image's bytes in the
  format the ``Accept`` header asks for (JPEG for ``*/*`` or none, as the hosted API did);
- the **handler** of seed 003: flat keys (``inputs``, ``negative_prompt``, ``height``, ``width``,
  ``guidance_scale``, ``inference_steps``, 25 by default), answered with ``{"image": "<base64 JPEG>"}``, or the
  bytes when ``Accept`` names an image type (so ``InferenceClient`` can call it too).

Clients send numbers as numbers or strings: bodies are decoded leniently (``strict=False``) and checked by the image
service like any request. Errors are ``{"error": "<message>"}`` with the status of imagegate's error; a model with no
ready worker is a 503 with ``estimated_time``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.errors import ApiError, InvalidRequest, Unavailable
from app.protocol.images import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, ImageGenerateRequest, OutputFormat, checked_request

MEDIA_TYPES: dict[str, OutputFormat] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/webp": "webp",
}
Side = Annotated[int, Meta(ge=1, le=16384)]
Steps = Annotated[int, Meta(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, Meta(ge=0, le=MAX_GUIDANCE)]
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED)]


class TargetSize(msgspec.Struct, kw_only=True):
    width: Side
    height: Side


class TaskParameters(msgspec.Struct, kw_only=True):
    """``huggingface_hub``'s ``TextToImageParameters``; ``scheduler`` is a diffusers class (or imagegate) name."""

    negative_prompt: str | None = None
    height: Side | None = None
    width: Side | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None
    scheduler: str | None = None
    seed: Seed | None = None
    target_size: TargetSize | None = None
    """The older spec's size (still translated by the Endpoints toolkit)."""


class TaskOptions(msgspec.Struct, kw_only=True):
    use_cache: bool | None = None
    wait_for_model: bool | None = None


class TaskRequest(msgspec.Struct, kw_only=True):
    """``POST /hf/models/{model}``: the text-to-image task; unknown fields are ignored."""

    inputs: Annotated[str, Meta(min_length=1, max_length=32000)]
    parameters: TaskParameters = msgspec.field(default_factory=TaskParameters)
    options: TaskOptions | None = None


class HandlerRequest(msgspec.Struct, kw_only=True):
    """``POST /hf/endpoints/{model}``: seed 003's handler (``num_inference_steps`` and ``parameters`` also taken)."""

    inputs: Annotated[str, Meta(min_length=1, max_length=32000)]
    negative_prompt: str | None = None
    height: Side | None = None
    width: Side | None = None
    guidance_scale: Guidance | None = None
    inference_steps: Steps = 25
    num_inference_steps: Steps | None = None
    seed: Seed | None = None
    parameters: TaskParameters | None = None


class HandlerResponse(msgspec.Struct, kw_only=True):
    image: str
    """The image, base64 (no ``data:`` prefix)."""


class HFError(msgspec.Struct, kw_only=True, omit_defaults=True):
    error: str
    estimated_time: float | UnsetType = UNSET
    """Seconds until the model is expected to be ready (a 503 while it loads)."""


def error_body(error: ApiError) -> HFError:
    """The error in this dialect's envelope; a model without a ready worker says when to come back."""
    if isinstance(error, Unavailable):
        return HFError(error=error.message, estimated_time=float(error.retry_after or 5))
    return HFError(error=error.message)


def decode(body: bytes, type: type) -> msgspec.Struct:
    """A request body of this dialect: JSON, numbers also as strings.

    Raises:
        InvalidRequest: not JSON, ``inputs`` missing (the toolkit's message), or a field out of range.
    """
    try:
        return msgspec.json.decode(body, type=type, strict=False)
    except msgspec.ValidationError as e:
        if "missing required field `inputs`" in str(e):
            raise InvalidRequest(
                f"Body needs to provide a inputs key, received: {body[:200].decode(errors='replace')}", param="inputs"
            ) from None
        raise InvalidRequest(f"Invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"The body is not JSON: {e}") from None


def output_format(accept: str | None, default: OutputFormat = "jpeg") -> OutputFormat | None:
    """The image format an ``Accept`` header asks for.

    The first image type it names; ``default`` for ``*/*``, ``image/*`` or none; None when it asks for no image.
    """
    for part in (accept or "*/*").split(","):
        media = part.split(";")[0].strip().lower()
        if media in MEDIA_TYPES:
            return MEDIA_TYPES[media]
        if media in ("*/*", "image/*", ""):
            return default
    return None


def _size(p: TaskParameters | HandlerRequest) -> str | None:
    width, height = p.width, p.height
    if isinstance(p, TaskParameters) and p.target_size is not None:
        width, height = p.target_size.width, p.target_size.height
    if width is None and height is None:
        return None
    if width is None or height is None:
        raise InvalidRequest("Give both width and height, or neither.", param="height" if height is None else "width")
    return f"{width}x{height}"


def task_request(model: str, req: TaskRequest, fmt: OutputFormat) -> ImageGenerateRequest:
    p = req.parameters
    return checked_request(
        ImageGenerateRequest,
        model=model,
        prompt=req.inputs,
        negative_prompt=p.negative_prompt,
        size=_size(p),
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        scheduler=p.scheduler,
        seed=p.seed,
        output_format=fmt,
        response_format="b64_json",
    )


def handler_request(model: str, req: HandlerRequest, fmt: OutputFormat) -> ImageGenerateRequest:
    if req.parameters is not None:  # what InferenceClient sends to an endpoint: the task's nesting
        return task_request(model, TaskRequest(inputs=req.inputs, parameters=req.parameters), fmt)
    return checked_request(
        ImageGenerateRequest,
        model=model,
        prompt=req.inputs,
        negative_prompt=req.negative_prompt,
        size=_size(req),
        num_inference_steps=req.num_inference_steps or req.inference_steps,
        guidance_scale=req.guidance_scale,
        seed=req.seed,
        output_format=fmt,
        response_format="b64_json",
    )


def wants_to_wait(headers: dict[str, str], options: TaskOptions | None) -> float:
    """Seconds a caller will wait for a model that is loading (0: answer 503 at once).

    ``X-Scale-Up-Timeout: <seconds>``, or ``X-Wait-For-Model: true`` (``options.wait_for_model``) for as long as
    the request may take.
    """
    timeout = headers.get("x-scale-up-timeout", "")
    if timeout.replace(".", "", 1).isdigit():
        return float(timeout)
    waits = headers.get("x-wait-for-model", "").strip().lower() in ("1", "true", "yes")
    return float("inf") if waits or (options is not None and options.wait_for_model) else 0.0
