"""FakeBackend: a torch-free backend with deterministic images, for tests and gateway benchmarks."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator, Sequence
from typing import BinaryIO

from PIL import Image as PILImage

from app.errors import BackendFailed
from app.worker.protocol import (
    Done,
    Failed,
    GenerationParams,
    HealthInfo,
    Image,
    Partial,
    Progress,
    Started,
    WorkerEvent,
    preview_steps,
)


def fake_image(width: int, height: int, seed: int, output_format: str = "png", fraction: float = 1.0) -> bytes:
    """A flat image whose colour is a function of ``seed``; ``fraction`` < 1 fades it from grey (a preview)."""
    rng = random.Random(seed)
    target = [rng.randrange(256) for _ in range(3)]
    colour = tuple(round(128 + (c - 128) * fraction) for c in target)
    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), colour).save(buf, format=output_format.upper())
    return buf.getvalue()


class FakeBackend:
    """Answers like a worker: progress every step, previews at the usual steps, then the images.

    Args:
        name: backend name.
        models: models it serves (None: any).
        step_delay: seconds each denoising step takes.
        fail: ``None``, ``"before"`` (Failed before any event), ``"after_partial"`` (breaks off after the first
            partial image), ``"invalid"`` (a Failed of kind invalid_request) or ``"hang"`` (sends Started, then
            nothing, until the job is stopped).

    ``health_status`` is what :meth:`health` answers: a worker status (``"ready"``, ``"loading"``, ``"failed"``) or
    ``"unreachable"`` (it raises BackendFailed); ``health_checks`` counts the calls.
    """

    def __init__(
        self, name: str = "fake", models: list[str] | None = None, step_delay: float = 0.0, fail: str | None = None
    ) -> None:
        self.name = name
        self.models = models
        self.step_delay = step_delay
        self.fail = fail
        self.started = 0
        self.cancelled = 0
        self.completed = 0
        self.last_params: GenerationParams | None = None
        self.last_attachments: list[bytes] = []
        self.health_status = "ready"
        self.health_checks = 0

    async def generate(
        self, params: GenerationParams, attachments: Sequence[BinaryIO] = ()
    ) -> AsyncIterator[WorkerEvent]:
        self.started += 1
        self.last_params = params
        self.last_attachments = []
        for f in attachments:
            f.seek(0)
            self.last_attachments.append(f.read())
        if self.fail == "before":
            raise BackendFailed(f"worker {self.name} is unreachable: fake failure")
        if self.fail == "invalid":
            yield Failed(message="the fake says no", kind="invalid_request", param="prompt")
            return
        try:
            yield Started(queue_seconds=0.0, prompt_tokens=len(params.prompt.split()) + 2)
            if self.fail == "hang":
                await asyncio.Event().wait()  # until cancelled
            marks = preview_steps(params.steps, params.partial_images)
            counts = [0] * params.n
            for step in range(1, params.steps + 1):
                if self.step_delay:
                    await asyncio.sleep(self.step_delay)
                yield Progress(step=step, total=params.steps)
                for _ in range(marks.count(step)):
                    for i in range(params.n):
                        data = fake_image(
                            params.width, params.height, params.seed + i, params.output_format, step / params.steps
                        )
                        yield Partial(image_index=i, partial_index=counts[i], data=data)
                        counts[i] += 1
                    if self.fail == "after_partial":
                        raise BackendFailed(f"worker {self.name} closed the stream before the job ended")
            for i in range(params.n):
                data = fake_image(params.width, params.height, params.seed + i, params.output_format)
                yield Image(index=i, data=data, seed=params.seed + i)
            self.completed += 1
            yield Done(seconds=params.steps * self.step_delay)
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled += 1
            raise

    async def health(self) -> HealthInfo:
        self.health_checks += 1
        if self.health_status == "unreachable":
            raise BackendFailed(f"worker {self.name} health check failed: fake failure")
        return HealthInfo(status=self.health_status, device="fake", models=self.models or [])  # type: ignore[arg-type]

    async def close(self) -> None:
        return None
