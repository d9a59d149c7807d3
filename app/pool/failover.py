"""Failover: one admitted job on its way through the pool, from backend to backend and model to model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import BinaryIO

from app import metrics, telemetry
from app.errors import ApiError, BackendFailed, DeadlineExceeded, InvalidRequest, Overloaded, Unavailable, from_worker
from app.pool.pool import Lease, Member, Pool
from app.worker.protocol import Done, Failed, GenerationParams, Image, Partial, Progress, Started, WorkerEvent

log = logging.getLogger("imagegate.failover")

Retarget = Callable[[GenerationParams, str], GenerationParams]
"""The job's params for a fallback model; raises :class:`InvalidRequest` when that model cannot take the job."""


class _BackendLost(Exception):
    """A backend failed a job for reasons of its own (unreachable, broke off): another backend may run it."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class Dispatch:
    """Runs one job on the pool until it succeeds or cannot.

    1. :meth:`admit` takes a place on a ready backend of the job's model (the pool's policy picks it); when the model
       has none or its queue is full, on the first of the fallback models that can take the job.
    2. :meth:`events` runs the job there. While nothing has reached the client (a streamed job's first partial or
       completed image; a non-streamed job's whole answer), a backend that fails the job for reasons of its own
       (unreachable, broke off) is counted against it (the pool's circuit breaker) and the job moves on: to another
       ready backend of the same model, never one it already tried, up to ``max_attempts`` backends; then to the
       fallback models in order. After something reached the client the failure is the client's ``error``.
    3. A failure of the job itself (bad input, out of memory, an error inside the pipeline, a cancellation) is never
       retried: another backend would fail the same way.
    4. The deadline covers every attempt. A backend that started the job and then said nothing until the deadline
       counts as failed; one that never started it was only busy.

    With tracing on, an ``admission`` span runs from admission until a backend started the job (the queue wait),
    and each attempt is a ``backend <name>`` span (failed with the backend's error when it lost the job); the backend
    is called with the attempt's span current, so a worker's spans join the request's trace.
    """

    def __init__(
        self,
        pool: Pool,
        params: GenerationParams,
        attachments: Sequence[BinaryIO],
        *,
        fallbacks: list[str],
        retarget: Retarget,
        max_attempts: int,
        timeout: float,
    ) -> None:
        self.pool = pool
        self.params = params
        self.attachments = attachments
        self.fallbacks = fallbacks
        self.retarget = retarget
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.lease: Lease | None = None
        self.tried: list[Member] = []
        self.attempts = 0
        self._admission = None
        # Traced within a traced request (a job run by the job layer has none: its worker traces it alone).
        self.traced = telemetry.ENABLED and telemetry.in_trace()
        if self.traced:
            self._admission = telemetry.start_span("admission", attributes={"imagegate.model": params.model})
        timing = metrics.current_timing.get()
        if timing is not None:
            timing.model = params.model

    def admit(self) -> None:
        """Take a place on a backend of the job's model, else of a fallback model.

        Raises:
            Unavailable, Overloaded: the error of the job's own model, when no model could take the job.
        """
        p = self.params
        try:
            self.lease = self.pool.acquire(p.model, p.work, p.task, adapters=frozenset(r.digest for r in p.loras))
        except (Overloaded, Unavailable) as e:
            if not self._fall_back(e):
                self._admitted(e)
                raise

    def _admitted(self, error: ApiError | None = None) -> None:
        """End the admission span: a backend started the job, or it never will (``error``, or the client left)."""
        span, self._admission = self._admission, None
        if span is not None:
            if error is not None:
                telemetry.fail(span, error, record=False)
            span.end()

    def release(self) -> bool:
        """Give back the job's place if it still holds one (the client left before it ran); True if it did."""
        self._admitted()
        if self.lease is None or self.lease.released:
            return False
        self.lease.release(succeeded=False)
        return True

    def _fall_back(self, error: ApiError) -> bool:
        """Move the job to the next fallback model that can take it; False when none is left."""
        while self.fallbacks:
            name = self.fallbacks.pop(0)
            try:
                params = self.retarget(self.params, name)
                lease = self.pool.acquire(name, params.work, params.task)
            except (InvalidRequest, Overloaded, Unavailable) as e:
                log.info("fallback %s cannot take %s: %s", name, self.params.request_id, e.message)
                continue
            log.warning("request %s falls back to %s: %s", params.request_id, name, error.message)
            metrics.FALLBACKS.labels(self.params.model, name).inc()
            self.params, self.lease, self.tried = params, lease, []
            return True
        return False

    def _move_on(self, error: ApiError) -> bool:
        """After a backend lost the job: another backend of the model, else a fallback model; False if none."""
        assert self.lease is not None
        self.tried.append(self.lease.member)
        if len(self.tried) < self.max_attempts:
            p = self.params
            try:
                self.lease = self.pool.acquire(
                    p.model,
                    p.work,
                    p.task,
                    exclude=self.tried,
                    queue_bound=False,
                    adapters=frozenset(r.digest for r in p.loras),
                )
            except (Overloaded, Unavailable):
                pass
            else:
                log.warning("request %s moves to %s: %s", p.request_id, self.lease.member.name, error.message)
                metrics.RETRIES.labels(p.model).inc()
                return True
        return self._fall_back(error)

    async def events(self, *, streamed: bool) -> AsyncIterator[WorkerEvent]:
        """The job's events from whichever backend runs it to the end; failures raise :class:`ApiError`."""
        visible = False
        try:
            while True:
                try:
                    async with contextlib.aclosing(self._attempt()) as attempt:
                        async for event in attempt:
                            visible = visible or (streamed and isinstance(event, Partial | Image))
                            yield event
                    return
                except _BackendLost as lost:
                    if visible or not self._move_on(lost.error):
                        raise lost.error from None
        finally:
            self.release()

    async def _attempt(self) -> AsyncIterator[WorkerEvent]:
        """One backend's events for the job, with their metrics; :class:`_BackendLost` if the backend failed."""
        lease = self.lease
        assert lease is not None
        member, model = lease.member, self.params.model
        self.attempts += 1
        span = None
        if self.traced:
            span = telemetry.start_span(
                f"backend {member.name}",
                attributes={
                    "imagegate.backend": member.name,
                    "imagegate.attempt": self.attempts,
                    "imagegate.model": model,
                },
            )
        events = member.backend.generate(self.params, self.attachments)
        timing = metrics.request_timing()
        if timing is not None:
            timing.backend_name = member.name
        first_partial, last_step, succeeded = True, 0.0, False
        # One timer for the whole attempt: it cancels the wait for the backend's next event, never the code that
        # handles an event (which runs in the same task between two waits).
        waiting: asyncio.Task | None = None
        expired = False

        def deadline() -> None:
            nonlocal expired
            expired = True
            if waiting is not None:
                waiting.cancel()

        timer = asyncio.get_running_loop().call_later(max(self.deadline - time.monotonic(), 0.001), deadline)
        try:
            while True:
                waited = time.perf_counter()
                try:
                    if expired:
                        raise TimeoutError
                    waiting = asyncio.current_task()
                    event = await (anext(events) if span is None else _within(span, anext(events)))
                except StopAsyncIteration:
                    raise self._lost(member, BackendFailed("the backend ended the stream without a result")) from None
                except BackendFailed as e:
                    raise self._lost(member, e) from None
                except asyncio.CancelledError:
                    if not expired or waiting is None or waiting.uncancel():
                        raise  # cancelled from outside (the client went away), not by the deadline
                    raise self._late(lease) from None
                except TimeoutError:
                    raise self._late(lease) from None
                finally:
                    waiting = None
                    if timing is not None:
                        timing.backend += time.perf_counter() - waited
                now = time.monotonic()
                if isinstance(event, Started):
                    metrics.child(metrics.QUEUE_WAIT_SECONDS, model).observe(lease.started())
                    metrics.child(metrics.BATCH_SIZE, model).observe(event.batch_size)
                    if span is not None:
                        self._admitted()
                        span.set_attribute("imagegate.batch_size", event.batch_size)
                elif isinstance(event, Progress):
                    if last_step:
                        metrics.child(metrics.STEP_SECONDS, model).observe(now - last_step)
                    last_step = now
                elif isinstance(event, Partial) and first_partial:
                    first_partial = False
                    metrics.child(metrics.FIRST_PARTIAL_SECONDS, model).observe(now - lease.admitted_at)
                elif isinstance(event, Failed):
                    raise from_worker(event)
                yield event
                if isinstance(event, Done):
                    succeeded = True
                    if lease.started_at is not None:
                        metrics.child(metrics.GENERATION_SECONDS, model).observe(now - lease.started_at)
                    return
        except BaseException as e:
            if span is not None:
                if isinstance(e, GeneratorExit | asyncio.CancelledError):
                    span.set_attribute("imagegate.cancelled", True)
                else:
                    telemetry.fail(span, e.error if isinstance(e, _BackendLost) else e)
            raise
        finally:
            timer.cancel()
            await events.aclose()
            lease.release(succeeded=succeeded)
            if span is not None:
                span.end()

    def _late(self, lease: Lease) -> DeadlineExceeded:
        """The deadline passed: a backend that started the job and then said nothing counts as failed."""
        if lease.started_at is not None:
            self.pool.failed(lease.member, "it stopped answering before the request's deadline")
        return DeadlineExceeded(f"The request did not finish within {self.timeout:g} seconds.")

    def _lost(self, member: Member, error: BackendFailed) -> _BackendLost:
        self.pool.failed(member, error.message)
        return _BackendLost(error)


async def _within(span: telemetry.Span, step: Awaitable[WorkerEvent]) -> WorkerEvent:
    """Await a backend's next event with ``span`` current: what the backend sends carries it (``traceparent``)."""
    with telemetry.current(span):
        return await step
