"""The browser playground: ``/`` serves its page; ``/static`` its script and styles (no build step)."""

from __future__ import annotations

from pathlib import Path

from litestar import Controller, get
from litestar.response import File

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


class PlaygroundController(Controller):
    @get("/", operation_id="playground", media_type="text/html")
    async def page(self) -> File:
        return File(STATIC_DIR / "index.html", media_type="text/html", content_disposition_type="inline")
