"""Generated image files behind HMAC-signed, expiring URLs (``response_format: url``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

log = logging.getLogger("imagegate.files")

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ROUTE = "/files/images"
JOB_ROUTE = "/files/jobs"
"""Files of job results: kept for the job's retention, not the URL lifetime."""


def load_or_create_secret(path: Path) -> bytes:
    """The URL-signing key kept in the data dir, created with 256 random bits on first use."""
    try:
        key = bytes.fromhex(path.read_text().strip())
        if len(key) >= 16:
            return key
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return key


class ImageFiles:
    """Writes images under ``directory`` and signs URLs for them that expire after ``ttl`` seconds.

    A URL is ``{base}/files/images/{name}?expires={unix}&signature={hmac}``; the file is deleted by the sweeper
    once its URL can no longer be valid.
    """

    def __init__(self, directory: Path, secret: bytes, ttl: int, clock=time.time, route: str = ROUTE) -> None:
        self.directory = directory
        self.route = route
        self.secret = secret
        self.ttl = ttl
        self.clock = clock
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, output_format: str) -> str:
        """Store ``data`` and return the file's name."""
        name = f"img_{secrets.token_urlsafe(18)}.{output_format}"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.directory / name)
        return name

    def _signature(self, name: str, expires: int) -> str:
        return hmac.new(self.secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, base: str, name: str, expires: int | None = None) -> str:
        """A signed URL of the file ``name``, valid for the URL lifetime or until ``expires`` (unix seconds)."""
        expires = int(self.clock()) + self.ttl if expires is None else expires
        query = urlencode({"expires": expires, "signature": self._signature(name, expires)})
        return f"{base.rstrip('/')}{self.route}/{name}?{query}"

    def resolve(self, name: str, expires: str | None, signature: str | None) -> Path | None:
        """The file behind a signed URL, or None when the signature is wrong, expired, or the file is gone."""
        if not expires or not signature or not expires.isdigit() or "/" in name or name.startswith("."):
            return None
        if int(expires) < self.clock():
            return None
        if not hmac.compare_digest(self._signature(name, int(expires)), signature):
            return None
        path = self.directory / name
        return path if path.is_file() else None

    def sweep(self) -> int:
        """Delete files older than the URL lifetime; returns how many."""
        cutoff = self.clock() - self.ttl - 60
        removed = 0
        for p in self.directory.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
        return removed

    async def sweep_forever(self, interval: float = 60.0) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.sweep)
                if removed:
                    log.info("removed %d expired image files", removed)
            except OSError as e:
                log.warning("sweeping image files failed: %s", e)
            await asyncio.sleep(interval)
