"""Wire types of the custom-models API (seed 001, ``/custom-models/v1``), with the seed's field names exactly.

The seed names its fields in camelCase (``displayName``, ``trainingStrength``, ``scaleConfigs``, ...) except a
prediction's generation parameters, which it names in snake_case (``image_size``, ``num_images``, ...); both are kept.
Trainings and predictions report the seed's four statuses.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.protocol.images import MAX_LORA_SCALE, MAX_SEED

Status = Literal["processing", "succeeded", "failed", "canceled"]
TrainingSpeed = Literal["fast", "high_quality"]
Name = Annotated[str, Meta(min_length=1, max_length=200)]

# -- models ----------------------------------------------------------------------------------------------------------


class CreateModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    displayName: Name
    customModelType: Annotated[str, Meta(max_length=100)] | None = None
    """Reserved for future use (the seed's words); kept and shown as sent."""


class RenameModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    updatedDisplayName: Name


class CustomModel(msgspec.Struct, kw_only=True):
    id: str
    displayName: str
    customModelType: str | None
    baseModel: str
    """The served model its trainings adapt."""
    imageCount: int
    latestTrainingId: str | None
    """Its newest training that succeeded: what a prediction naming only the model uses."""
    createdAt: int
    updatedAt: int


class CustomModelList(msgspec.Struct, kw_only=True):
    data: list[CustomModel]
    nextCursor: str | None
    """Pass as ``cursor`` for the next page; None on the last."""


class Deleted(msgspec.Struct, kw_only=True):
    id: str
    deleted: bool = True


# -- training images -------------------------------------------------------------------------------------------------


class DataCreated(msgspec.Struct, kw_only=True):
    dataId: str


class TrainingImage(msgspec.Struct, kw_only=True, omit_defaults=True):
    dataId: str
    format: Literal["png", "jpeg", "webp"]
    width: int
    height: int
    size: int
    caption: str | None
    createdAt: int
    updatedAt: int
    dataUrl: str | UnsetType = UNSET
    """The image itself as a ``data:`` URL (on ``GET`` of one image)."""


# -- trainings -------------------------------------------------------------------------------------------------------


class StartTraining(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    trainingStrength: Annotated[int, Meta(ge=0, le=10)] = 5
    trainingSpeed: TrainingSpeed = "fast"


class Hyperparameters(msgspec.Struct, kw_only=True):
    """What ``trainingSpeed`` and ``trainingStrength`` resolved to for this training's images."""

    rank: int
    alpha: int
    steps: int
    learningRate: float
    resolution: int
    batchSize: int
    checkpointEvery: int


class TrainingStarted(msgspec.Struct, kw_only=True):
    trainingId: str
    status: Status
    triggerWord: str
    hyperparameters: Hyperparameters


class TrainingSummary(msgspec.Struct, kw_only=True):
    id: str
    status: Status


class Progress(msgspec.Struct, kw_only=True):
    step: int
    total: int
    percent: int
    loss: float | None
    etaSeconds: float | None


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: str
    message: str


class Training(msgspec.Struct, kw_only=True):
    id: str
    modelId: str
    status: Status
    triggerWord: str
    trainingStrength: int
    trainingSpeed: TrainingSpeed
    hyperparameters: Hyperparameters
    imageCount: int
    progress: Progress | None
    previewImages: list[str]
    """``data:`` URLs of the preview images drawn so far (``training.preview_every``), oldest first."""
    attempts: int
    error: ErrorInfo | None
    createdAt: int
    completedAt: int | None


# -- predictions -----------------------------------------------------------------------------------------------------


class ScaleConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    modelId: Annotated[str, Meta(min_length=1, max_length=200)]
    scale: Annotated[float, Meta(ge=0, le=MAX_LORA_SCALE)] = 1.0
    trainingId: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    """A training of the model that succeeded; none: its newest that did."""


class ImageSize(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    width: Annotated[int, Meta(ge=512, le=1536)]
    height: Annotated[int, Meta(ge=512, le=1536)]


class CreatePrediction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    scaleConfigs: Annotated[dict[str, ScaleConfig], Meta(min_length=1)]
    """Models (and trainings) to combine, keyed by ordinal strings ``"1"``, ``"2"``, ..., each with its weight."""
    prompt: Annotated[str, Meta(min_length=1, max_length=4000)]
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    image_size: ImageSize | None = None
    num_images: Annotated[int, Meta(ge=1, le=4)] = 1
    output_format: Literal["jpeg", "png"] = "png"
    guidance_scale: Annotated[float, Meta(ge=0, le=10)] | None = None
    num_inference_steps: Annotated[int, Meta(ge=1, le=50)] | None = None


class PredictionCreated(msgspec.Struct, kw_only=True):
    predictionId: str
    warnings: list[str]
    """E.g. a prompt without the trigger word of a selected model (it still runs, with the adapter barely active)."""


class Prediction(msgspec.Struct, kw_only=True):
    id: str
    status: Status
    outputImages: list[str]
    """Signed URLs of the images, once it succeeded (valid until ``expiresAt``)."""
    warnings: list[str]
    progress: Progress | None
    error: ErrorInfo | None
    createdAt: int
    completedAt: int | None
    expiresAt: int
