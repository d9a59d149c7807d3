"""Workers on other hosts: `imagegate worker --listen host:port` processes named in the configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from app.backends.foreign import upstream
from app.backends.worker import WorkerBackend
from app.config import Settings
from app.pool.pool import Member, Pool

log = logging.getLogger("imagegate.remote")


class RemoteWorkers:
    """Adds each configured remote worker and upstream to the pool and keeps its state current with cheap probes.

    A probe is the backend's ``health()`` (``GET /health`` of a worker, ``GET /models`` of an upstream; never a
    generation): ready when it says so and serves every model the configuration routes to it; starting while it
    loads; down when it cannot be reached.
    """

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        interval: float = 2.0,
        adapter_file: Callable[[str], Path] | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.interval = interval
        self.adapter_file = adapter_file
        """Where the gateway keeps the LoRA adapter file of a digest (sent to the workers over the network)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._members: list[Member] = []

    async def start(self) -> None:
        layout: dict[str, list[str]] = {}
        for m in self.settings.resolved_models():
            for address in m.remote_workers:
                layout.setdefault(address, []).append(m.name)
        for address, models in layout.items():
            backend = WorkerBackend(
                f"remote-{address}", address, token=self.settings.worker_token, adapter_file=self.adapter_file
            )
            self._watch(self.pool.add(backend, models, probed=True, device=address))
        for u in self.settings.upstreams:
            self._watch(self.pool.add(upstream(u), list(u.models), capacity=u.concurrency, probed=True))

    def _watch(self, member: Member) -> None:
        self._members.append(member)
        self._tasks.append(asyncio.create_task(self._probe_forever(member), name=f"probe-{member.name}"))

    async def _probe_forever(self, member: Member) -> None:
        while True:
            state, detail = await self.pool.probe(member)
            if (state, detail) != (member.state, member.detail):
                log.info("backend %s probed %s %s", member.name, state.value, detail)
            self.pool.report_health(member, state, detail)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for member in self._members:
            await member.backend.close()
