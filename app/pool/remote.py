"""Workers on other hosts: `imagegate worker --listen host:port` processes named in the configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app.backends.worker import WorkerBackend
from app.config import Settings
from app.errors import BackendFailed
from app.pool.pool import Member, Pool, State

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

    async def start(self) -> None:
        layout: dict[str, list[str]] = {}
        for m in self.settings.resolved_models():
            for address in m.remote_workers:
                layout.setdefault(address, []).append(m.name)
        for address, models in layout.items():
            backend = WorkerBackend(f"remote-{address}", address, token=self.settings.worker_token)
            member = self.pool.add(backend, models)
            self._tasks.append(asyncio.create_task(self._probe_forever(member), name=f"probe-{address}"))

    async def _probe_forever(self, member: Member) -> None:
        while True:
            state, detail = await self._probe(member)
            if (state, detail) != (member.state, member.detail):
                log.info("remote worker %s is %s %s", member.name, state.value, detail)
                self.pool.set_state(member, state, detail)
            await asyncio.sleep(self.interval)

    async def _probe(self, member: Member) -> tuple[State, str]:
        try:
            info = await member.backend.health()
        except BackendFailed as e:
            return State.DOWN, e.message
        missing = sorted(member.models - set(info.models))
        if missing:
            return State.DOWN, f"does not serve {', '.join(missing)}"
        if info.status != "ready":
            return (State.STARTING if info.status == "loading" else State.DOWN), info.error or info.status
        member.learn_tasks(info.tasks)
        return State.READY, ""

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for member in self.pool.members:
            if member.name.startswith("remote-"):
                await member.backend.close()
