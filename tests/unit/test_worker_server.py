"""The worker's HTTP handler when the gateway hangs up: a cancellation, logged at debug, never an error."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from unittest import mock

import pytest
from aiohttp import StreamReader
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import make_mocked_request

from app.worker.engine import Job
from app.worker.protocol import GenerationParams, Progress, encode_params
from app.worker.server import build_app, generate

PARAMS = GenerationParams(
    model="m", prompt="p", width=64, height=64, steps=2, guidance=7.5, seed=1, request_id="req_hangup"
)


class FakeEngine:
    """Takes jobs and holds them; counts cancellations as the real engine's health does."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.cancelled = 0

    def submit(self, params: GenerationParams, image: bytes | None, mask: bytes | None) -> Job:
        job = Job(params, image, mask)
        job.events.put_nowait(Progress(step=1, total=2))
        self.jobs.append(job)
        return job


class Transport:
    """A socket transport whose peer can go away: once closing, aiohttp refuses to write to it."""

    def __init__(self, closing: bool) -> None:
        self.closing = closing
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        self.closing = True  # the gateway hangs up right after the response starts

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def request(engine: FakeEngine, transport: Transport):
    loop = asyncio.get_running_loop()
    protocol = mock.Mock(transport=transport, _reading_paused=False)
    payload = StreamReader(protocol, 2**16, loop=loop)
    payload.feed_data(encode_params(PARAMS))
    payload.feed_eof()
    app = build_app(engine)  # type: ignore[arg-type]
    return make_mocked_request(
        "POST",
        "/v1/generate",
        app=app,
        payload=payload,
        protocol=protocol,
        transport=transport,
        writer=StreamWriter(protocol, loop),
    )


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG, logger="imagegate.worker")
    return caplog


async def test_a_hang_up_before_the_job_starts_runs_nothing_and_counts_as_cancelled(logs):
    engine = FakeEngine()
    await generate(request(engine, Transport(closing=True)))
    assert engine.jobs == []
    assert engine.cancelled == 1
    assert [r.levelno for r in logs.records] == [logging.DEBUG]
    assert "req_hangup" in logs.records[0].getMessage()


async def test_a_hang_up_mid_stream_cancels_the_job_quietly(logs):
    engine = FakeEngine()
    transport = Transport(closing=False)
    await generate(request(engine, transport))
    assert transport.written  # the response had started
    [job] = engine.jobs
    assert job.cancelled.is_set()  # the engine ends it at its next step and counts it as cancelled
    assert [r.levelno for r in logs.records] == [logging.DEBUG]


async def test_adapters_are_sent_once_by_digest_and_checked(tmp_path):
    from aiohttp.test_utils import TestServer

    from app.backends.worker import WorkerBackend
    from app.errors import BackendFailed
    from app.worker.adapters import AdapterFiles
    from app.worker.protocol import LoraRef

    data = b"adapter bytes"
    digest = hashlib.sha256(data).hexdigest()
    source = tmp_path / f"{digest}.safetensors"
    source.write_bytes(data)
    engine = mock.Mock(adapter_files=AdapterFiles(tmp_path / "worker"))
    server = TestServer(build_app(engine, token="t"))
    await server.start_server()
    sent: list[str] = []

    def adapter_file(d: str):
        sent.append(d)
        return source

    backend = WorkerBackend("w", f"127.0.0.1:{server.port}", token="t", adapter_file=adapter_file)
    try:
        await backend.send_adapters([LoraRef(digest, 1.0)])
        await backend.send_adapters([LoraRef(digest, 0.5)])
        assert sent == [digest] and engine.adapter_files.path(digest).read_bytes() == data
        other = hashlib.sha256(b"other").hexdigest()  # the gateway's file does not match its digest: refused
        with pytest.raises(BackendFailed, match="refused adapter"):
            await backend.send_adapters([LoraRef(other, 1.0)])
        assert not engine.adapter_files.has(other)
        stranger = WorkerBackend("w", f"127.0.0.1:{server.port}", token="wrong", adapter_file=adapter_file)
        with pytest.raises(BackendFailed):
            await stranger.send_adapters([LoraRef(other, 1.0)])
        await stranger.close()
    finally:
        await backend.close()
        await server.close()
