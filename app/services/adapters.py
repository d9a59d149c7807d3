"""LoRA adapters the gateway can apply: the files of each model's ``adapters_dir``, and those an admin uploaded.

An adapter belongs to one base model. Its id is, for a configured file, the file name without ``.safetensors``; for
an upload, ``ad_…`` given at upload. On the wire to workers it is the SHA-256 of its bytes, which is how workers
keep and load it (:mod:`app.worker.adapters`). Requests choose adapters with ``loras: [{"id", "scale"}]``;
:meth:`AdapterRegistry.resolve` checks them against the request's model and principal before anything runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from app.auth.principals import Principal
from app.config import Settings
from app.errors import InvalidRequest, NotFound, PayloadTooLarge, PermissionDenied
from app.protocol.admin import AdapterList, AdapterView
from app.protocol.images import LoraSpec
from app.store.adapters import AdapterRecord, AdapterStore
from app.worker.protocol import LoraRef

log = logging.getLogger("imagegate.adapters")

MAX_HEADER = 100_000_000


class NotAnAdapter(ValueError):
    """The file is not a safetensors file of LoRA weights."""


def check_lora(path: Path) -> None:
    """Read a safetensors header (8-byte length, JSON) and check that it names LoRA weights.

    Raises:
        NotAnAdapter: it is not safetensors, or has no LoRA tensors (peft, diffusers or kohya names).
    """
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise NotAnAdapter("it is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= MAX_HEADER:
            raise NotAnAdapter("it is not a safetensors file")
        try:
            names = json.loads(f.read(length))
        except ValueError:
            raise NotAnAdapter("it is not a safetensors file: its header is not JSON") from None
    if not isinstance(names, dict) or not any("lora" in name.lower() for name in names if name != "__metadata__"):
        raise NotAnAdapter("it holds no LoRA weights")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _view(record: AdapterRecord) -> AdapterView:
    return AdapterView(
        id=record.id,
        model=record.model,
        name=record.name,
        trigger_word=record.trigger_word,
        digest=record.digest,
        size=record.size,
        owner=record.owner,
        source=record.source,  # type: ignore[arg-type]
        created_at=int(record.created_at),
    )


class AdapterRegistry:
    """Every adapter by model: configured files (in memory, found at start) and stored uploads (in the database)."""

    def __init__(
        self, settings: Settings, store: AdapterStore | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.configured: dict[tuple[str, str], AdapterRecord] = {}
        self._files: dict[str, Path] = {}

    def scan(self) -> None:
        """Register each model's adapter files (blocking: it reads them to take their digests)."""
        for model in self.settings.resolved_models():
            if not model.adapters_dir:
                continue
            for path in sorted(Path(model.adapters_dir).expanduser().glob("*.safetensors")):
                try:
                    check_lora(path)
                    digest, stat = file_digest(path), path.stat()
                except (NotAnAdapter, OSError) as e:
                    log.warning("skipping %s: %s", path, e)
                    continue
                record = AdapterRecord(
                    id=path.stem,
                    model=model.name,
                    name=path.stem,
                    digest=digest,
                    size=stat.st_size,
                    source="config",
                    created_at=stat.st_mtime,
                )
                self.configured[(model.name, record.id)] = record
                self._files[digest] = path
            log.info("model %s: %d configured LoRA adapters", model.name, len(self._of_config(model.name)))

    def _of_config(self, model: str) -> list[AdapterRecord]:
        return [a for (m, _), a in self.configured.items() if m == model]

    def file(self, digest: str) -> Path:
        """The file of an adapter by digest (what worker clients send)."""
        if digest in self._files:
            return self._files[digest]
        if self.store is None:
            raise FileNotFoundError(digest)
        return self.store.path(digest)

    # -- choosing adapters ----------------------------------------------------------------------------------------

    def _find(self, model: str, adapter_id: str) -> AdapterRecord | None:
        configured = self.configured.get((model, adapter_id))
        if configured is not None:
            return configured
        stored = self.store.get(adapter_id) if self.store is not None else None
        if stored is None:
            other = next((m for (m, i) in self.configured if i == adapter_id), None)
            return None if other is None else self.configured[(other, adapter_id)]
        return stored

    def resolve(
        self, model: str, specs: Sequence[LoraSpec] | None, principal: Principal, *, supported: bool | None
    ) -> tuple[LoraRef, ...]:
        """The adapters a request asked for, as the worker applies them.

        Args:
            model: the request's model.
            specs: the request's ``loras``.
            principal: who asks (an adapter with an owner is that owner's, and admins').
            supported: whether the model's pipeline loads LoRA (None: no worker has said yet).

        Raises:
            InvalidRequest: too many, one named twice, an unknown one or one of another model, or a model that
                cannot apply adapters (``param: loras``).
            PermissionDenied: an adapter of another principal.
        """
        if not specs:
            return ()
        if supported is False:
            raise InvalidRequest(f"The model '{model}' cannot apply LoRA adapters.", param="loras", code="unsupported")
        if len(specs) > self.settings.max_loras:
            raise InvalidRequest(f"At most {self.settings.max_loras} LoRA adapters per request.", param="loras")
        refs = []
        for spec in specs:
            adapter = self._find(model, spec.id)
            if adapter is None or (adapter.owner not in (None, principal.id) and not principal.admin):
                if adapter is not None:
                    raise PermissionDenied(
                        f"This key may not use the LoRA adapter '{spec.id}'.", param="loras", code="adapter_not_allowed"
                    )
                raise InvalidRequest(
                    f"The LoRA adapter '{spec.id}' does not exist.", param="loras", code="adapter_not_found"
                )
            if adapter.model != model:
                raise InvalidRequest(
                    f"The LoRA adapter '{spec.id}' is for '{adapter.model}', not '{model}'.",
                    param="loras",
                    code="adapter_not_found",
                )
            refs.append(LoraRef(digest=adapter.digest, scale=spec.scale))
        if len({r.digest for r in refs}) < len(refs):
            raise InvalidRequest("A LoRA adapter is named twice; give each once with its scale.", param="loras")
        return tuple(refs)

    # -- listing and managing -------------------------------------------------------------------------------------

    async def visible(self, principal: Principal, model: str | None = None) -> AdapterList:
        """The adapters the principal may apply (of models it may use), configured ones first."""
        stored = await asyncio.to_thread(self.store.list, model) if self.store is not None else []
        records = [*self.configured.values(), *stored]
        return AdapterList(
            data=[
                _view(r)
                for r in records
                if (model is None or r.model == model)
                and principal.allows(r.model)
                and (r.owner in (None, principal.id) or principal.admin)
            ]
        )

    async def upload(
        self,
        body: AsyncIterator[bytes],
        *,
        model: str,
        name: str | None,
        trigger_word: str | None,
        owner: str | None,
        limit: int,
    ) -> AdapterView:
        """Store an uploaded adapter file of ``model`` (checked: safetensors with LoRA weights, at most ``limit``).

        Raises:
            NotFound: the model is not served. InvalidRequest: not an adapter. PayloadTooLarge: over ``limit``.
        """
        if self.store is None:
            raise InvalidRequest("This server keeps no uploaded adapters.")
        if self.settings.model(model) is None:
            raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
        fd, name_tmp = tempfile.mkstemp(dir=self.store.directory, prefix=".upload-")
        tmp = Path(name_tmp)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in body:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"An adapter file may be at most {limit} bytes.")
                    digest.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
            try:
                await asyncio.to_thread(check_lora, tmp)
            except NotAnAdapter as e:
                raise InvalidRequest(f"The upload is not a LoRA adapter: {e}.", param="file") from None
            record = AdapterRecord(
                id=f"ad_{secrets.token_hex(8)}",
                model=model,
                name=name or "adapter",
                digest=digest.hexdigest(),
                size=size,
                source="upload",
                created_at=self.clock(),
                trigger_word=trigger_word,
                owner=owner,
            )
            await asyncio.to_thread(self.store.add, record, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return _view(record)

    async def show(self, adapter_id: str) -> AdapterView:
        record = next((a for a in self.configured.values() if a.id == adapter_id), None)
        if record is None and self.store is not None:
            record = await asyncio.to_thread(self.store.get, adapter_id)
        if record is None:
            raise NotFound(f"No LoRA adapter '{adapter_id}'.", param="adapter_id", code="adapter_not_found")
        return _view(record)

    async def delete(self, adapter_id: str) -> None:
        """Delete an uploaded adapter (configured ones go with their file)."""
        gone = await asyncio.to_thread(self.store.delete, adapter_id) if self.store is not None else None
        if gone is None:
            configured = any(a.id == adapter_id for a in self.configured.values())
            why = "is configured (remove its file from adapters_dir)" if configured else "does not exist"
            raise NotFound(f"The LoRA adapter '{adapter_id}' {why}.", param="adapter_id", code="adapter_not_found")
