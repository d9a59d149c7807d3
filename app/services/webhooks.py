"""Webhooks: the background sender of the outbox, and the signing secrets.

Deliveries are written to the outbox in the same transaction as the job change they announce
(:mod:`app.services.jobs`); this sender claims those that are due with a lease, so several replicas never send one
twice at once, and a restart picks up whatever was pending. Each attempt is signed per Standard Webhooks with the
owner's secrets (its current one and a rotated one still in its grace period), else the server's. A 2xx delivers;
a 410 disables the URL; a refused target (private address, not allow-listed) fails at once; anything else is
retried on ``webhook_retry_schedule`` (honouring Retry-After), then fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

import aiohttp

from app import metrics
from app.auth.principals import Principal
from app.config import Settings
from app.protocol.jobs import WebhookSecret
from app.services.webhooks_delivery import deliver, new_secret, next_attempt, session
from app.store.jobs import SERVER, Delivery, JobStore

log = logging.getLogger("imagegate.webhooks")

BATCH = 32
"""Deliveries sent at once by one sender."""
SECRET_GRACE = 86400.0
"""Seconds a rotated secret keeps signing next to the new one, so receivers can switch without losing messages."""


class WebhookSender:
    def __init__(self, settings: Settings, store: JobStore, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.worker_id = f"wh_{secrets.token_hex(6)}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.store.ensure_secret(SERVER, new_secret(), self.clock())
        self._task = asyncio.create_task(self._run_forever(), name="webhook-sender")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """Something may have been written to the outbox: look now rather than at the next poll."""
        self._wake.set()

    async def _run_forever(self) -> None:
        async with session(self.settings.webhook_allowlist, self.settings.webhook_timeout) as http:
            while True:
                self._wake.clear()
                try:
                    sent = await self.send_due(http)
                except Exception:
                    log.exception("sending webhooks failed")
                    sent = 0
                if sent:
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(
                        self.settings.job_poll_interval
                    ):  # unlike wait_for, never swallows a cancel
                        await self._wake.wait()

    async def send_due(self, http: aiohttp.ClientSession) -> int:
        """Send the deliveries that are due (a batch); returns how many were attempted."""
        lease = self.settings.webhook_timeout * 2 + 5
        due = await asyncio.to_thread(self.store.due_deliveries, self.worker_id, self.clock(), lease, BATCH)
        await asyncio.gather(*(self._send(http, d) for d in due))
        return len(due)

    async def _send(self, http: aiohttp.ClientSession, d: Delivery) -> None:
        now = self.clock()
        keys = await asyncio.to_thread(self.store.signing_secrets, d.owner, now)
        if not keys:
            keys = await asyncio.to_thread(self.store.signing_secrets, SERVER, now)
        outcome = await deliver(
            http, d.url, d.id, d.payload.encode(), keys, self.settings.webhook_allowlist, now=self.clock
        )
        metrics.WEBHOOK_SECONDS.observe(outcome.seconds)
        attempts = d.attempts + 1
        done = {"attempts": attempts, "last_status": outcome.status, "last_error": outcome.detail or None}
        kind: str = outcome.kind
        if outcome.kind == "delivered":
            await asyncio.to_thread(
                lambda: self.store.update_delivery(d.id, status="delivered", delivered_at=now, **done)
            )
        elif outcome.kind == "gone":
            log.warning("webhook %s answered 410 Gone: nothing more is sent there", d.url)
            await asyncio.to_thread(lambda: self.store.update_delivery(d.id, status="gone", **done))
            await asyncio.to_thread(self.store.disable_endpoint, d.url, "answered 410 Gone", now)
        elif outcome.kind == "refused":
            log.warning("webhook %s refused: %s", d.url, outcome.detail)
            await asyncio.to_thread(lambda: self.store.update_delivery(d.id, status="refused", **done))
        else:
            later = next_attempt(attempts, self.settings.webhook_retry_schedule, now, outcome.retry_after)
            if later is None:
                kind = "failed"
                log.warning("webhook %s to %s failed after %d attempts: %s", d.id, d.url, attempts, outcome.detail)
                await asyncio.to_thread(lambda: self.store.update_delivery(d.id, status="failed", **done))
            else:
                await asyncio.to_thread(lambda: self.store.update_delivery(d.id, next_attempt_at=later, **done))
        metrics.WEBHOOK_DELIVERIES.labels(kind).inc()

    async def rotate(self, principal: Principal | None) -> WebhookSecret:
        """A new signing secret for the principal (None: the server's), shown this once."""
        owner = SERVER if principal is None else principal.id
        now = self.clock()
        secret = new_secret()
        had = bool(await asyncio.to_thread(self.store.signing_secrets, owner, now))
        await asyncio.to_thread(self.store.rotate_secret, owner, secret, now, SECRET_GRACE)
        return WebhookSecret(
            secret=secret,
            owner="server" if principal is None else owner,
            created_at=int(now),
            previous_valid_until=int(now + SECRET_GRACE) if had else None,
        )
