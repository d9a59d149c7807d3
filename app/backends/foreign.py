"""Backends that speak other image APIs, behind the same :class:`~app.backends.base.Backend` interface as a worker.

A Hugging Face endpoint (``type = "hf_endpoint"``) and a ModelsLab-style API (``type = "modelslab"``).

They answer like a worker: ``Started``, one ``Image`` per image (re-encoded to the format asked for when the API
sent another), ``Done``; a refusal of the request is a ``Failed`` (``invalid_request``), anything else of theirs a
:class:`~app.errors.BackendFailed`, so the pool counts it against the backend and fails over. Neither can apply this
gateway's LoRA adapters. Keys come from the configuration, never from the caller, and are never logged.

- **Hugging Face**: one request per image (the contracts make one), with the image's seed; ``X-Scale-Up-Timeout``
  on every request. A 502 or 503 means the endpoint is scaling up or loading: the request waits ``estimated_time``
  (at most what is left of ``timeout``) and tries again, and health says ``loading`` meanwhile. ``mode = "task"``
  posts ``{"inputs", "parameters"}`` and reads the image's bytes; ``mode = "handler"`` posts seed 003's flat keys
  and reads ``{"image": base64}`` (it takes no seed).
- **ModelsLab**: ``POST {base}/images/text2img`` (img2img and inpaint with base64 inputs) with the configured key in
  the body and every default made explicit (no safety checker, no prompt enhancement); a ``processing`` answer is
  fetched every ``max(poll_interval, min(eta, 10))`` seconds until it ends or ``timeout`` passes; the output links
  are downloaded (a link that is not there yet is tried again), or decoded when they hold base64.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, BinaryIO

import aiohttp
import msgspec
from PIL import Image as PILImage

from app.config import ConfigError, UpstreamConfig
from app.errors import BackendFailed
from app.worker.protocol import Done, Failed, GenerationParams, HealthInfo, Image, Started, WorkerEvent

SCALE_UP_TIMEOUT = 600
"""Seconds a Hugging Face endpoint that scaled to zero is asked to hold a request while it starts."""
MODELSLAB_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "dpmpp_sde": "DPMSolverSinglestepScheduler",
    "kdpm2_a": "KDPM2AncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "lcm": "LCMScheduler",
}
"""imagegate's scheduler names -> the diffusers class names ModelsLab takes."""
LINK_RETRIES = 5


def _encoded(data: bytes, fmt: str) -> bytes:
    """``data`` in ``fmt`` (re-encoded only when the API sent another format)."""
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            if (image.format or "").lower() == {"jpeg": "jpeg"}.get(fmt, fmt):
                return data
            out = io.BytesIO()
            picture = image.convert("RGB") if fmt == "jpeg" else image
            picture.save(out, fmt.upper())
            return out.getvalue()
    except (OSError, SyntaxError) as e:
        raise BackendFailed(f"the upstream sent no readable image: {e}") from None


def _key(config: UpstreamConfig, environ: Mapping[str, str] | None) -> str:
    if not config.api_key_env:
        return ""
    key = (os.environ if environ is None else environ).get(config.api_key_env, "")
    if not key:
        raise ConfigError(f"upstream {config.name!r}: the environment variable {config.api_key_env} is not set")
    return key


class _Foreign:
    """What both adapters share: the session, the key, the model map, and refusing what they cannot run."""

    tasks: tuple[str, ...] = ("text2img",)

    def __init__(self, config: UpstreamConfig, environ: Mapping[str, str] | None = None) -> None:
        self.name = config.name
        self.config = config
        self.key = _key(config, environ)
        self._base = config.base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.timeout, sock_read=config.timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout)
        return self._session

    def _refusal(self, params: GenerationParams) -> Failed | None:
        if params.clip_skip and isinstance(self, HFEndpointBackend):
            return Failed(f"upstream {self.name} cannot skip text-encoder layers (clip_skip)", "invalid_request")
        if params.loras:
            return Failed(f"upstream {self.name} cannot apply this gateway's LoRA adapters", "invalid_request", "loras")
        if params.task not in self.tasks:
            what = params.task.replace("_", " ")
            return Failed(
                f"The model '{params.model}' is served by an upstream that cannot do {what}.", "invalid_request"
            )
        return None

    async def generate(
        self, params: GenerationParams, attachments: Sequence[BinaryIO] = ()
    ) -> AsyncIterator[WorkerEvent]:
        """Started, each image (in the format asked for), Done; a Failed for what the upstream refuses."""
        refusal = self._refusal(params)
        if refusal is not None:
            yield refusal
            return
        t0 = time.monotonic()
        yield Started(queue_seconds=0.0)
        try:
            async for i, data in self._images(params, attachments, t0 + self.config.timeout):
                encoded = await asyncio.to_thread(_encoded, data, params.output_format)
                yield Image(index=i, data=encoded, seed=params.seed + i)
        except _Refused as e:
            yield Failed(e.message, e.kind)
            return
        yield Done(seconds=time.monotonic() - t0)

    def _images(
        self, params: GenerationParams, attachments: Sequence[BinaryIO], deadline: float
    ) -> AsyncIterator[tuple[int, bytes]]:
        """(index, image bytes as the API sent them) for each image; raises _Refused or BackendFailed."""
        raise NotImplementedError

    def _health(self, models_ready: bool, detail: str = "") -> HealthInfo:
        return HealthInfo(
            status="ready" if models_ready else "loading",
            device="upstream",
            models=list(self.config.models),
            error=detail or None,
            tasks={model: list(self.tasks) for model in self.config.models},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HFEndpointBackend(_Foreign):
    """A Hugging Face Inference Endpoint (or the serverless task API): see the module docstring."""

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"accept": accept, "content-type": "application/json", "x-scale-up-timeout": str(SCALE_UP_TIMEOUT)}
        if self.key:
            headers["authorization"] = f"Bearer {self.key}"
        return headers

    def _body(self, params: GenerationParams, seed: int) -> dict[str, Any]:
        if self.config.mode == "handler":  # seed 003: flat keys, no seed
            body: dict[str, Any] = {
                "inputs": params.prompt,
                "height": params.height,
                "width": params.width,
                "guidance_scale": params.guidance,
                "inference_steps": params.steps,
            }
            if params.negative_prompt:
                body["negative_prompt"] = params.negative_prompt
            return body
        parameters: dict[str, Any] = {
            "height": params.height,
            "width": params.width,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "seed": seed,
        }
        if params.negative_prompt:
            parameters["negative_prompt"] = params.negative_prompt
        return {"inputs": params.prompt, "parameters": parameters}

    async def _one(self, params: GenerationParams, seed: int, deadline: float) -> bytes:
        """One image, waiting out a loading endpoint until ``deadline``."""
        accept = "application/json" if self.config.mode == "handler" else f"image/{params.output_format}"
        body = msgspec.json.encode(self._body(params, seed))
        while True:
            try:
                async with self._client().post(self._base, data=body, headers=self._headers(accept)) as resp:
                    data = await resp.read()
                    status, content_type = resp.status, resp.content_type
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                raise BackendFailed(f"upstream {self.name} is unreachable: {e or type(e).__name__}") from None
            if status in (502, 503):  # scaling up from zero, or the model is loading
                wait = _estimated_time(data)
                if time.monotonic() + wait > deadline:
                    raise BackendFailed(f"upstream {self.name} is still loading the model")
                await asyncio.sleep(wait)
                continue
            if status != 200:
                raise _hf_error(self.name, status, data)
            if self.config.mode == "handler":
                return _b64(_json(data, self.name).get("image"), self.name)
            if content_type == "application/json":
                raise BackendFailed(f"upstream {self.name} answered JSON where an image was expected")
            return data

    async def _images(
        self, params: GenerationParams, attachments: Sequence[BinaryIO], deadline: float
    ) -> AsyncIterator[tuple[int, bytes]]:
        for i in range(params.n):
            yield i, await self._one(params, params.seed + i, deadline)

    async def health(self) -> HealthInfo:
        """The toolkit's ``GET /health`` (task mode: the URL itself): ready, or loading while it scales up."""
        url = f"{self._base}/health" if self.config.mode == "handler" else self._base
        try:
            async with self._client().get(url, headers=self._headers("*/*")) as resp:
                if resp.status in (502, 503):
                    return self._health(False, "the endpoint is starting")
                if resp.status >= 500 or resp.status in (401, 403):
                    raise BackendFailed(f"upstream {self.name} health answered {resp.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendFailed(f"upstream {self.name} is unreachable: {e or type(e).__name__}") from None
        return self._health(True)


class _Refused(Exception):
    """The upstream refused the request itself (not a fault of the backend)."""

    def __init__(self, message: str, kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


def _json(data: bytes, name: str) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise BackendFailed(f"upstream {name} answered something that is not JSON") from None
    if not isinstance(body, dict):
        raise BackendFailed(f"upstream {name} answered JSON that is not an object")
    return body


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise BackendFailed(f"upstream {name} answered without an image")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        raise BackendFailed(f"upstream {name} sent an image that is not base64") from None


def _estimated_time(data: bytes) -> float:
    try:
        body = msgspec.json.decode(data)
        return max(0.5, min(float(body.get("estimated_time", 5.0)), 60.0))
    except (msgspec.DecodeError, AttributeError, TypeError, ValueError):
        return 5.0


def _hf_error(name: str, status: int, data: bytes) -> Exception:
    try:
        error = msgspec.json.decode(data).get("error")
    except (msgspec.DecodeError, AttributeError):
        error = None
    message = (
        "; ".join(map(str, error)) if isinstance(error, list) else str(error or data[:200].decode(errors="replace"))
    )
    if "out of memory" in message.lower():
        return _Refused(f"upstream {name}: {message}", "out_of_memory")
    if 400 <= status < 500 and status not in (401, 403, 408, 429):  # the request's fault (the toolkit's blanket 400)
        return _Refused(f"upstream {name} refused the request: {message}")
    return BackendFailed(f"upstream {name} answered {status}: {message}")


class ModelsLabBackend(_Foreign):
    """A ModelsLab-style API: see the module docstring."""

    tasks = ("text2img", "img2img", "inpaint")

    def _body(self, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "key": self.key,
            "model_id": self.config.models.get(params.model, params.model),
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "width": params.width,
            "height": params.height,
            "samples": params.n,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "seed": params.seed,
            "clip_skip": (params.clip_skip or 0) + 1,
            "safety_checker": params.safety not in (None, "auto"),
            "safety_checker_type": params.safety if params.safety not in (None, "auto") else None,
            "enhance_prompt": False,
            "base64": False,
            "webhook": None,
            "track_id": None,
        }
        if params.scheduler in MODELSLAB_SCHEDULERS:
            body["scheduler"] = MODELSLAB_SCHEDULERS[params.scheduler]
            body["use_karras_sigmas"] = params.scheduler == "dpmpp_2m_karras"
        return body

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self._client().post(url, json=body) as resp:
                data, status = await resp.read(), resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendFailed(f"upstream {self.name} is unreachable: {e or type(e).__name__}") from None
        answer = _json(data, self.name) if data.strip().startswith(b"{") else {}
        message = str(answer.get("message") or answer.get("messege") or f"status {status}")
        if status in (400, 404, 422):
            raise _Refused(f"upstream {self.name} refused the request: {message}")
        if status != 200:
            raise BackendFailed(f"upstream {self.name} answered {status}: {message}")
        return answer

    async def _download(self, link: str) -> bytes:
        for attempt in range(LINK_RETRIES):  # links can 404 for a moment after success
            try:
                async with self._client().get(link) as resp:
                    data, status = await resp.read(), resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                raise BackendFailed(f"upstream {self.name}: downloading an image failed: {e}") from None
            if status == 200 and not data.lstrip().startswith(b"<!DOCTYPE"):
                return data
            await asyncio.sleep(0.5 * (attempt + 1))
        raise BackendFailed(f"upstream {self.name}: an image link stayed unavailable")

    async def _image(self, item: Any) -> bytes:
        """An output item: a link to an image or to base64 text (``.base64``), or base64 itself."""
        if isinstance(item, str) and item.startswith(("http://", "https://")):
            data = await self._download(item)
            head = data[:16]
            if head.startswith((b"\x89PNG", b"\xff\xd8", b"RIFF", b"GIF8")):
                return data
            return _b64(data.decode(errors="replace").strip(), self.name)
        return _b64(item, self.name)

    async def _images(
        self, params: GenerationParams, attachments: Sequence[BinaryIO], deadline: float
    ) -> AsyncIterator[tuple[int, bytes]]:
        body = self._body(params)
        if params.task != "text2img":
            files = [await asyncio.to_thread(_read, f) for f in attachments[:2]]
            body.update(base64=True, strength=params.strength, init_image=base64.b64encode(files[0]).decode())
            if params.task == "inpaint" and len(files) > 1:
                body["mask_image"] = base64.b64encode(files[1]).decode()
        answer = await self._post(f"{self._base}/images/{params.task}", body)
        fetch = str(answer.get("fetch_result") or f"{self._base}/images/fetch/{answer.get('id')}")
        while answer.get("status") == "processing":  # a fetch still processing says neither id nor where
            if time.monotonic() > deadline:
                raise BackendFailed(f"upstream {self.name} did not finish within {self.config.timeout:g}s")
            eta = float(answer.get("eta") or 0)
            await asyncio.sleep(max(self.config.poll_interval, min(eta, 10.0)))
            answer = await self._post(fetch, {"key": self.key})
        if answer.get("status") != "success":
            message = answer.get("message") or answer.get("messege") or "the generation failed"
            raise _Refused(f"upstream {self.name}: {message}", "generation_failed")
        output = answer.get("output") or answer.get("proxy_links") or []
        if isinstance(output, dict):
            output = [output[k] for k in sorted(output)]
        elif isinstance(output, str):
            output = [output]
        if len(output) < params.n:
            raise BackendFailed(f"upstream {self.name} sent {len(output)} of {params.n} images")
        for i, item in enumerate(output[: params.n]):
            yield i, await self._image(item)

    async def health(self) -> HealthInfo:
        """``system_load`` (next to the API's versioned base): reachable and ``ok`` is ready."""
        root = self._base.rsplit("/api/", 1)[0] if "/api/" in self._base else self._base
        try:
            async with self._client().post(f"{root}/api/v3/system_load", json={"key": self.key}) as resp:
                if resp.status != 200:
                    raise BackendFailed(f"upstream {self.name} system_load answered {resp.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendFailed(f"upstream {self.name} is unreachable: {e or type(e).__name__}") from None
        return self._health(True)


def _read(file: BinaryIO) -> bytes:
    file.seek(0)
    return file.read()


def upstream(config: UpstreamConfig, environ: Mapping[str, str] | None = None):
    """The backend of an ``[[upstreams]]`` entry, by its ``type``."""
    from app.backends.upstream import UpstreamBackend

    kinds = {"openai": UpstreamBackend, "hf_endpoint": HFEndpointBackend, "modelslab": ModelsLabBackend}
    return kinds[config.type](config, environ)
