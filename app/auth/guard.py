"""Per-principal limits, enforced when an image request is admitted, and usage recording."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import Counter

from app import metrics
from app.auth.principals import Principal
from app.errors import PermissionDenied, QuotaExceeded, RateLimited
from app.store.keys import KeyStore

log = logging.getLogger("imagegate.auth")
T = TypeVar("T")

MAX_ALIAS_LABELS = 100
USAGE_WRITE_INTERVAL = 0.25
"""Seconds that usage waits to be written with the rest of its batch (also the most a crash can lose)."""


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """Start and end (UTC, calendar-aligned) of the quota period containing ``now``."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start.timestamp() + 3600
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start.timestamp() + 86400
    else:
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (
            start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        ).timestamp()
    return start.timestamp(), end


@dataclass(eq=False)
class Ticket:
    """An admitted request's hold on its principal's concurrency and quota; :meth:`finish` exactly once."""

    guard: Guard
    principal: Principal
    reserved: int
    _done: bool = False

    def finish(self, images: int = 0, pixel_steps: int = 0) -> None:
        if self._done:
            return
        self._done = True
        self.guard._finish(self, images, pixel_steps)


@dataclass
class Guard:
    """Admission by principal; the checks run in this order, and the first that fails answers.

    1. the model must match one of the principal's patterns (403 ``model_not_allowed``);
    2. fewer than ``max_concurrent`` image requests in flight (429 ``rate_limit_exceeded``);
    3. images delivered this quota period + images held by requests in flight + ``n`` must not exceed
       ``image_quota`` (429 ``insufficient_quota``, with ``x-should-retry: false``);
    4. fewer than ``rpm`` admitted requests in the last 60 seconds, a moving window (429 ``rate_limit_exceeded``
       with Retry-After until the oldest leaves the window).

    Checks and the hold they take happen under one lock per principal, so concurrent requests cannot overshoot.
    """

    store: KeyStore
    clock: Callable[[], float] = time.time
    _rpm: MovingWindowRateLimiter = field(default_factory=lambda: MovingWindowRateLimiter(MemoryStorage()))
    _locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    _in_flight: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    _held: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Images reserved by requests in flight, plus delivered images whose usage row is still being written."""
    _pending: dict[tuple[str, float], list[int]] = field(default_factory=dict)
    """(principal, start of the hour) -> [requests, images, pixel_steps] ended and not yet written."""
    _flusher: asyncio.Task[None] | None = None
    _aliases: dict[str, Counter] = field(default_factory=dict)
    """Each alias counted under its own label, with its counter."""

    reserved: Callable[[str], int] | None = None
    """Images that a principal's unfinished jobs hold against its quota (the job store's count), if jobs exist."""

    async def admit(self, principal: Principal, model: str, n: int) -> Ticket:
        if principal.max_concurrent is None and principal.image_quota is None and principal.rpm is None:
            self._allowed(principal, model)  # no limit to check under the lock
            self._hold(principal.id, n)
        else:
            async with self._checked(principal, model, n, concurrent=True):
                self._hold(principal.id, n)
        return Ticket(self, principal, n)

    def _hold(self, pid: str, n: int) -> None:
        self._in_flight[pid] += 1
        self._held[pid] += n

    async def reserve(self, principal: Principal, model: str, n: int, commit: Callable[[], Awaitable[T]]) -> T:
        """Admit a job: the checks of :meth:`admit` but the concurrency one, then ``commit()`` under the same lock.

        A queued job does not count as in flight; its images count against the quota from the moment ``commit``
        stored it (see :attr:`reserved`) until it ends and its usage is written, in one transaction.
        """
        async with self._checked(principal, model, n, concurrent=False):
            return await commit()

    @contextlib.asynccontextmanager
    async def _checked(self, principal: Principal, model: str, n: int, *, concurrent: bool) -> AsyncIterator[None]:
        self._allowed(principal, model)
        pid = principal.id
        async with self._locks[pid]:
            if concurrent and principal.max_concurrent is not None and self._in_flight[pid] >= principal.max_concurrent:
                metrics.LIMIT_REJECTIONS.labels("concurrency").inc()
                raise RateLimited(
                    f"This key already has {principal.max_concurrent} requests in flight; wait for one to finish.",
                    retry_after=1,
                )
            if principal.image_quota is not None:
                start, end = period_bounds(principal.quota_period, self.clock())
                used = (await self.store.usage(pid, since=start)).images + self._held[pid]
                if self.reserved is not None:
                    used += self.reserved(pid)
                if used + n > principal.image_quota:
                    metrics.LIMIT_REJECTIONS.labels("quota").inc()
                    raise QuotaExceeded(
                        f"This key's quota of {principal.image_quota} images per {principal.quota_period} is spent "
                        f"({used} used); it resets at {datetime.fromtimestamp(end, UTC).isoformat()}.",
                        retry_after=end - self.clock(),
                    )
            if principal.rpm is not None:
                item = RateLimitItemPerMinute(principal.rpm)
                if not self._rpm.hit(item, pid):
                    metrics.LIMIT_REJECTIONS.labels("rpm").inc()
                    reset = self._rpm.get_window_stats(item, pid).reset_time
                    raise RateLimited(
                        f"This key is limited to {principal.rpm} requests per minute.",
                        retry_after=max(1.0, reset - time.time()),
                    )
            yield

    @staticmethod
    def _allowed(principal: Principal, model: str) -> None:
        if not principal.allows(model):
            metrics.LIMIT_REJECTIONS.labels("model").inc()
            raise PermissionDenied(
                f"This key may not use the model '{model}'.", param="model", code="model_not_allowed"
            )

    def _finish(self, ticket: Ticket, images: int, pixel_steps: int) -> None:
        p = ticket.principal
        self._in_flight[p.id] -= 1
        self._held[p.id] -= ticket.reserved - images  # delivered images stay held until their row is written
        self.count_images(p.alias, images)
        row = self._pending.setdefault((p.id, self.clock() // 3600 * 3600), [0, 0, 0])
        row[0] += 1
        row[1] += images
        row[2] += pixel_steps
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    def count_images(self, alias: str, images: int) -> None:
        """Count delivered images per key alias (the first :data:`MAX_ALIAS_LABELS` aliases, then ``other``)."""
        if images:
            counter = self._aliases.get(alias)
            if counter is None:
                if len(self._aliases) < MAX_ALIAS_LABELS:
                    counter = self._aliases[alias] = metrics.KEY_IMAGES.labels(alias)
                else:
                    counter = metrics.KEY_IMAGES.labels("other")
            counter.inc(images)

    async def _flush(self) -> None:
        """Write the pending usage in one transaction, every :data:`USAGE_WRITE_INTERVAL` until none is left.

        Under load one write covers every request that ended in the interval, instead of one write per request.
        Quotas count pending images as held, so the interval never lets a key exceed its quota.
        """
        while self._pending:
            await asyncio.sleep(USAGE_WRITE_INTERVAL)
            batch, self._pending = self._pending, {}
            try:
                await self.store.record_usage([(pid, hour, *counts) for (pid, hour), counts in batch.items()])
            except Exception:
                log.exception("recording usage of %s failed", ", ".join(sorted({pid for pid, _ in batch})))
            finally:
                for (pid, _), counts in batch.items():
                    self._held[pid] -= counts[1]

    async def drain(self) -> None:
        """Wait for usage still being written (at shutdown)."""
        flusher = self._flusher
        if flusher is not None and not flusher.done() and flusher.get_loop() is asyncio.get_running_loop():
            await asyncio.wait({flusher}, timeout=10)
