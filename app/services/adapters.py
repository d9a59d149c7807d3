"""LoRA adapters the gateway can apply, by model: today the ``*.safetensors`` files of each model's ``adapters_dir``.

An adapter's id is its file name without the extension; its identity on the wire is the SHA-256 of its bytes, which
is how workers keep and load it (:mod:`app.worker.adapters`). Requests choose adapters with ``loras: [{"id",
"scale"}]``; :meth:`AdapterRegistry.resolve` checks them against the request's model before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.errors import InvalidRequest
from app.protocol.images import LoraSpec
from app.worker.protocol import LoraRef

log = logging.getLogger("imagegate.adapters")


class NotAnAdapter(ValueError):
    """The file is not a safetensors file of LoRA weights."""


def check_lora(path: Path) -> None:
    """Read a safetensors header (8-byte length, JSON) and check that it holds LoRA weights.

    Raises:
        NotAnAdapter: it is not safetensors, or has no LoRA tensors (peft, diffusers or kohya names).
    """
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise NotAnAdapter("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= 100_000_000:
            raise NotAnAdapter("not a safetensors file")
        try:
            names = json.loads(f.read(length))
        except ValueError:
            raise NotAnAdapter("not a safetensors file: its header is not JSON") from None
    if not any(("lora" in name.lower()) for name in names if name != "__metadata__"):
        raise NotAnAdapter("it holds no LoRA weights")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Adapter:
    id: str
    model: str
    path: Path
    digest: str
    size: int


class AdapterRegistry:
    """The adapters of every model, found in the models' ``adapters_dir`` when the gateway starts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.adapters: dict[tuple[str, str], Adapter] = {}
        self._files: dict[str, Path] = {}

    def scan(self) -> None:
        """Register each model's adapter files (blocking: it reads them to take their digests)."""
        for model in self.settings.resolved_models():
            if not model.adapters_dir:
                continue
            for path in sorted(Path(model.adapters_dir).expanduser().glob("*.safetensors")):
                try:
                    check_lora(path)
                except (NotAnAdapter, OSError) as e:
                    log.warning("skipping %s: %s", path, e)
                    continue
                adapter = Adapter(path.stem, model.name, path, file_digest(path), path.stat().st_size)
                self.adapters[(model.name, adapter.id)] = adapter
                self._files[adapter.digest] = path
            log.info("model %s: %d LoRA adapters", model.name, sum(m == model.name for m, _ in self.adapters))

    def file(self, digest: str) -> Path:
        """The file of an adapter by digest (what worker clients send)."""
        return self._files[digest]

    def of(self, model: str) -> list[Adapter]:
        return [a for (m, _), a in self.adapters.items() if m == model]

    def resolve(self, model: str, specs: Sequence[LoraSpec] | None, *, supported: bool | None) -> tuple[LoraRef, ...]:
        """The adapters a request asked for, as the worker applies them.

        Args:
            model: the request's model.
            specs: the request's ``loras``.
            supported: whether the model's pipeline loads LoRA (None: no worker has said yet).

        Raises:
            InvalidRequest: too many, one named twice, an unknown one or one of another model, or a model that
                cannot apply adapters (``param: loras``).
        """
        if not specs:
            return ()
        if supported is False:
            raise InvalidRequest(f"The model '{model}' cannot apply LoRA adapters.", param="loras", code="unsupported")
        if len(specs) > self.settings.max_loras:
            raise InvalidRequest(f"At most {self.settings.max_loras} LoRA adapters per request.", param="loras")
        refs = []
        for spec in specs:
            adapter = self.adapters.get((model, spec.id))
            if adapter is None:
                known = ", ".join(a.id for a in self.of(model)) or "none"
                elsewhere = [m for (m, i) in self.adapters if i == spec.id]
                why = f"belongs to '{elsewhere[0]}'" if elsewhere else "does not exist"
                raise InvalidRequest(
                    f"The LoRA adapter '{spec.id}' {why}; '{model}' has: {known}.",
                    param="loras",
                    code="adapter_not_found",
                )
            refs.append(LoraRef(digest=adapter.digest, scale=spec.scale))
        if len({r.digest for r in refs}) < len(refs):
            raise InvalidRequest("A LoRA adapter is named twice; give each once with its scale.", param="loras")
        return tuple(refs)
