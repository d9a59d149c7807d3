"""Custom models (seed 001) on the shared database: models, their training images, trainings and predictions.

A training and a prediction each run as the job of the same id (:mod:`app.store.jobs`); their rows here hold what
the job does not (the trigger word and plan, the warnings) and outlive the job's retention. Deletes are soft
(``deleted_at``) except for training images, whose files go with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from sqlalchemy import Connection, Row, and_, delete, func, insert, or_, select, update

from app.store.db import Database
from app.store.schema import adapters, custom_models, predictions, training_images, trainings


class CustomModelRecord(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    display_name: str
    model_type: str | None
    base_model: str
    created_at: float
    updated_at: float
    deleted_at: float | None = None


class TrainingImageRecord(msgspec.Struct, kw_only=True):
    id: str
    model_id: str
    file: str
    format: str
    width: int
    height: int
    size: int
    caption: str | None
    created_at: float
    updated_at: float


class TrainingRecord(msgspec.Struct, kw_only=True):
    id: str
    model_id: str
    trigger_word: str
    strength: int
    speed: str
    plan: str
    """The resolved hyperparameters (JSON of :class:`~app.worker.protocol.TrainingPlan`)."""
    created_at: float
    adapter_id: str | None = None
    deleted_at: float | None = None


class PredictionRecord(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    scale_configs: str
    warnings: list[str]
    created_at: float
    deleted_at: float | None = None


def _of(cls: type, row: Row | None) -> Any:
    if row is None:
        return None
    data = row._asdict()
    if cls is PredictionRecord:
        data["warnings"] = msgspec.json.decode(data["warnings"])
    return cls(**data)


def _values(record: msgspec.Struct) -> dict[str, Any]:
    values = msgspec.structs.asdict(record)
    if isinstance(record, PredictionRecord):
        values["warnings"] = msgspec.json.encode(record.warnings).decode()
    return values


class CustomModelStore:
    """The queries of the custom-models API; each method is one transaction (call them in a thread)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- models ----------------------------------------------------------------------------------------------------

    def add_model(self, record: CustomModelRecord) -> None:
        self.db.write(lambda c: c.execute(insert(custom_models).values(_values(record))))

    def model(self, model_id: str) -> CustomModelRecord | None:
        """The model, deleted or not."""
        query = select(custom_models).where(custom_models.c.id == model_id)
        return self.db.read(lambda c: _of(CustomModelRecord, c.execute(query).first()))

    def models(self, owner: str | None, after: CustomModelRecord | None, limit: int) -> list[CustomModelRecord]:
        """The owner's models not deleted (every owner's with None), newest first, after ``after``."""
        query = select(custom_models).where(custom_models.c.deleted_at.is_(None))
        if owner is not None:
            query = query.where(custom_models.c.owner == owner)
        if after is not None:
            query = query.where(
                or_(
                    custom_models.c.created_at < after.created_at,
                    and_(custom_models.c.created_at == after.created_at, custom_models.c.id < after.id),
                )
            )
        query = query.order_by(custom_models.c.created_at.desc(), custom_models.c.id.desc()).limit(limit)
        return self.db.read(lambda c: [_of(CustomModelRecord, r) for r in c.execute(query)])

    def update_model(self, model_id: str, **values: Any) -> CustomModelRecord | None:
        """Change a model that is not deleted; None if there is none."""
        statement = (
            update(custom_models)
            .where(custom_models.c.id == model_id, custom_models.c.deleted_at.is_(None))
            .values(values)
            .returning(*custom_models.c)
        )
        return self.db.write(lambda c: _of(CustomModelRecord, c.execute(statement).first()))

    # -- training images -------------------------------------------------------------------------------------------

    def add_image(self, record: TrainingImageRecord) -> None:
        self.db.write(lambda c: c.execute(insert(training_images).values(_values(record))))

    def images(self, model_id: str) -> list[TrainingImageRecord]:
        query = (
            select(training_images)
            .where(training_images.c.model_id == model_id)
            .order_by(training_images.c.created_at, training_images.c.id)
        )
        return self.db.read(lambda c: [_of(TrainingImageRecord, r) for r in c.execute(query)])

    def count_images(self, model_id: str) -> int:
        query = select(func.count()).select_from(training_images).where(training_images.c.model_id == model_id)
        return self.db.read(lambda c: c.execute(query).scalar_one())

    def image(self, model_id: str, data_id: str) -> TrainingImageRecord | None:
        query = select(training_images).where(training_images.c.id == data_id, training_images.c.model_id == model_id)
        return self.db.read(lambda c: _of(TrainingImageRecord, c.execute(query).first()))

    def replace_image(self, record: TrainingImageRecord) -> TrainingImageRecord | None:
        """Put ``record`` in place of the image of its id; returns the one replaced (None: there was none)."""

        def go(conn: Connection) -> TrainingImageRecord | None:
            where = and_(training_images.c.id == record.id, training_images.c.model_id == record.model_id)
            old = _of(TrainingImageRecord, conn.execute(select(training_images).where(where)).first())
            if old is not None:
                values = _values(record)
                values.pop("created_at")
                conn.execute(update(training_images).where(where).values(values))
            return old

        return self.db.write(go)

    def delete_image(self, model_id: str, data_id: str) -> TrainingImageRecord | None:
        where = and_(training_images.c.id == data_id, training_images.c.model_id == model_id)
        statement = delete(training_images).where(where).returning(*training_images.c)
        return self.db.write(lambda c: _of(TrainingImageRecord, c.execute(statement).first()))

    # -- trainings -------------------------------------------------------------------------------------------------

    @staticmethod
    def add_training(record: TrainingRecord) -> Callable[[Connection], None]:
        """Writes the training's row: in the transaction that queues its job."""
        return lambda conn: conn.execute(insert(trainings).values(_values(record)))

    def training(self, training_id: str) -> TrainingRecord | None:
        query = select(trainings).where(trainings.c.id == training_id)
        return self.db.read(lambda c: _of(TrainingRecord, c.execute(query).first()))

    def trainings(self, model_id: str) -> list[TrainingRecord]:
        """The model's trainings not deleted, newest first."""
        query = (
            select(trainings)
            .where(trainings.c.model_id == model_id, trainings.c.deleted_at.is_(None))
            .order_by(trainings.c.created_at.desc(), trainings.c.id.desc())
        )
        return self.db.read(lambda c: [_of(TrainingRecord, r) for r in c.execute(query)])

    def latest_trained(self, model_id: str) -> TrainingRecord | None:
        """The model's newest training with an adapter (a deleted training's adapter still serves its model)."""
        query = (
            select(trainings)
            .where(trainings.c.model_id == model_id, trainings.c.adapter_id.is_not(None))
            .order_by(trainings.c.created_at.desc(), trainings.c.id.desc())
            .limit(1)
        )
        return self.db.read(lambda c: _of(TrainingRecord, c.execute(query).first()))

    def delete_training(self, training_id: str, now: float) -> None:
        self.db.write(
            lambda c: c.execute(update(trainings).where(trainings.c.id == training_id).values(deleted_at=now))
        )

    @staticmethod
    def trained(training_id: str, adapter: dict[str, Any]) -> Callable[[Connection], None]:
        """Writes a training's adapter and links it: in the transaction that ends the training's job."""

        def go(conn: Connection) -> None:
            conn.execute(insert(adapters).values(adapter))
            conn.execute(update(trainings).where(trainings.c.id == training_id).values(adapter_id=adapter["id"]))

        return go

    # -- predictions -----------------------------------------------------------------------------------------------

    @staticmethod
    def add_prediction(record: PredictionRecord) -> Callable[[Connection], None]:
        """Writes the prediction's row: in the transaction that queues its job."""
        return lambda conn: conn.execute(insert(predictions).values(_values(record)))

    def prediction(self, prediction_id: str) -> PredictionRecord | None:
        query = select(predictions).where(predictions.c.id == prediction_id)
        return self.db.read(lambda c: _of(PredictionRecord, c.execute(query).first()))

    def delete_prediction(self, prediction_id: str, now: float) -> None:
        self.db.write(
            lambda c: c.execute(update(predictions).where(predictions.c.id == prediction_id).values(deleted_at=now))
        )
