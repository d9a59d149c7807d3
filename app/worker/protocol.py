"""The internal protocol between the gateway and its workers: msgspec only, no torch.

A job is one HTTP request, ``POST /v1/generate``. Its body is one length-prefixed msgpack :class:`GenerationParams`
followed by the raw bytes of the input image and mask, if any (``image_bytes`` and ``mask_bytes`` long), so an
upload streams through the gateway instead of being held in its memory. The answer is a stream of length-prefixed
msgpack frames, each one :data:`WorkerEvent`::

    [4-byte big-endian length][msgpack event] [4-byte length][msgpack event] ...

Images travel as raw bytes (msgpack ``bin`` or the body itself), never base64, so no hop pays for an encode it does
not need (images an upstream API sent as base64 stay so, as :class:`Base64`, on their way through the gateway). A
stream ends after :class:`Done` or :class:`Failed`; a stream that ends before either is a worker failure.
"""

from __future__ import annotations

import binascii
import random
import string
import struct
from typing import Literal

import msgspec

CONTENT_TYPE = "application/x-imagegate-events"
TOKEN_HEADER = "x-imagegate-worker-token"
FRAME_HEADER = struct.Struct(">I")

OutputFormat = Literal["png", "jpeg", "webp"]
Task = Literal["text2img", "img2img", "inpaint", "outpaint", "background_removal"]
TASKS: tuple[str, ...] = ("text2img", "img2img", "inpaint", "outpaint", "background_removal")

# Scheduler names requests and configs may use -> (diffusers class, extra config). Kept here, free of torch, so the
# gateway can validate names; the worker checks at start-up that each configured one works with its pipeline.
SCHEDULERS: dict[str, tuple[str, dict[str, object]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD ships it: PRK steps break short schedules
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    # Flow matching (velocity models); the UniPC and DPM-Solver++ variants take the model's shift as flow_shift.
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow_unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "flow_dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}

DIFFUSION_SCHEDULERS = (
    "ddim",
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "pndm",
    "lms",
    "heun",
    "unipc",
    "ddpm",
)
"""The samplers offered for ε- and v-prediction models (SD 1.x/2.x, SDXL, PixArt, HunyuanDiT) by default."""
FLOW_SCHEDULERS = ("flow_euler", "flow_heun", "flow_unipc", "flow_dpmpp_2m")
"""The samplers offered for flow-matching (velocity) models (SD3, FLUX, Qwen-Image, Sana, ...) by default."""

TORCHAO_CONFIGS = {
    "int8wo": "Int8WeightOnlyConfig",
    "int8dq": "Int8DynamicActivationInt8WeightConfig",
    "int4wo": "Int4WeightOnlyConfig",
    "float8wo": "Float8WeightOnlyConfig",
    "float8dq": "Float8DynamicActivationFloat8WeightConfig",
}
"""``quantization = "torchao:<kind>"`` kinds -> the torchao config class each stands for (named here, free of torch,
so the gateway's settings can check them)."""

# Diffusers class names are accepted too (several serving APIs use them); the first short name wins.
SCHEDULER_ALIASES: dict[str, str] = {}
for _name, (_cls, _extra) in SCHEDULERS.items():
    SCHEDULER_ALIASES.setdefault(_cls.lower(), _name)


def canonical_scheduler(name: str) -> str | None:
    """The short name for a scheduler name or diffusers class name, or None if unknown."""
    key = name.strip().lower()
    if key in SCHEDULERS:
        return key
    return SCHEDULER_ALIASES.get(key)


def parse_size(size: str) -> tuple[int, int]:
    """Parse ``"WxH"`` into ``(width, height)``.

    Raises:
        ValueError: not two positive integers joined by ``x``.
    """
    w, sep, h = size.strip().lower().partition("x")
    if not sep or not (w + h).isascii() or not w.isdigit() or not h.isdigit() or int(w) <= 0 or int(h) <= 0:
        raise ValueError(f"invalid size {size!r}")
    return int(w), int(h)


def preview_steps(steps: int, count: int) -> list[int]:
    """The 1-based steps after which the ``count`` partial images are taken, evenly spaced before the end.

    With fewer steps than partial images some positions coincide; every partial image is still sent.
    """
    return [max(1, min(steps, round(steps * (j + 1) / (count + 1)))) for j in range(count)]


class LoraRef(msgspec.Struct, frozen=True):
    """A LoRA adapter to apply, by the SHA-256 of its file, at ``scale`` (0: no effect)."""

    digest: str
    scale: float


Preset = Literal["fast", "high_quality"]

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
"""What ``trainingSpeed`` stands for; :func:`plan` turns one into concrete hyperparameters."""


class TrainingPlan(msgspec.Struct, frozen=True, kw_only=True):
    """The resolved hyperparameters of one LoRA training (returned with the training, so users see what ran)."""

    rank: int
    alpha: int
    steps: int
    learning_rate: float
    resolution: int
    batch_size: int
    checkpoint_every: int


def plan(
    preset: Preset,
    images: int,
    strength: float,
    native_side: int,
    *,
    max_steps: int | None = None,
    resolution: int | None = None,
) -> TrainingPlan:
    """The hyperparameters of ``preset`` for ``images`` training images at ``strength`` (0-10, 5 is the preset).

    Steps grow with the number of images (``steps_per_image``, within the preset's bounds); ``strength`` scales
    the learning rate and the steps by ``2 ** ((strength - 5) / 5)``, so 0 halves both, 10 doubles both: how far
    the adapter moves towards the training images. ``resolution`` is the model's native side times the preset's
    ``scale``, on a multiple of 64 (or the ``resolution`` given). ``max_steps`` caps the steps (small devices,
    demos, tests). A checkpoint is written every quarter of the steps (at most every 100).
    """
    if not 0 <= strength <= 10:
        raise ValueError("strength must be within 0-10")
    p = PRESETS[preset]
    factor = 2 ** ((strength - 5) / 5)
    steps = min(max(p["min_steps"], p["steps_per_image"] * images), p["max_steps"])
    steps = max(1, round(steps * factor))
    if max_steps is not None:
        steps = min(steps, max_steps)
    rank = int(p["rank"])
    return TrainingPlan(
        rank=rank,
        alpha=rank,
        steps=steps,
        learning_rate=p["learning_rate"] * factor,
        resolution=resolution or max(64, int(native_side * p["scale"]) // 64 * 64),
        batch_size=1,
        checkpoint_every=max(1, min(100, steps // 4)),
    )


def trigger_word(rng: random.Random | None = None) -> str:
    """A made-up token such as ``FJA90AB``: three letters, two digits, two letters (no word the model knows)."""
    rng = rng or random.SystemRandom()
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


class TrainingParams(msgspec.Struct, kw_only=True, frozen=True):
    """A LoRA training, as the worker runs it (``POST /v1/train``).

    The body is the length-prefixed params, then each training image (``image_bytes`` long, in order), then the
    checkpoint to resume from (``checkpoint_bytes`` long; 0: start afresh). The answer is an event stream:
    :class:`Started`, :class:`TrainingStep` per step, :class:`Checkpoint` per checkpoint (the gateway keeps the
    last), :class:`Partial` previews every ``preview_every`` steps (``partial_index`` is the step), then
    :class:`AdapterFile` and :class:`Done`, or :class:`Failed`.
    """

    model: str
    plan: TrainingPlan
    seed: int
    trigger_word: str
    captions: list[str]
    """One per training image: the trigger word and the image's own caption (see :func:`caption`)."""
    image_bytes: list[int]
    checkpoint_bytes: int = 0
    preview_every: int = 0
    preview_prompt: str = ""
    request_id: str = ""


class GenerationParams(msgspec.Struct, kw_only=True, frozen=True):
    """A validated job, as the worker runs it.

    ``text2img`` draws from the prompt; ``img2img`` redraws the input image at ``strength``; ``inpaint`` redraws
    where the mask says (white: redraw); ``outpaint`` places the image in the middle of a ``width`` x ``height``
    canvas and draws the rest (plus the masked area, if a mask came); ``background_removal`` makes the background
    transparent. ``width`` and ``height`` are always the output size.
    """

    model: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    """Seed of image 0; image ``i`` of the request uses ``seed + i``."""
    n: int = 1
    negative_prompt: str | None = None
    scheduler: str | None = None
    partial_images: int = 0
    output_format: OutputFormat = "png"
    output_compression: int | None = None
    request_id: str = ""
    task: Task = "text2img"
    strength: float | None = None
    image_bytes: int = 0
    """Length of the input image that follows the params in the request body."""
    mask_bytes: int = 0
    """Length of the mask (PNG with alpha, or greyscale: white = redraw) that follows the image."""
    loras: tuple[LoraRef, ...] = ()
    """Adapters to run with, in order; their files reach the worker before the job (``PUT /adapters/{digest}``)."""
    clip_skip: int | None = None
    """Text-encoder layers to skip from the end (diffusers' count: 1 is the layer before the last; None: none)."""
    safety: Literal["auto", "black", "blur", "pixelate", "sensitive_content_text"] | None = None
    """Run the model's NSFW checker and treat flagged images so (``auto``: black them out if it has a checker)."""

    @property
    def work(self) -> float:
        """Cost estimate used for routing: pixels x denoising steps actually run x images."""
        steps = self.steps * (self.strength if self.task == "img2img" and self.strength is not None else 1.0)
        return float(self.width * self.height * max(steps, 1.0) * self.n)


class Started(msgspec.Struct, tag="started"):
    """The job left the worker's queue and is running; ``prompt_tokens`` is the tokenizer's count.

    ``batch_size`` counts the requests sharing its pipeline call (1 when it runs alone).
    """

    queue_seconds: float
    prompt_tokens: int = 0
    batch_size: int = 1


class Progress(msgspec.Struct, tag="progress"):
    step: int
    total: int


class Base64:
    """An image still in base64, as an upstream API sent it: the JSON string, quotes included (never on the wire).

    It holds a view into the answer it came in and goes on to the client's JSON as it came, unless something needs
    the image itself (:func:`image_bytes`): a relayed answer then costs no copy, no decode and no encode of megabytes.
    """

    __slots__ = ("json",)

    def __init__(self, json: bytes | memoryview) -> None:
        """``json``: a JSON string of plain, padded base64 (no escapes), quotes included."""
        self.json = json


def image_bytes(data: bytes | memoryview | Base64) -> bytes | memoryview:
    """The image itself, from the ``data`` of a :class:`Partial` or :class:`Image`."""
    return binascii.a2b_base64(memoryview(data.json)[1:-1]) if isinstance(data, Base64) else data


class Partial(msgspec.Struct, tag="partial"):
    """A preview of image ``image_index``; ``partial_index`` counts from 0 per image.

    ``data`` is the encoded image: bytes where it is made; decoded from a frame, a view into that frame (not copied
    on its way to the client's JSON, which base64-encodes it straight into the event).
    """

    image_index: int
    partial_index: int
    data: memoryview


class Image(msgspec.Struct, tag="image"):
    """A final image; ``data`` as in :class:`Partial`."""

    index: int
    data: memoryview
    seed: int
    nsfw: bool = False
    """The safety checker flagged it (and it was treated as the job asked)."""


class RelayedPartial(Partial):
    """A :class:`Partial` an upstream API streamed, with its SSE frame as it came (``event:`` and ``data:``).

    Never on the worker wire: the gateway's stream passes ``frame`` on unchanged where the event needs no change.
    """

    frame: bytes = b""


class RelayedImage(Image):
    """An :class:`Image` an upstream API streamed, with its SSE frame as it came (see :class:`RelayedPartial`)."""

    frame: bytes = b""


class Done(msgspec.Struct, tag="done"):
    seconds: float


class Failed(msgspec.Struct, tag="failed"):
    """The job failed; ``kind`` is one of the gateway's error kinds (see ``app.errors.from_worker``)."""

    message: str
    kind: Literal["invalid_request", "cancelled", "out_of_memory", "generation_failed", "internal"] = "internal"
    param: str | None = None


class TrainingStep(msgspec.Struct, tag="training_step"):
    """A training's optimiser step ``step`` of ``total`` ended with ``loss``."""

    step: int
    total: int
    loss: float


class Checkpoint(msgspec.Struct, tag="checkpoint"):
    """The training's state after ``step`` steps (a ``torch.save`` file): a rerun sent it resumes from there."""

    step: int
    data: bytes


class AdapterFile(msgspec.Struct, tag="adapter"):
    """The trained LoRA adapter (safetensors, diffusers' naming), sent once before :class:`Done`."""

    data: bytes


WorkerEvent = Started | Progress | Partial | Image | Done | Failed | TrainingStep | Checkpoint | AdapterFile

_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(WorkerEvent)
_params_decoder = msgspec.msgpack.Decoder(GenerationParams)
_training_decoder = msgspec.msgpack.Decoder(TrainingParams)


def encode_params(params: GenerationParams | TrainingParams) -> bytes:
    """The head of a job's request body: the length-prefixed params (the image and mask bytes follow)."""
    payload = _encoder.encode(params)
    return FRAME_HEADER.pack(len(payload)) + payload


def decode_params(payload: bytes) -> GenerationParams:
    return _params_decoder.decode(payload)


def decode_training(payload: bytes) -> TrainingParams:
    return _training_decoder.decode(payload)


def encode_frame(event: WorkerEvent) -> bytes:
    payload = _encoder.encode(event)
    return FRAME_HEADER.pack(len(payload)) + payload


def decode_event(payload: bytes) -> WorkerEvent:
    return _event_decoder.decode(payload)


class ModelDetails(msgspec.Struct, kw_only=True):
    """What a worker found out about a model when it loaded it."""

    family: str
    schedulers: list[str]
    """Scheduler names that ran with it at start-up."""
    default_steps: int | None = None
    """The family's steps for requests that name none (None: no family default)."""
    default_guidance: float | None = None
    lora: bool = False
    """Its pipeline loads LoRA adapters."""
    safety_checker: bool = False
    """It has an NSFW checker that requests may ask for."""
    clip_skip: bool = False
    """Its pipeline can skip text-encoder layers (``clip_skip``)."""
    trainable: bool = False
    """This worker can train LoRA adapters for it (a UNet model with one text encoder)."""
    native_side: int = 512
    """The side, in pixels, the model was trained at (what training resolutions derive from)."""


class HealthInfo(msgspec.Struct, kw_only=True):
    """``GET /health`` of a worker."""

    status: Literal["loading", "ready", "failed"]
    device: str
    models: list[str]
    queued: int = 0
    running: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    error: str | None = None
    tasks: dict[str, list[str]] = msgspec.field(default_factory=dict)
    """Model -> the tasks this worker can run for it."""
    details: dict[str, ModelDetails] = msgspec.field(default_factory=dict)
    """Model -> its family, schedulers and defaults (workers only; upstreams do not say)."""
    training: bool = False
    """A LoRA training runs on it now (inference waits between its steps)."""
