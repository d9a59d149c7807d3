"""Public wire types of the Images API, named after OpenAI's (``openapi.yaml`` describes the same fields)."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.errors import InvalidRequest
from app.worker.protocol import Base64

T = TypeVar("T")

Quality = Literal["auto", "low", "medium", "high", "standard", "hd"]
ResponseFormat = Literal["url", "b64_json"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["transparent", "opaque", "auto"]

MAX_SEED = 2**63 - 1
MAX_STEPS = 1000
"""Most denoising steps any request may name (a model's own ``max_steps`` is usually far lower)."""
MAX_GUIDANCE = 1000.0
"""Largest guidance_scale any request may name; also keeps non-finite numbers out."""


class Fallback(msgspec.Struct, kw_only=True):
    """A fallback model as Bifrost's spec writes it; a plain ``"model"`` or ``"provider/model"`` string works too."""

    model: str
    provider: str | None = None


Fallbacks = Annotated[list[str | Fallback], Meta(max_length=10)]
WebhookEvent = Literal["started", "progress", "completed"]
MAX_LORA_SCALE = 2.0


class LoraSpec(msgspec.Struct, kw_only=True):
    """A LoRA adapter of the request's model to apply, at ``scale`` (0: no effect; negative: away from it)."""

    id: Annotated[str, Meta(min_length=1, max_length=200)]
    scale: Annotated[float, Meta(ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)] = 1.0


class _JobOptions(msgspec.Struct, kw_only=True):
    """Fields that only an asynchronous request (``Prefer: respond-async``) may carry."""

    webhook_url: Annotated[str, Meta(max_length=2048)] | None = None
    webhook_events: Annotated[list[WebhookEvent], Meta(max_length=3)] | None = None


class _ImageOptions(_JobOptions, kw_only=True):
    """The fields generations and edits share."""

    model: str | None = None
    n: Annotated[int, Meta(ge=1, le=10)] = 1
    size: str | None = None
    quality: Quality | None = None
    response_format: ResponseFormat | None = None
    output_format: OutputFormat | None = None
    output_compression: Annotated[int, Meta(ge=0, le=100)] | None = None
    background: Background | None = None
    user: str | None = None
    fallbacks: Fallbacks | None = None
    stream: bool | None = False
    partial_images: Annotated[int, Meta(ge=0, le=3)] | None = None
    # Diffusion extensions (the SDKs send them through extra_body).
    negative_prompt: str | None = None
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    num_inference_steps: Annotated[int, Meta(ge=1, le=MAX_STEPS)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=MAX_GUIDANCE)] | None = None
    scheduler: str | None = None
    clip_skip: Annotated[int, Meta(ge=1, le=12)] | None = None
    """The text encoder's layer to take, counted from the end as AUTOMATIC1111 does (1: the last, no skip)."""
    moderation: Literal["low", "auto"] | None = None
    safety_checker: Literal["black", "blur", "pixelate", "sensitive_content_text"] | None = None
    """Run the model's NSFW checker and treat what it flags so (a 400 if the model has none); by default a model's
    checker blacks out what it flags unless ``moderation`` is ``low``."""


class ImageGenerateRequest(_ImageOptions, kw_only=True):
    """``POST /v1/images/generations``. Unknown fields are ignored, as OpenAI-compatible servers do."""

    prompt: Annotated[str, Meta(min_length=1, max_length=32000)]
    loras: Annotated[list[LoraSpec], Meta(max_length=16)] | None = None
    style: Literal["vivid", "natural"] | None = None


class ImageEditRequest(_ImageOptions, kw_only=True):
    """The fields of ``POST /v1/images/edits`` besides the files; multipart sends every one as a string."""

    prompt: Annotated[str, Meta(max_length=32000)] | None = None
    type: Literal["inpainting", "outpainting", "background_removal"] | None = None
    input_fidelity: Literal["low", "high"] | None = None
    strength: Annotated[float, Meta(gt=0, le=1)] | None = None
    loras: Annotated[list[LoraSpec], Meta(max_length=16)] | None = None
    """In the multipart form: one text part holding the JSON array."""


class ImageRef(msgspec.Struct, kw_only=True):
    """An input image of the JSON edit form: a ``data:`` or allowed http(s) URL (``file_id`` is not supported)."""

    image_url: str | None = None
    file_id: str | None = None


class ImageEditJsonRequest(ImageEditRequest, kw_only=True):
    """``POST /v1/images/edits`` as JSON (OpenAI's newer form): the images come as URLs."""

    images: Annotated[list[ImageRef], Meta(min_length=1)]
    mask: ImageRef | None = None


class ImageVariationRequest(_JobOptions, kw_only=True):
    """The fields of ``POST /v1/images/variations`` besides the image."""

    model: str | None = None
    n: Annotated[int, Meta(ge=1, le=10)] = 1
    size: str | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    fallbacks: Fallbacks | None = None
    stream: bool | None = False
    # Diffusion extensions.
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    output_format: OutputFormat | None = None


class InputTokensDetails(msgspec.Struct):
    text_tokens: int
    image_tokens: int = 0


class ImagesUsage(msgspec.Struct):
    """Token usage as OpenAI reports it for image models.

    ``input_tokens`` are the prompt's tokens as the model's tokenizer counts them; ``output_tokens`` are image
    tokens, one per 16x16 pixel patch of every returned image.
    """

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails


class ImageData(msgspec.Struct, omit_defaults=True):
    b64_json: bytes | UnsetType = UNSET
    """The image; JSON carries it base64-encoded (by :data:`encode_json`, in one pass)."""
    url: str | UnsetType = UNSET
    revised_prompt: str | UnsetType = UNSET


class ImagesResponse(msgspec.Struct, kw_only=True):
    created: int
    data: list[ImageData]
    size: str
    quality: str
    output_format: str
    background: str
    usage: ImagesUsage


class ImageGenPartialImageEvent(msgspec.Struct, kw_only=True):
    """``image_generation.partial_image`` (and ``image_edit.partial_image``, by ``type``)."""

    type: str
    b64_json: bytes
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str
    partial_image_index: int
    image_index: int
    """imagegate extension: which of the ``n`` images this partial belongs to."""


class ImageGenCompletedEvent(msgspec.Struct, kw_only=True):
    """``image_generation.completed``: one per image, with usage."""

    type: str
    b64_json: bytes
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str
    usage: ImagesUsage
    image_index: int
    """imagegate extension: which of the ``n`` images this is."""


class Model(msgspec.Struct, kw_only=True):
    """OpenAI's model, with what imagegate knows of it once a backend has said (extensions, else left out)."""

    id: str
    created: int
    object: str = "model"
    owned_by: str = "imagegate"
    family: str | UnsetType = UNSET
    tasks: list[str] | UnsetType = UNSET
    schedulers: list[str] | UnsetType = UNSET
    default_steps: int | UnsetType = UNSET
    default_guidance: float | UnsetType = UNSET
    lora: bool | UnsetType = UNSET
    """Its pipeline loads LoRA adapters (``loras`` on requests)."""


class ModelList(msgspec.Struct):
    data: list[Model]
    object: str = "list"


def _as_is(value: object) -> msgspec.Raw:
    if isinstance(value, Base64):  # a JSON string already: written as it is, not copied
        return msgspec.Raw(value.json)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


JSON = msgspec.json.Encoder(enc_hook=_as_is)
"""The encoder of every JSON body and event the API sends: ``bytes`` become base64, :class:`Base64` stays as is."""
encode_json = JSON.encode


class Framed:
    """A stream event an upstream API framed already (``event:`` and ``data:`` lines): sent on as it came."""

    __slots__ = ("frame", "type")

    def __init__(self, event_type: str, frame: bytes) -> None:
        self.type = event_type
        self.frame = frame


StreamEvent = ImageGenPartialImageEvent | ImageGenCompletedEvent


def checked_request(cls: type[T], **fields: object) -> T:
    """A request a dialect translated, built from ``fields`` and checked against its limits as a body would be.

    Raises:
        InvalidRequest: a value is out of range (steps, guidance, strength, seed, ...).
    """
    try:
        return msgspec.convert(fields, cls)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"Invalid value: {e}") from None
