"""Cancel a non-streamed request's work when its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from litestar import Request

from app.errors import Cancelled

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (the body must have been read already).

    ``work`` runs in the calling task (no task of its own); a watcher task cancels that task on a disconnect.
    """
    caller = asyncio.current_task()
    assert caller is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        caller.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and caller.uncancel() == 0:
            raise Cancelled("The client disconnected.") from None
        raise
    finally:
        watcher.cancel()
