"""The application factory: long-lived objects are made in the lifespan and kept on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import FrameType

import uvicorn
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.plugins.prometheus import PrometheusController
from litestar.static_files import create_static_files_router

from app.api.admin import AdaptersController, AdminController
from app.api.custom import CustomModelsController
from app.api.errors import EXCEPTION_HANDLERS
from app.api.hf import HuggingFaceController
from app.api.images import ImagesController, UploadsController
from app.api.infer import InferController
from app.api.instrument import HEADER as OVERHEAD_HEADER
from app.api.instrument import REQUEST_ID_HEADER, instrument_middleware
from app.api.jobs import JobsController, WebhookSecretsController
from app.api.modelslab import ModelsLabController
from app.api.playground import STATIC_DIR, PlaygroundController
from app.api.sdapi import SdApiController
from app.api.system import SystemController
from app.auth.guard import Guard
from app.auth.middleware import AuthMiddleware
from app.auth.principals import Authenticator
from app.backends.base import Backend
from app.config import Settings
from app.contract import bundled_yaml
from app.pool import POLICIES, Breaker, Pool
from app.pool import State as BackendState
from app.pool.remote import RemoteWorkers
from app.pool.supervisor import Supervisor
from app.services.adapters import AdapterRegistry
from app.services.custom import CustomModelService
from app.services.images import ImageService
from app.services.infer import InferService, make_enhancer
from app.services.jobs import JobService
from app.services.keys import KeyService
from app.services.modelslab import ModelsLabService
from app.services.sdapi import SdApiService
from app.services.webhooks import WebhookSender
from app.store.adapters import AdapterStore
from app.store.custom import CustomModelStore
from app.store.db import Database
from app.store.files import JOB_ROUTE, ImageFiles, load_or_create_secret
from app.store.jobs import JobStore
from app.store.keys import SqlKeyStore

log = logging.getLogger("imagegate")


def create_app(
    settings: Settings,
    *,
    backends: Sequence[tuple[Backend, Sequence[str]]] | None = None,
    clock: Callable[[], float] = time.time,
) -> Litestar:
    """Build the gateway.

    Args:
        settings: the effective settings.
        backends: ``(backend, model names)`` pairs to serve from instead of spawning local workers (tests,
            benchmarks); they count as ready at once.
        clock: wall-clock time for quotas, key expiry and usage (tests move it).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state = app.state
        data_dir = Path(settings.data_dir)
        secret = settings.url_secret.encode() if settings.url_secret else load_or_create_secret(data_dir / "secret")
        files = ImageFiles(data_dir / "images", secret, settings.url_ttl)
        pool = Pool(
            settings.resolved_models(),
            POLICIES[settings.routing](),
            weights=settings.backend_weights,
            breaker=Breaker(settings.cooldown_failures, settings.cooldown_window, settings.cooldown_seconds),
        )
        supervisor: Supervisor | None = None
        remote: RemoteWorkers | None = None
        runtime_dir = Path(tempfile.mkdtemp(prefix="imagegate-"))
        db = Database(settings.database())
        adapter_store = AdapterStore(db, data_dir / "adapters")
        adapters = AdapterRegistry(settings, adapter_store, clock=clock)
        await asyncio.to_thread(adapters.scan)
        if backends is None:
            supervisor = Supervisor(settings, pool, runtime_dir, adapter_file=adapters.file)
            await supervisor.start()
            remote = RemoteWorkers(settings, pool, settings.health_interval, adapter_file=adapters.file)
            await remote.start()
        else:
            for backend, models in backends:
                pool.add(backend, models, state=BackendState.READY)
        store = SqlKeyStore(db)
        guard = Guard(store, clock=clock)
        images = ImageService(settings, pool, files, guard=guard, adapters=adapters)
        job_store = JobStore(db)
        job_files = ImageFiles(data_dir / "job-files", secret, settings.url_ttl, route=JOB_ROUTE)
        jobs = JobService(settings, job_store, images, job_files, guard=guard, clock=clock)
        webhooks = WebhookSender(settings, job_store, clock=clock)
        jobs.on_change.append(webhooks.wake)
        enhancer = make_enhancer(settings)
        auth = Authenticator(settings, store, clock=clock)
        custom = CustomModelService(settings, CustomModelStore(db), jobs, images, adapter_store, clock=clock)
        jobs.start()
        webhooks.start()
        sweeper = asyncio.create_task(files.sweep_forever(), name="sweep-image-files")
        prober = asyncio.create_task(pool.probe_back_forever(settings.health_interval), name="probe-back")
        state.update(
            pool=pool,
            files=files,
            images=images,
            jobs=jobs,
            infer=InferService(settings, images, jobs, enhancer, custom),
            custom=custom,
            sdapi=SdApiService(images, jobs),
            modelslab=ModelsLabService(images, jobs, auth, enhancer, job_files),
            job_files=job_files,
            adapters=adapters,
            webhooks=webhooks,
            supervisor=supervisor,
            auth=auth,
            keys=KeyService(store, clock=clock),
        )
        try:
            yield
        finally:
            sweeper.cancel()
            prober.cancel()
            await jobs.stop()
            await webhooks.stop()
            await enhancer.close()
            await guard.drain()
            db.close()
            if supervisor is not None and remote is not None:
                await remote.stop()
                await supervisor.stop()
            else:
                for member in pool.members:
                    await member.backend.close()
            shutil.rmtree(runtime_dir, ignore_errors=True)

    started_at = int(time.time())
    contract = bundled_yaml()

    def from_state(key: str) -> Provide:
        def provide(state: State) -> object:
            return state[key]

        return Provide(provide, sync_to_thread=False)

    uploads = type("UploadsController", (UploadsController,), {"request_max_body_size": settings.max_upload_size})
    static = create_static_files_router(path="/static", directories=[STATIC_DIR], name="static")
    cors = (
        CORSConfig(
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=[
                "authorization",
                "content-type",
                "x-api-key",
                "x-bf-vk",
                "prefer",
                "idempotency-key",
                REQUEST_ID_HEADER.decode(),
                "traceparent",
                "tracestate",
            ],
            expose_headers=[
                "retry-after",
                "x-should-retry",
                "www-authenticate",
                "location",
                "preference-applied",
                OVERHEAD_HEADER.decode(),
                REQUEST_ID_HEADER.decode(),
            ],
        )
        if settings.cors_origins
        else None
    )
    return Litestar(
        route_handlers=[
            ImagesController,
            uploads,
            JobsController,
            WebhookSecretsController,
            InferController,
            CustomModelsController,
            HuggingFaceController,
            SdApiController,
            ModelsLabController,
            AdminController,
            AdaptersController,
            SystemController,
            PrometheusController,
            PlaygroundController,
            static,
        ],
        cors_config=cors,
        lifespan=[lifespan],
        state=State({"settings": settings}),
        dependencies={
            "pool": from_state("pool"),
            "images": from_state("images"),
            "files": from_state("files"),
            "job_files": from_state("job_files"),
            "jobs": from_state("jobs"),
            "adapters": from_state("adapters"),
            "infer": from_state("infer"),
            "custom": from_state("custom"),
            "sdapi": from_state("sdapi"),
            "modelslab": from_state("modelslab"),
            "webhooks": from_state("webhooks"),
            "keys": from_state("keys"),
            "started_at": Provide(lambda: started_at, sync_to_thread=False),
            "contract": Provide(lambda: contract, sync_to_thread=False),
            "settings": Provide(lambda: settings, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        middleware=[instrument_middleware, AuthMiddleware],
        request_max_body_size=settings.max_body_size,
        openapi_config=None,
        logging_config=None,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining before it stops.

    The first SIGTERM (or SIGINT) keeps the listener open but makes the pool refuse new image requests with 503
    (and ``/ready`` answer ``draining``, so load balancers move on); requests in flight have ``drain_timeout``
    seconds to finish. Then the local workers stop (a stream still running gets an ``error`` event) and uvicorn
    shuts down as usual. A second signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, app: Litestar, drain_timeout: float) -> None:
        super().__init__(config)
        self.litestar = app
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        # What start-up made (modules, the app, its services) lives as long as the process. Frozen, it is left out
        # of the collector's full passes, which would otherwise walk it every minute or so under load (about 90 ms
        # each, every request in flight waiting).
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None or "pool" not in self.litestar.state:
            super().handle_exit(sig, frame)
            return
        log.info("draining: new requests get 503; up to %gs for those in flight", self.drain_timeout)
        self._drain = self._loop.create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.litestar.state
        if not await state.pool.drain(self.drain_timeout):
            log.warning("requests still in flight after %gs; stopping them", self.drain_timeout)
            if state.supervisor is not None:
                await state.supervisor.stop()
        super().handle_exit(sig, frame)
