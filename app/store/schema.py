"""Every table of the gateway's state, declared once with SQLAlchemy Core for SQLite and PostgreSQL alike.

Times are unix seconds (floats), structured values are JSON text: the same rows on both engines. The migrations in
``app/store/migrations`` create exactly these tables; a test compares the two.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

keys = Table(
    "keys",
    metadata,
    Column("id", String, primary_key=True),
    Column("alias", String, nullable=False),
    Column("digest", String, nullable=False, unique=True),
    Column("prefix", String, nullable=False),
    Column("models", Text, nullable=False),
    Column("rpm", Integer),
    Column("max_concurrent", Integer),
    Column("image_quota", Integer),
    Column("quota_period", String, nullable=False),
    Column("expires_at", Float),
    Column("active", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

usage = Table(
    "usage",
    metadata,
    Column("principal", String, primary_key=True),
    Column("hour", Integer, primary_key=True),
    Column("requests", Integer, nullable=False, server_default="0"),
    Column("images", Integer, nullable=False, server_default="0"),
    Column("pixel_steps", Integer, nullable=False, server_default="0"),
)

meta = Table(
    "meta",
    metadata,
    Column("name", String, primary_key=True),
    Column("value", Integer, nullable=False),
)
"""Counters; ``keys_version`` counts every change to keys, so caches elsewhere see revocations at once."""

jobs = Table(
    "jobs",
    metadata,
    Column("id", String, primary_key=True),
    Column("kind", String, nullable=False),
    Column("surface", String, nullable=False),
    Column("owner", String, nullable=False),
    Column("principal", Text, nullable=False),
    Column("model", String, nullable=False),
    Column("status", String, nullable=False),
    Column("request", Text, nullable=False),
    Column("inputs", Text, nullable=False),
    Column("n", Integer, nullable=False),
    Column("idempotency_key", String),
    Column("request_hash", String),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("lease_owner", String),
    Column("lease_expires_at", Float),
    Column("cancel_requested", Boolean, nullable=False, server_default="0"),
    Column("step", Integer),
    Column("total_steps", Integer),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("completed_at", Float),
    Column("deadline_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("error_code", String),
    Column("error_message", Text),
    Column("result", Text),
    Column("base_url", String, nullable=False),
    Column("webhook_url", Text),
    Column("webhook_events", Text),
    UniqueConstraint("owner", "idempotency_key", name="jobs_owner_idempotency_key"),
    Index("jobs_status_created", "status", "created_at"),
    Index("jobs_owner_created", "owner", "created_at"),
    Index("jobs_expires", "expires_at"),
)
"""One row per job, whatever its kind or the surface it came from; the request is stored whole, so it can rerun."""

job_events = Table(
    "job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String, nullable=False),
    Column("type", String, nullable=False),
    Column("data", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("job_events_job", "job_id", "id"),
)
"""What happened to a job, in order: replayed to an events stream that joins late."""

webhook_outbox = Table(
    "webhook_outbox",
    metadata,
    Column("id", String, primary_key=True),
    Column("job_id", String, nullable=False),
    Column("owner", String, nullable=False),
    Column("url", Text, nullable=False),
    Column("type", String, nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_owner", String),
    Column("lease_expires_at", Float),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("delivered_at", Float),
    Index("webhook_outbox_due", "status", "next_attempt_at"),
)
"""Deliveries, written in the same transaction as the job change they announce; sent by the background sender."""

webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("owner", String, nullable=False),
    Column("secret", String, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("retired_at", Float),
    Index("webhook_secrets_owner", "owner"),
)
"""Signing secrets per principal (``*`` for the server's own); a rotated secret still signs until ``retired_at``."""

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("url", Text, primary_key=True),
    Column("disabled_at", Float, nullable=False),
    Column("reason", Text, nullable=False),
)
"""URLs that answered 410 Gone: nothing more is sent to them."""

adapters = Table(
    "adapters",
    metadata,
    Column("id", String, primary_key=True),
    Column("model", String, nullable=False),
    Column("name", String, nullable=False),
    Column("trigger_word", String),
    Column("digest", String, nullable=False),
    Column("size", Integer, nullable=False),
    Column("owner", String),
    Column("source", String, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("adapters_model", "model"),
)
"""LoRA adapters of the base models, uploaded or trained; the file is kept by its digest, shared between rows."""

custom_models = Table(
    "custom_models",
    metadata,
    Column("id", String, primary_key=True),
    Column("owner", String, nullable=False),
    Column("display_name", String, nullable=False),
    Column("model_type", String),
    Column("base_model", String, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("deleted_at", Float),
    Index("custom_models_owner", "owner", "created_at"),
)
"""Custom models of seed 001, per principal; a deleted one keeps its row (``deleted_at``) for its history."""

training_images = Table(
    "training_images",
    metadata,
    Column("id", String, primary_key=True),
    Column("model_id", String, nullable=False),
    Column("file", String, nullable=False),
    Column("format", String, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("caption", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("training_images_model", "model_id", "created_at"),
)
"""A custom model's training images (the files in the data dir); deleting one removes it."""

trainings = Table(
    "trainings",
    metadata,
    Column("id", String, primary_key=True),
    Column("model_id", String, nullable=False),
    Column("trigger_word", String, nullable=False),
    Column("strength", Integer, nullable=False),
    Column("speed", String, nullable=False),
    Column("plan", Text, nullable=False),
    Column("adapter_id", String),
    Column("created_at", Float, nullable=False),
    Column("deleted_at", Float),
    Index("trainings_model", "model_id", "created_at"),
)
"""A training of a custom model; it runs as the job of the same id, and ends with its adapter (``adapter_id``)."""

predictions = Table(
    "predictions",
    metadata,
    Column("id", String, primary_key=True),
    Column("owner", String, nullable=False),
    Column("scale_configs", Text, nullable=False),
    Column("warnings", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("deleted_at", Float),
)
"""A prediction with custom models; it runs as the generation job of the same id."""
