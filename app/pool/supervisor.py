"""Local worker processes: spawn one per device, wait until ready, restart with backoff, stop with the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from app import metrics
from app.backends.worker import WorkerBackend
from app.config import Settings
from app.errors import BackendFailed
from app.pool.pool import Member, Pool, State

log = logging.getLogger("imagegate.supervisor")

STABLE_AFTER = 60.0
"""A worker that stayed up this long has its restart backoff reset."""


@dataclass(eq=False)
class LocalWorker:
    device: str
    models: list[str]
    socket_path: Path
    member: Member
    process: asyncio.subprocess.Process | None = None
    load_failure: str | None = None
    """Why its models failed to load, as its health said, on its last start."""
    restarts: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """Runs the local workers the configuration names: one process per device, serving every model on it."""

    def __init__(
        self, settings: Settings, pool: Pool, runtime_dir: Path, adapter_file: Callable[[str], Path] | None = None
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.runtime_dir = runtime_dir
        self.adapter_file = adapter_file
        """Where the gateway keeps the LoRA adapter file of a digest (workers are sent adapters from there)."""
        self.workers: list[LocalWorker] = []
        self._stopping = False
        self._settings_file = runtime_dir / "settings.json"

    def _layout(self) -> dict[tuple[str, int], list[str]]:
        """(device, k) -> the models on the device's k-th worker: a device listed twice runs two workers."""
        workers: dict[tuple[str, int], list[str]] = {}
        for m in self.settings.resolved_models():
            seen: dict[str, int] = {}
            for d in m.devices:
                k = seen[d] = seen.get(d, -1) + 1
                workers.setdefault((d, k), []).append(m.name)
        return workers

    @staticmethod
    def _name(device: str, k: int) -> str:
        return f"local-{device.replace(':', '')}" + (f"-{k + 1}" if k else "")

    async def start(self) -> None:
        layout = self._layout()
        if layout and importlib.util.find_spec("torch") is None:
            for (device, k), models in layout.items():
                member = self.pool.add(WorkerBackend(self._name(device, k), "unix:/nonexistent"), models)
                self.pool.set_state(member, State.DOWN, "the worker extra is not installed")
            log.error(
                "models %s name local devices, but torch and diffusers are not installed here: install "
                "imagegate[worker], or serve them from remote_workers",
                ", ".join(sorted({m for ms in layout.values() for m in ms})),
            )
            return
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._settings_file.write_bytes(msgspec.json.encode(self.settings))
        self._settings_file.chmod(0o600)
        for i, ((device, k), models) in enumerate(layout.items()):
            sock = self.runtime_dir / f"w{i}.sock"
            name = self._name(device, k)
            backend = WorkerBackend(
                name,
                f"unix:{sock}",
                token=self.settings.worker_token,
                connect_timeout=5.0,
                adapter_file=self.adapter_file,
            )
            worker = LocalWorker(
                device=device, models=models, socket_path=sock, member=self.pool.add(backend, models, device=device)
            )
            worker.task = asyncio.create_task(self._keep_running(worker), name=f"supervise-{name}")
            self.workers.append(worker)

    def _environment(self, w: LocalWorker) -> dict[str, str] | None:
        """The environment of ``w``'s process: the gateway's, with its own share of the cores and its service name.

        torch gives every process one thread per core, so two CPU workers would run twice as many threads as there
        are cores and slow each other down. Each CPU worker gets ``OMP_NUM_THREADS`` = cores // CPU workers (at least
        1) unless the environment sets it. Workers inherit the ``OTEL_*`` variables (they trace when the gateway
        does); a gateway named by ``OTEL_SERVICE_NAME`` has workers named ``<that name>-worker``, else they are
        ``imagegate-worker``. ``None``: the environment unchanged.
        """
        changes: dict[str, str] = {}
        if w.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            sharing = sum(device == "cpu" for device, _ in self._layout())
            changes["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // sharing))
        if os.environ.get("OTEL_SERVICE_NAME"):
            changes["OTEL_SERVICE_NAME"] = f"{os.environ['OTEL_SERVICE_NAME']}-worker"
        return {**os.environ, **changes} if changes else None

    def _command(self, w: LocalWorker) -> list[str]:
        cmd = [sys.executable, "-m", "app", "worker", "--device", w.device, "--listen", f"unix:{w.socket_path}"]
        cmd += ["--config", str(self._settings_file), "--parent-pid", str(os.getpid())]
        for m in w.models:
            cmd += ["--model", m]
        return cmd

    async def _keep_running(self, w: LocalWorker) -> None:
        backoff = 1.0
        while not self._stopping:
            w.socket_path.unlink(missing_ok=True)
            log.info("starting worker %s on %s for %s", w.member.name, w.device, ", ".join(w.models))
            started = time.monotonic()
            try:
                w.process = await asyncio.create_subprocess_exec(
                    *self._command(w), env=self._environment(w), start_new_session=True
                )
                await self._wait_ready(w)
                code: int | str = await w.process.wait()
            except OSError as e:
                code = f"a failed start ({e})"
            if self._stopping:
                self.pool.set_state(w.member, State.DOWN, f"exited with {code}")
                return
            if w.load_failure is not None:  # reloading at once would fail the same way: wait long
                wait = self.settings.load_failure_backoff
                self.pool.set_state(w.member, State.DOWN, f"cannot load: {w.load_failure} (next try in {wait:.0f}s)")
                log.error("worker %s cannot load its models; trying again in %.0fs", w.member.name, wait)
            else:
                self.pool.set_state(w.member, State.DOWN, f"exited with {code}")
                if time.monotonic() - started > STABLE_AFTER:
                    backoff = 1.0
                wait = backoff
                log.warning("worker %s exited with %s; restarting in %.0fs", w.member.name, code, wait)
                backoff = min(backoff * 2, self.settings.worker_restart_max_backoff)
            await asyncio.sleep(wait)
            w.restarts += 1
            metrics.WORKER_RESTARTS.labels(w.member.name).inc()

    async def _wait_ready(self, w: LocalWorker) -> None:
        """Poll the worker's health until it is ready, it exits, or worker_start_timeout passes."""
        assert w.process is not None
        w.load_failure = None
        self.pool.set_state(w.member, State.STARTING)
        deadline = time.monotonic() + self.settings.worker_start_timeout
        while w.process.returncode is None and time.monotonic() < deadline:
            if w.socket_path.exists():
                try:
                    info = await w.member.backend.health()
                except BackendFailed:
                    info = None
                if info is not None and info.status == "ready":
                    w.member.learn(info)
                    self.pool.set_state(w.member, State.READY)
                    log.info("worker %s ready", w.member.name)
                    return
                if info is not None and info.status == "failed":
                    log.error("worker %s failed to start: %s", w.member.name, info.error)
                    w.load_failure = info.error or "the worker failed to start"
                    break
            await asyncio.sleep(0.1)
        if w.process.returncode is None:
            if w.load_failure is None:
                log.error("worker %s did not become ready; stopping it", w.member.name)
            with contextlib.suppress(ProcessLookupError):
                w.process.kill()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self._stopping = True
        procs = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=timeout)
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for w in self.workers:
            if w.task is not None:
                w.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w.task
            await w.member.backend.close()
