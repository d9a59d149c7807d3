"""Workers on other hosts: `imagegate worker --listen host:port` processes named in the configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app.backends.upstream import UpstreamBackend
from app.backends.worker import WorkerBackend
from app.config import Settings
from app.pool.pool import Member, Pool

log = logging.getLogger("imagegate.remote")


class RemoteWorkers:
    """Adds each configured remote worker to the pool and keeps its state current with cheap health probes.

    A probe is ``GET /health`` (never a generation): ready when the worker says so and serves every model the
    configuration routes to it; starting while it loads; down when it cannot be reached.
    """

    def __init__(self, settings: Settings, pool: Pool, interval: float = 2.0) -> None:
        self.settings = settings
        self.pool = pool
        self.interval = interval
        self._tasks: list[asyncio.Task[None]] = []
        self._upstreams: list[UpstreamBackend] = []

    async def start(self) -> None:
        layout: dict[str, list[str]] = {}
        for m in self.settings.resolved_models():
            for address in m.remote_workers:
                layout.setdefault(address, []).append(m.name)
        for address, models in layout.items():
            backend = WorkerBackend(f"remote-{address}", address, token=self.settings.worker_token)
            member = self.pool.add(backend, models, probed=True)
            self._tasks.append(asyncio.create_task(self._probe_forever(member), name=f"probe-{address}"))
        # Upstreams (OpenAI-compatible APIs) are probed the same way: their health() is a cheap GET /models.
        for u in self.settings.upstreams:
            upstream = UpstreamBackend(u)
            self._upstreams.append(upstream)
            member = self.pool.add(upstream, list(u.models), capacity=u.concurrency, probed=True)
            self._tasks.append(asyncio.create_task(self._probe_forever(member), name=f"probe-upstream-{u.name}"))

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
        for member in self.pool.members:
            if member.name.startswith("remote-"):
                await member.backend.close()
        for upstream in self._upstreams:
            await upstream.close()
