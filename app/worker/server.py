"""The worker's small HTTP app (aiohttp): health, generation, training and adapter files (see :mod:`.protocol`).

With tracing on, a job's request is a server span, child of the ``traceparent`` the gateway sent (its attempt's
span); the engine adds the job's own spans under it (queue, pipeline, denoising, preview, encode).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
from pathlib import Path

import msgspec
from aiohttp import web

from app import telemetry
from app.config import ModelConfig
from app.worker.engine import Engine, Job, Training
from app.worker.protocol import (
    CONTENT_TYPE,
    FRAME_HEADER,
    TOKEN_HEADER,
    Done,
    Failed,
    WorkerEvent,
    decode_params,
    decode_training,
    encode_frame,
)

log = logging.getLogger("imagegate.worker")

FAILED_LINGER = 30.0
"""Seconds a worker whose models failed to load keeps answering health with the reason before it exits."""

MAX_ADAPTER_BYTES = 2 << 30
"""Largest adapter file a worker takes (large LoRAs of large models are hundreds of MB)."""

ENGINE = web.AppKey("engine", Engine)
TOKEN = web.AppKey("token", str)


async def health(request: web.Request) -> web.Response:
    info = request.app[ENGINE].health()
    return web.Response(body=msgspec.json.encode(info), content_type="application/json")


async def _head(request: web.Request) -> bytes:
    """The length-prefixed params at the start of a job's body."""
    (length,) = FRAME_HEADER.unpack(await request.content.readexactly(FRAME_HEADER.size))
    return await request.content.readexactly(length)


async def generate(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return web.Response(status=401, text="bad worker token")
    try:
        params = decode_params(await _head(request))
        image = await request.content.readexactly(params.image_bytes) if params.image_bytes else None
        mask = await request.content.readexactly(params.mask_bytes) if params.mask_bytes else None
    except (msgspec.DecodeError, asyncio.IncompleteReadError) as e:
        return web.Response(status=400, text=f"malformed job: {e}")
    engine = request.app[ENGINE]
    span = _server_span(request, params.request_id, params.model) if telemetry.ENABLED else None
    last: WorkerEvent | None = None
    try:
        response = web.StreamResponse(headers={"content-type": CONTENT_TYPE})
        try:
            await response.prepare(request)  # first: a gateway that already hung up gets no job run for nobody
        except ConnectionResetError:
            engine.cancelled += 1
            log.debug("job %s: the gateway hung up before it started", params.request_id)
            return response
        trace = None if span is None else telemetry.context_with(span)
        last = await _relay(response, engine.submit(params, image, mask, trace=trace), params.request_id)
        return response
    finally:
        if span is not None:
            _end(span, last)


def _server_span(request: web.Request, request_id: str, model: str) -> telemetry.Span:
    """A job's server span, child of the trace context in its request (the gateway's attempt)."""
    attributes = {
        "http.request.method": "POST",
        "http.route": "/v1/generate",
        "imagegate.job": request_id,
        "imagegate.model": model,
    }
    context = telemetry.extract(request.headers)
    return telemetry.start_span("POST /v1/generate", context=context, attributes=attributes, server=True)


def _end(span: telemetry.Span, last: WorkerEvent | None) -> None:
    """End a job's server span: failed with the job's error, or cancelled when the gateway hung up."""
    if isinstance(last, Failed):
        if last.kind == "cancelled":
            span.set_attribute("imagegate.cancelled", True)
        else:
            telemetry.fail(span, f"{last.kind}: {last.message}")
    elif last is None:
        span.set_attribute("imagegate.cancelled", True)
    span.end()


async def _relay(response: web.StreamResponse, job: Job | Training, request_id: str) -> WorkerEvent | None:
    """Write ``job``'s events to the gateway until its last, and return that; a gateway that hangs up cancels it."""
    finished = False
    try:
        while not finished:
            event: WorkerEvent = await job.events.get()
            finished = isinstance(event, Done | Failed)
            await response.write(encode_frame(event))
        return event
    except ConnectionResetError:  # a hang-up is how a gateway cancels: the engine counts the job as cancelled
        log.debug("job %s: the gateway hung up", request_id)
        return None
    finally:
        if not finished:  # the gateway hung up (or we are shutting down): stop the job at its next step
            job.cancel()
        if isinstance(job, Job) and job.spans is not None:
            job.spans.finish()


async def train(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return web.Response(status=401, text="bad worker token")
    try:
        params = decode_training(await _head(request))
        files = [await request.content.readexactly(n) for n in params.image_bytes]
        checkpoint = await request.content.readexactly(params.checkpoint_bytes) if params.checkpoint_bytes else None
    except (msgspec.DecodeError, asyncio.IncompleteReadError) as e:
        return web.Response(status=400, text=f"malformed training: {e}")
    response = web.StreamResponse(headers={"content-type": CONTENT_TYPE})
    try:
        await response.prepare(request)
    except ConnectionResetError:
        return response
    await _relay(response, request.app[ENGINE].train(params, files, checkpoint), params.request_id)
    return response


def _authorized(request: web.Request) -> bool:
    token = request.app[TOKEN]
    return not token or hmac.compare_digest(request.headers.get(TOKEN_HEADER, "").encode(), token.encode())


async def has_adapter(request: web.Request) -> web.Response:
    if not _authorized(request):
        return web.Response(status=401, text="bad worker token")
    try:
        found = request.app[ENGINE].adapter_files.has(request.match_info["digest"])
    except ValueError as e:
        return web.Response(status=400, text=str(e))
    return web.Response(status=200 if found else 404)


async def put_adapter(request: web.Request) -> web.Response:
    """Keep an adapter file the gateway sends, under the SHA-256 of its bytes (checked)."""
    if not _authorized(request):
        return web.Response(status=401, text="bad worker token")
    files = request.app[ENGINE].adapter_files
    try:
        await asyncio.to_thread(files.put, request.match_info["digest"], await request.read())
    except ValueError as e:
        return web.Response(status=400, text=str(e))
    return web.Response(status=204)


def build_app(engine: Engine, token: str = "") -> web.Application:
    app = web.Application(client_max_size=MAX_ADAPTER_BYTES)
    app[ENGINE] = engine
    app[TOKEN] = token
    app.router.add_get("/health", health)
    app.router.add_post("/v1/generate", generate)
    app.router.add_post("/v1/train", train)
    app.router.add_route("HEAD", "/adapters/{digest}", has_adapter)
    app.router.add_put("/adapters/{digest}", put_adapter)
    return app


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    log.warning("the gateway (pid %d) is gone; stopping", parent_pid)
    stop.set()


async def serve(
    device: str,
    listen: str,
    models: list[ModelConfig],
    *,
    token: str = "",
    parent_pid: int | None = None,
    batch_window_ms: float = 5.0,
) -> int:
    """Listen on ``listen`` at once (health answers ``loading``), load the models, serve until stopped."""
    engine = Engine(device, models, batch_window_ms=batch_window_ms)
    runner = web.AppRunner(build_app(engine, token), handler_cancellation=True, access_log=None)
    await runner.setup()
    if listen.startswith("unix:"):
        path = Path(listen[5:])
        path.unlink(missing_ok=True)
        site: web.BaseSite = web.UnixSite(runner, str(path))
        await site.start()
        path.chmod(0o600)
    else:
        host, _, port = listen.removeprefix("tcp://").rpartition(":")
        site = web.TCPSite(runner, host or "0.0.0.0", int(port))
        await site.start()
    log.info("worker for %s on %s listening on %s", ", ".join(m.name for m in models), device, listen)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
    code = 0
    try:
        loading = asyncio.create_task(engine.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([loading, stopped], return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is not None:
            engine.status, engine.error = "failed", str(loading.exception())
            log.error("cannot start: %s", engine.error)
            code = 3
            # Health answers "failed" with the reason until the supervisor has read it and stops us (or a while).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped, FAILED_LINGER)
        else:
            await stopped
    finally:
        if watcher is not None:
            watcher.cancel()
        await engine.stop()
        with contextlib.suppress(Exception):
            await runner.cleanup()
    return code
