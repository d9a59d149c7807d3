"""Stored LoRA adapters: a row each in the shared database, the file kept once by its SHA-256 in the data dir."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
from sqlalchemy import Row, delete, func, insert, select

from app.store.db import Database
from app.store.schema import adapters


class AdapterRecord(msgspec.Struct, kw_only=True):
    """An adapter of one base model; ``owner`` None: any principal that may use the model may use it."""

    id: str
    model: str
    name: str
    digest: str
    size: int
    source: str
    created_at: float
    trigger_word: str | None = None
    owner: str | None = None


def _record(row: Row | None) -> AdapterRecord | None:
    return None if row is None else AdapterRecord(**row._asdict())


class AdapterStore:
    def __init__(self, db: Database, directory: Path) -> None:
        self.db = db
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.directory / f"{digest}.safetensors"

    def add(self, record: AdapterRecord, file: Path) -> None:
        """Keep ``file`` under the record's digest (once, however many records share it) and store the record."""
        target = self.path(record.digest)
        if target.exists():
            file.unlink(missing_ok=True)
        else:
            os.replace(file, target)
        self.db.write(lambda c: c.execute(insert(adapters).values(msgspec.structs.asdict(record))))

    def get(self, adapter_id: str) -> AdapterRecord | None:
        return _record(self.db.reader.execute(select(adapters).where(adapters.c.id == adapter_id)).first())

    def list(self, model: str | None = None) -> list[AdapterRecord]:
        query = select(adapters).order_by(adapters.c.created_at)
        if model is not None:
            query = query.where(adapters.c.model == model)
        return [r for r in self.db.read(lambda c: [_record(row) for row in c.execute(query)]) if r is not None]

    def delete(self, adapter_id: str) -> AdapterRecord | None:
        """Delete the record, and its file when no other record shares it."""

        def go(conn) -> AdapterRecord | None:
            record = _record(
                conn.execute(delete(adapters).where(adapters.c.id == adapter_id).returning(*adapters.c)).first()
            )
            if record is not None:
                shared = conn.execute(select(func.count()).where(adapters.c.digest == record.digest)).scalar_one()
                if not shared:
                    self.path(record.digest).unlink(missing_ok=True)
            return record

        return self.db.write(go)
