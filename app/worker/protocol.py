"""The internal protocol between the gateway and its workers: msgspec only, no torch.

A generation is one HTTP request, ``POST /v1/generate`` with a msgpack-encoded :class:`GenerationParams` body. The
answer is a stream of length-prefixed msgpack frames, each one :data:`WorkerEvent`::

    [4-byte big-endian length][msgpack event] [4-byte length][msgpack event] ...

Images travel as raw bytes (msgpack ``bin``), never base64, so no hop pays for an encode it does not need. A stream
ends after :class:`Done` or :class:`Failed`; a stream that ends before either is a worker failure.
"""

from __future__ import annotations

import struct
from typing import Literal

import msgspec

CONTENT_TYPE = "application/x-imagegate-events"
TOKEN_HEADER = "x-imagegate-worker-token"
FRAME_HEADER = struct.Struct(">I")

OutputFormat = Literal["png", "jpeg", "webp"]

# Scheduler names requests and configs may use -> (diffusers class, extra config). Kept here, free of torch, so the
# gateway can validate names; the worker checks at start-up that each configured one works with its pipeline.
SCHEDULERS: dict[str, tuple[str, dict[str, object]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
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
}

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


class GenerationParams(msgspec.Struct, kw_only=True, frozen=True):
    """A validated text-to-image job, as the worker runs it."""

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

    @property
    def work(self) -> float:
        """Cost estimate used for routing: pixels x steps x images."""
        return float(self.width * self.height * self.steps * self.n)


class Started(msgspec.Struct, tag="started"):
    """The job left the worker's queue and is running; ``prompt_tokens`` is the tokenizer's count."""

    queue_seconds: float
    prompt_tokens: int = 0


class Progress(msgspec.Struct, tag="progress"):
    step: int
    total: int


class Partial(msgspec.Struct, tag="partial"):
    """A preview of image ``image_index``; ``partial_index`` counts from 0 per image."""

    image_index: int
    partial_index: int
    data: bytes


class Image(msgspec.Struct, tag="image"):
    index: int
    data: bytes
    seed: int


class Done(msgspec.Struct, tag="done"):
    seconds: float


class Failed(msgspec.Struct, tag="failed"):
    """The job failed; ``kind`` is one of the gateway's error kinds (see ``app.errors.from_worker``)."""

    message: str
    kind: Literal["invalid_request", "cancelled", "out_of_memory", "internal"] = "internal"
    param: str | None = None


WorkerEvent = Started | Progress | Partial | Image | Done | Failed

_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(WorkerEvent)
_params_decoder = msgspec.msgpack.Decoder(GenerationParams)


def encode_params(params: GenerationParams) -> bytes:
    return _encoder.encode(params)


def decode_params(data: bytes) -> GenerationParams:
    return _params_decoder.decode(data)


def encode_frame(event: WorkerEvent) -> bytes:
    payload = _encoder.encode(event)
    return FRAME_HEADER.pack(len(payload)) + payload


def decode_event(payload: bytes) -> WorkerEvent:
    return _event_decoder.decode(payload)


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
