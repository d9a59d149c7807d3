"""LoRA adapters on a worker: files kept by the digest of their bytes, loaded into a model's pipeline on demand.

The gateway sends a worker each adapter file once (``PUT /adapters/{sha256}``) before the first job that needs it, so
no filesystem is shared with it. A model keeps at most ``limit`` adapters loaded, evicting the least recently used.
Adapters live on the model's shared denoiser and text encoder, so choosing them changes what every pipeline view of
the model computes: :meth:`LoadedAdapters.apply` runs on the engine thread right before each pipeline call, which is
the one place pipeline calls happen, so "set adapters + run" is never interleaved with another job's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.worker.images import InvalidInput
from app.worker.protocol import LoraRef

log = logging.getLogger("imagegate.worker.adapters")

DIGEST = re.compile(r"[0-9a-f]{64}")


class AdapterFiles:
    """Adapter files on this worker, each named by the SHA-256 of its bytes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not DIGEST.fullmatch(digest):
            raise ValueError(f"not a SHA-256 digest: {digest!r}")
        return self.directory / f"{digest}.safetensors"

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, digest: str, data: bytes) -> None:
        """Keep ``data`` under ``digest``.

        Raises:
            ValueError: the bytes are not what the digest says (a truncated or altered upload).
        """
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError("the adapter's bytes do not match its digest")
        target = self.path(digest)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def adapter_name(digest: str) -> str:
    """The adapter's name inside the pipeline (peft names become module keys: no dots, not too long)."""
    return f"lora_{digest[:20]}"


class LoadedAdapters:
    """The adapters loaded into one model's pipeline, least recently used first.

    At most ``limit`` adapters and ``max_bytes`` of adapter weights (their files' sizes) stay loaded; the adapters a
    job runs with are never the ones evicted for it.
    """

    def __init__(self, pipe: Any, files: AdapterFiles, limit: int, max_bytes: int = 1 << 62) -> None:
        self.pipe = pipe
        self.files = files
        self.limit = max(1, limit)
        self.max_bytes = max_bytes
        self.loaded: OrderedDict[str, int] = OrderedDict()
        """Adapter name -> its file's size."""
        self.active: tuple[LoraRef, ...] = ()
        self.loads = 0
        self.evictions = 0

    def apply(self, loras: Sequence[LoraRef]) -> None:
        """Make the next pipeline call run with exactly these adapters at these scales (none: the base weights).

        Raises:
            InvalidInput: an adapter is not on this worker, or does not fit the model.
        """
        loras = tuple(loras)
        if loras == self.active:
            return
        if not loras:
            self.pipe.disable_lora()  # every adapter stays loaded, and the output is the base model's exactly
            self.active = ()
            return
        wanted = [adapter_name(ref.digest) for ref in loras]
        for ref, name in zip(loras, wanted, strict=True):
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            self._load(ref.digest, name)
            self._evict(keep=set(wanted))
        self.pipe.enable_lora()
        self.pipe.set_adapters(wanted, adapter_weights=[ref.scale for ref in loras])
        self.active = loras

    def _load(self, digest: str, name: str) -> None:
        if not self.files.has(digest):
            raise InvalidInput(f"the adapter {digest[:12]} was not sent to this worker")
        try:
            self.pipe.load_lora_weights(str(self.files.path(digest)), adapter_name=name)
        except Exception as e:  # a malformed file fails in many ways inside diffusers and peft; it is the file's fault
            # diffusers cleans up after a failed load; the model runs on as before
            with contextlib.suppress(Exception):
                self.pipe.delete_adapters([name])
            raise InvalidInput(f"the adapter {digest[:12]} does not fit this model: {e}") from None
        self.loaded[name] = self.files.path(digest).stat().st_size
        self.loads += 1

    def _evict(self, keep: set[str]) -> None:
        for name in list(self.loaded):
            if len(self.loaded) <= self.limit and sum(self.loaded.values()) <= self.max_bytes:
                return
            if name not in keep:
                self.pipe.delete_adapters([name])
                del self.loaded[name]
                self.evictions += 1
                log.info("evicted adapter %s (past %d adapters or %d bytes loaded)", name, self.limit, self.max_bytes)
