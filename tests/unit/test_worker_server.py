"""The worker's HTTP handlers: a gateway that hangs up cancels quietly; adapter files; trainings streamed."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from unittest import mock

import msgspec
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

    def submit(self, params: GenerationParams, image: bytes | None, mask: bytes | None, *, trace=None) -> Job:
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


async def test_a_training_streams_to_the_gateway_which_counts_it_busy_and_a_hang_up_cancels_it(tmp_path):
    import io

    from aiohttp.test_utils import TestServer

    from app.backends.worker import WorkerBackend
    from app.worker.engine import Training
    from app.worker.protocol import Started, TrainingParams, TrainingPlan, TrainingStep

    plan = TrainingPlan(rank=4, alpha=4, steps=3, learning_rate=1e-3, resolution=64, batch_size=1, checkpoint_every=1)
    params = TrainingParams(
        model="m", plan=plan, seed=1, trigger_word="ABC12DE", captions=["ABC12DE"] * 2, image_bytes=[3, 4]
    )
    received: list[tuple[list[bytes], bytes | None]] = []
    trainings: list[Training] = []

    class Trainer:
        def train(self, p: TrainingParams, files: list[bytes], checkpoint: bytes | None) -> Training:
            received.append((files, checkpoint))
            training = Training(p)
            training.events.put_nowait(Started(queue_seconds=0.0))
            training.events.put_nowait(TrainingStep(step=1, total=3, loss=0.5))
            trainings.append(training)
            return training  # and then nothing more: the gateway hangs up

    server = TestServer(build_app(Trainer()))  # type: ignore[arg-type]
    await server.start_server()
    backend = WorkerBackend("w", f"127.0.0.1:{server.port}")
    try:
        files = [io.BytesIO(b"one"), io.BytesIO(b"four"), io.BytesIO(b"cp")]  # two images, then the checkpoint
        stream = backend.train(msgspec.structs.replace(params, checkpoint_bytes=2), files)
        assert isinstance(await anext(stream), Started)
        assert backend.training == 1  # the pool sees it training while the stream is open
        assert await anext(stream) == TrainingStep(step=1, total=3, loss=0.5)
        await stream.aclose()  # the gateway hangs up (a cancel, or its shutdown)
        assert backend.training == 0
        assert received == [([b"one", b"four"], b"cp")]
        for _ in range(100):
            if trainings[0].cancelled.is_set():
                break
            await asyncio.sleep(0.01)
        assert trainings[0].cancelled.is_set()  # the engine stops it at its next step
        async with backend._client().post(f"{backend._base}/v1/train", data=b"\x00\x00\x00\x09xx") as resp:
            assert resp.status == 400  # a malformed body runs nothing
        assert len(received) == 1
    finally:
        await backend.close()
        await server.close()
