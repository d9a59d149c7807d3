"""The thinnest useful Python image gateway: Litestar + one shared aiohttp session, nothing else.

It is the benchmarks' yardstick for "what any Python gateway on this stack must cost": decode the JSON body with
msgspec (validation, and the model to route on), POST the original bytes to the model's upstream with a shared
``aiohttp.ClientSession``, and return the upstream's answer unchanged (``stream: true``: relayed chunk by chunk as
``text/event-stream``). No auth, no queue, no metrics, no re-encoding of images.

Served by uvicorn exactly as ``imagegate serve`` is served: uvloop, httptools, no access log.

Run: ``python benchmarks/thin_proxy.py --port P --routes '{"model": "http://host:port/prefix/v1", ...}'``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator

import aiohttp
import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

ROUTES: dict[str, str] = json.loads(os.environ.get("THIN_PROXY_ROUTES", "{}"))
"""Model name -> upstream base URL (up to and including /v1)."""


class GenerateRequest(msgspec.Struct):
    """The fields the proxy looks at; the rest is forwarded untouched."""

    prompt: str
    model: str | None = None
    stream: bool = False
    partial_images: int | None = None
    n: int | None = None


_decode = msgspec.json.Decoder(GenerateRequest).decode
_session: aiohttp.ClientSession | None = None


def _error(status: int, message: str) -> Response:
    body = msgspec.json.encode({"error": {"message": message, "type": "invalid_request_error"}})
    return Response(body, status_code=status, media_type="application/json")


async def _open() -> None:
    global _session
    _session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=120),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300),
    )


async def _close() -> None:
    if _session is not None:
        await _session.close()


@get("/health", sync_to_thread=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@post("/v1/images/generations", status_code=200)
async def generations(request: Request) -> Response:
    raw = await request.body()
    try:
        req = _decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return _error(400, str(e))
    base = ROUTES.get(req.model or "")
    if base is None:
        return _error(404, f"unknown model {req.model!r}")
    assert _session is not None
    resp = await _session.post(f"{base}/images/generations", data=raw, headers={"content-type": "application/json"})
    if req.stream and resp.status == 200:

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            finally:
                resp.release()

        return Stream(relay(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
    try:
        body = await resp.read()
    finally:
        resp.release()
    return Response(body, status_code=resp.status, media_type=resp.content_type or "application/json")


app = Litestar([health, generations], on_startup=[_open], on_shutdown=[_close], openapi_config=None)


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--routes", default="", help="JSON: model -> upstream base URL")
    args = ap.parse_args()
    if args.routes:
        ROUTES.update(json.loads(args.routes))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
