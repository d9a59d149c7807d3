"""Wire types of the admin API."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

QuotaPeriod = Literal["hour", "day", "month"]
MAX_LIMIT = 1_000_000_000
Limit = Annotated[int, Meta(ge=0, le=MAX_LIMIT)]


class KeyCreate(msgspec.Struct, kw_only=True):
    alias: Annotated[str, Meta(min_length=1, max_length=200)]
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    rpm: Limit | None = None
    max_concurrent: Limit | None = None
    image_quota: Limit | None = None
    quota_period: QuotaPeriod = "day"
    expires_at: str | None = None
    """ISO 8601 time after which the key stops working."""
    active: bool = True


class KeyUpdate(msgspec.Struct, kw_only=True):
    """Only the fields present change; ``null`` clears a limit."""

    alias: Annotated[str, Meta(min_length=1, max_length=200)] | UnsetType = UNSET
    models: list[str] | UnsetType = UNSET
    rpm: Limit | UnsetType | None = UNSET
    max_concurrent: Limit | UnsetType | None = UNSET
    image_quota: Limit | UnsetType | None = UNSET
    quota_period: QuotaPeriod | UnsetType = UNSET
    expires_at: str | UnsetType | None = UNSET
    active: bool | UnsetType = UNSET


class KeyUsage(msgspec.Struct):
    requests: int
    images: int
    pixel_steps: int


class KeyView(msgspec.Struct, kw_only=True):
    id: str
    alias: str
    prefix: str
    """The first characters of the key, to recognise it; the key itself is never shown again."""
    models: list[str]
    rpm: int | None
    max_concurrent: int | None
    image_quota: int | None
    quota_period: str
    expires_at: str | None
    active: bool
    created_at: str
    revoked_at: str | None
    usage: KeyUsage
    """Since the key was created."""
    period_usage: KeyUsage
    """In the current quota period."""


class CreatedKey(KeyView, kw_only=True):
    key: str
    """The secret: shown this once."""


class KeyList(msgspec.Struct):
    data: list[KeyView]
    object: str = "list"


class AdapterView(msgspec.Struct, kw_only=True):
    """A LoRA adapter of one base model; ``owner`` null: any key that may use the model may apply it."""

    id: str
    object: Literal["adapter"] = "adapter"
    model: str
    name: str
    trigger_word: str | None
    digest: str
    """SHA-256 of the file: how workers keep and load it."""
    size: int
    owner: str | None
    source: Literal["config", "upload", "training"]
    created_at: int


class AdapterList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[AdapterView]
