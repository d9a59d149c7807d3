"""The gateway's view of the data plane: a backend runs jobs and yields worker events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import BinaryIO, Protocol

from app.worker.protocol import GenerationParams, HealthInfo, WorkerEvent


class Backend(Protocol):
    """Something that runs generations: a local or remote imagegate worker, later foreign upstreams.

    ``generate`` yields events until :class:`~app.worker.protocol.Done` or :class:`~app.worker.protocol.Failed`;
    it raises :class:`~app.errors.BackendFailed` when the backend cannot be reached or breaks off. Closing the
    iterator early cancels the job on the backend. ``attachments`` are the input image and mask files of an edit
    (their lengths are in the params); they are read from the start.
    """

    name: str

    def generate(
        self, params: GenerationParams, attachments: Sequence[BinaryIO] = ()
    ) -> AsyncIterator[WorkerEvent]: ...

    async def health(self) -> HealthInfo: ...

    async def close(self) -> None: ...
