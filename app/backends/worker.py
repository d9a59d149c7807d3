"""WorkerBackend: the gateway's client of one imagegate worker, over a Unix socket or TCP.

With tracing on, each job's request carries the current trace context (``traceparent``: the attempt's span).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import aiohttp
import msgspec

from app import telemetry
from app.errors import BackendFailed
from app.worker.protocol import (
    CONTENT_TYPE,
    FRAME_HEADER,
    TOKEN_HEADER,
    Done,
    Failed,
    GenerationParams,
    HealthInfo,
    LoraRef,
    TrainingParams,
    WorkerEvent,
    decode_event,
    encode_params,
)


def parse_address(address: str) -> tuple[str | None, str]:
    """``unix:/path.sock`` -> (socket path, base URL); ``host:port`` or ``http://host:port`` -> (None, base URL)."""
    if address.startswith("unix:"):
        return address[5:], "http://worker"
    if address.startswith(("http://", "https://")):
        return None, address.rstrip("/")
    if address.startswith("tcp://"):
        address = address[6:]
    return None, f"http://{address}"


CHUNK = 1 << 20
RECENT_ADAPTERS = 8
"""Adapters a worker client remembers as run last: what a worker most likely still has loaded (its default LRU)."""


async def _stream_body(head: bytes, attachments: Sequence[BinaryIO]) -> AsyncIterator[bytes]:
    """The job's params, then each attachment in 1 MiB chunks: uploads never sit whole in the gateway's memory."""
    yield head
    for f in attachments:
        f.seek(0)
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk


class WorkerBackend:
    """Runs jobs on an imagegate worker through its HTTP protocol (see :mod:`app.worker.protocol`)."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        token: str = "",
        connect_timeout: float = 5.0,
        adapter_file: Callable[[str], Path] | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.adapter_file = adapter_file
        """Where the gateway keeps the adapter file of a digest (jobs with LoRA adapters need it)."""
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._socket_path, self._base = parse_address(address)
        self._headers = {TOKEN_HEADER: token} if token else {}
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self.training = 0
        """LoRA trainings this gateway runs on the worker now (routing sends inference elsewhere while one does)."""

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = (
                aiohttp.UnixConnector(path=self._socket_path, limit=0)
                if self._socket_path
                else aiohttp.TCPConnector(limit=0)
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            )
        return self._session

    async def generate(
        self, params: GenerationParams, attachments: Sequence[BinaryIO] = ()
    ) -> AsyncIterator[WorkerEvent]:
        try:
            await self.send_adapters(params.loras)
        except FileNotFoundError:  # deleted since the request named it: the request's fault, not the worker's
            yield Failed("A LoRA adapter of the request was deleted meanwhile.", "invalid_request", "loras")
            return
        except (aiohttp.ClientError, OSError) as e:
            raise BackendFailed(f"worker {self.name} is unreachable: {e}") from None
        async with contextlib.aclosing(self._stream("/v1/generate", encode_params(params), attachments)) as events:
            async for event in events:
                yield event

    async def train(self, params: TrainingParams, files: Sequence[BinaryIO]) -> AsyncIterator[WorkerEvent]:
        """Run a LoRA training (its images, then the checkpoint to resume from, in ``files``); events as generate."""
        self.training += 1
        try:
            async with contextlib.aclosing(self._stream("/v1/train", encode_params(params), files)) as events:
                async for event in events:
                    yield event
        finally:
            self.training -= 1

    async def _stream(self, path: str, head: bytes, attachments: Sequence[BinaryIO]) -> AsyncIterator[WorkerEvent]:
        body = _stream_body(head, attachments) if attachments else head
        headers = {"content-type": CONTENT_TYPE}
        if telemetry.ENABLED:  # the worker's spans of the job join the request's trace, under the attempt's span
            telemetry.inject(headers)
        try:
            resp = await self._client().post(f"{self._base}{path}", data=body, headers=headers)
        except (aiohttp.ClientError, OSError) as e:
            raise BackendFailed(f"worker {self.name} is unreachable: {e}") from None
        finished = False
        try:
            if resp.status != 200:
                text = (await resp.text())[:500]
                raise BackendFailed(f"worker {self.name} answered {resp.status}: {text}")
            while True:
                try:
                    header = await resp.content.readexactly(FRAME_HEADER.size)
                    (length,) = FRAME_HEADER.unpack(header)
                    event = decode_event(await resp.content.readexactly(length))
                except (asyncio.IncompleteReadError, aiohttp.ClientError, OSError):
                    raise BackendFailed(f"worker {self.name} closed the stream before the job ended") from None
                except msgspec.DecodeError as e:
                    raise BackendFailed(f"worker {self.name} sent a malformed event: {e}") from None
                yield event
                if isinstance(event, Done | Failed):
                    finished = True
                    return
        finally:
            if finished:
                resp.release()
            else:
                # Closing the connection is what tells the worker to cancel the job.
                resp.close()

    @property
    def adapters(self) -> frozenset[str]:
        """Digests of the adapters this worker ran last (so most likely still loaded): routing prefers it for them."""
        return frozenset(self._recent)

    def _ran(self, digest: str) -> None:
        self._recent[digest] = None
        self._recent.move_to_end(digest)
        while len(self._recent) > RECENT_ADAPTERS:
            self._recent.popitem(last=False)

    async def send_adapters(self, loras: Sequence[LoraRef]) -> None:
        """Make sure the worker has each adapter's file: it keeps them by digest, so each is sent once.

        The worker is asked each time (a restarted worker has lost what it was sent), which costs a round trip on
        the local socket or the network, not a transfer.
        """
        for ref in loras:
            url = f"{self._base}/adapters/{ref.digest}"
            async with self._client().head(url) as resp:
                if resp.status == 200:
                    self._ran(ref.digest)
                    continue
            if self.adapter_file is None:
                raise BackendFailed(f"worker {self.name} lacks adapter {ref.digest[:12]} and none can be sent")
            data = await asyncio.to_thread(self.adapter_file(ref.digest).read_bytes)
            async with self._client().put(url, data=data) as resp:
                if resp.status != 204:
                    text = (await resp.text())[:200]
                    raise BackendFailed(f"worker {self.name} refused adapter {ref.digest[:12]}: {resp.status} {text}")
            self._ran(ref.digest)

    async def health(self) -> HealthInfo:
        try:
            async with self._client().get(
                f"{self._base}/health", timeout=aiohttp.ClientTimeout(total=self._connect_timeout)
            ) as resp:
                if resp.status != 200:
                    raise BackendFailed(f"worker {self.name} health answered {resp.status}")
                return msgspec.json.decode(await resp.read(), type=HealthInfo)
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError) as e:
            raise BackendFailed(f"worker {self.name} health check failed: {e}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
