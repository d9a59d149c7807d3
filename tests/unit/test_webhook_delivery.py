"""Webhook deliveries against a local receiver: signatures, classification, SSRF guards, the retry schedule."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook, WebhookVerificationError

from app.services import webhooks_delivery as wd

SECRET = wd.new_secret()
BODY = json.dumps({"type": "image.completed", "data": {"id": "img_1"}}).encode()
LOOPBACK = ["127.0.0.1"]


@dataclass
class Seen:
    path: str
    body: bytes
    headers: dict[str, str]
    verified: bool
    error: str | None = None


@dataclass
class Receiver:
    """A webhook endpoint: verifies every request with its one secret, answers as told per path."""

    secret: str = SECRET
    answers: dict[str, web.Response | None] = field(default_factory=dict)
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        hdrs = dict(request.headers)
        try:
            Webhook(self.secret).verify(body, hdrs)
            self.seen.append(Seen(request.path, body, hdrs, True))
        except WebhookVerificationError as e:
            self.seen.append(Seen(request.path, body, hdrs, False, str(e)))
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answers.get(request.path) or web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", r.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    r.url = str(server.make_url("/hook"))
    try:
        yield r
    finally:
        await server.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    s = wd.session(LOOPBACK, timeout=5.0)
    try:
        yield s
    finally:
        await s.close()


async def send(client: aiohttp.ClientSession, url: str, **kw: Any) -> wd.Outcome:
    kw.setdefault("secrets", [SECRET])
    kw.setdefault("allow", LOOPBACK)
    return await wd.deliver(client, url, "msg_1", BODY, kw.pop("secrets"), kw.pop("allow"), **kw)


def fake_dns(monkeypatch: pytest.MonkeyPatch, *answers: list[str]) -> list[str]:
    """Make every lookup of hooks.example.com answer the next list of addresses (the last one repeats)."""
    asked: list[str] = []

    async def resolve(self: Any, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        assert host == "hooks.example.com", host
        addrs = answers[min(len(asked), len(answers) - 1)]
        asked.append(host)
        return [
            {"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0} for a in addrs
        ]

    monkeypatch.setattr(aiohttp.ThreadedResolver, "resolve", resolve)
    return asked


def named(url: str) -> str:
    """The receiver's URL with the host hooks.example.com instead of 127.0.0.1."""
    return url.replace("127.0.0.1", "hooks.example.com")


# Signatures


def test_new_secret_format() -> None:
    s = wd.new_secret()
    assert s.startswith("whsec_")
    assert len(base64.b64decode(s.removeprefix("whsec_"), validate=True)) == 32
    assert s != wd.new_secret()
    Webhook(s)  # the library accepts it


def test_sign_one_signature_per_secret() -> None:
    old, new = wd.new_secret(), wd.new_secret()
    sig = wd.sign([old, new], "msg_1", 1_700_000_000, BODY)
    parts = sig.split(" ")
    assert len(parts) == 2 and all(p.startswith("v1,") for p in parts)
    at = datetime.fromtimestamp(1_700_000_000, UTC)
    assert parts[0] == Webhook(old).sign("msg_1", at, BODY.decode())
    with pytest.raises(ValueError):
        wd.sign([], "msg_1", 1, BODY)


def test_headers() -> None:
    h = wd.headers([SECRET], "msg_1", 1_700_000_000, BODY)
    assert h["webhook-id"] == "msg_1"
    assert h["webhook-timestamp"] == "1700000000"
    assert h["content-type"] == "application/json"
    assert h["user-agent"] == "imagegate-webhooks/1"
    assert h["webhook-signature"] == wd.sign([SECRET], "msg_1", 1_700_000_000, BODY)


async def test_delivered_and_verified(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    out = await send(client, receiver.url)
    assert out.kind == "delivered" and out.status == 204 and out.retry_after is None
    assert out.seconds >= 0
    [seen] = receiver.seen
    assert seen.verified, seen.error
    assert seen.body == BODY and seen.path == "/hook"
    assert seen.headers["webhook-id"] == "msg_1"
    assert seen.headers["User-Agent"] == "imagegate-webhooks/1"


@pytest.mark.parametrize("knows", ["old", "new"])
async def test_rotation_either_secret_verifies(receiver: Receiver, client: aiohttp.ClientSession, knows: str) -> None:
    old, new = wd.new_secret(), wd.new_secret()
    receiver.secret = old if knows == "old" else new
    out = await send(client, receiver.url, secrets=[old, new])
    assert out.kind == "delivered"
    assert receiver.seen[0].verified, receiver.seen[0].error


async def test_wrong_secret_does_not_verify(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    # The receiver's check is real: a signature from another secret fails it.
    await send(client, receiver.url, secrets=[wd.new_secret()])
    assert not receiver.seen[0].verified


async def test_timestamp_comes_from_now(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    await send(client, receiver.url, now=lambda: 1_700_000_000.9)
    seen = receiver.seen[0]
    assert seen.headers["webhook-timestamp"] == "1700000000"
    assert not seen.verified and "too old" in (seen.error or "")


# Classification


async def test_500_is_retried(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    receiver.answers["/hook"] = web.Response(status=500, text="boom")
    out = await send(client, receiver.url)
    assert (out.kind, out.status, out.retry_after) == ("retry", 500, None)


async def test_503_retry_after_seconds(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    receiver.answers["/hook"] = web.Response(status=503, headers={"Retry-After": "7"})
    out = await send(client, receiver.url)
    assert (out.kind, out.status, out.retry_after) == ("retry", 503, 7.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("7", 7.0), ("1.5", 1.5), ("-3", 0.0), ("soon", None), ("1e12", 86400.0)],
)
def test_retry_after_parsing(value: str | None, expected: float | None) -> None:
    assert wd._retry_after(value, time.time()) == expected


async def test_429_retry_after_http_date(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    when = format_datetime(datetime.fromtimestamp(time.time() + 120, UTC), usegmt=True)
    receiver.answers["/hook"] = web.Response(status=429, headers={"Retry-After": when})
    out = await send(client, receiver.url)
    assert out.kind == "retry" and out.status == 429
    assert out.retry_after is not None and 110 <= out.retry_after <= 121


async def test_400_is_retried(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    receiver.answers["/hook"] = web.Response(status=400)
    assert (await send(client, receiver.url)).kind == "retry"


async def test_410_is_gone(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    receiver.answers["/hook"] = web.Response(status=410)
    out = await send(client, receiver.url)
    assert (out.kind, out.status) == ("gone", 410)


async def test_redirect_not_followed(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    receiver.answers["/hook"] = web.Response(status=302, headers={"Location": "/other"})
    out = await send(client, receiver.url)
    assert (out.kind, out.status) == ("retry", 302)
    assert "redirect not followed" in out.detail
    assert [s.path for s in receiver.seen] == ["/hook"]


async def test_large_response_body_is_not_a_failure(receiver: Receiver, client: aiohttp.ClientSession) -> None:
    receiver.answers["/hook"] = web.Response(status=200, body=b"x" * (1 << 20))
    assert (await send(client, receiver.url)).kind == "delivered"


async def test_connection_refused_is_retried(client: aiohttp.ClientSession) -> None:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = await send(client, f"http://127.0.0.1:{port}/hook")
    assert out.kind == "retry" and out.status is None
    assert out.detail


async def test_timeout_is_retried(receiver: Receiver) -> None:
    receiver.delay = 1.0
    async with wd.session(LOOPBACK, timeout=0.2) as s:
        out = await send(s, receiver.url)
    assert out.kind == "retry" and out.status is None
    assert "Timeout" in out.detail


# SSRF


async def test_loopback_refused_without_allowlist(receiver: Receiver) -> None:
    async with wd.session([]) as s:
        out = await send(s, receiver.url, allow=[])
    assert out.kind == "refused" and out.status is None
    assert "127.0.0.1" in out.detail
    assert receiver.seen == []


@pytest.mark.parametrize("allow", [["127.0.0.1"], ["127.0.0.0/8"]])
async def test_loopback_allowed(receiver: Receiver, allow: list[str]) -> None:
    async with wd.session(allow) as s:
        out = await send(s, receiver.url, allow=allow)
    assert out.kind == "delivered"
    assert receiver.seen[0].verified


async def test_name_resolving_to_private_is_refused(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    asked = fake_dns(monkeypatch, ["10.0.0.5"])
    async with wd.session([]) as s:
        out = await send(s, named(receiver.url), allow=[])
    assert out.kind == "refused" and "10.0.0.5" in out.detail
    assert asked == ["hooks.example.com"]
    assert receiver.seen == []


async def test_any_private_address_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, ["93.184.216.34", "169.254.169.254"])
    async with wd.session([]) as s:
        out = await send(s, "https://hooks.example.com/hook", allow=[])
    assert out.kind == "refused" and "169.254.169.254" in out.detail


@pytest.mark.parametrize("allow", [["hooks.example.com"], ["HOOKS.example.com"], ["127.0.0.0/8"]])
async def test_resolved_address_is_the_one_connected_to(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver, allow: list[str]
) -> None:
    fake_dns(monkeypatch, ["127.0.0.1"])
    async with wd.session(allow) as s:
        out = await send(s, named(receiver.url), allow=allow)
    assert out.kind == "delivered"
    assert receiver.seen[0].headers["Host"].startswith("hooks.example.com")


async def test_dns_rebinding_is_caught(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    # First lookup: an allowed address; the next: a private one. No DNS cache may hand out the first again.
    asked = fake_dns(monkeypatch, ["127.0.0.1"], ["10.0.0.1"])
    closing = web.Response(status=204)
    closing.force_close()  # so the second request needs a new connection
    receiver.answers["/hook"] = closing
    async with wd.session(LOOPBACK) as s:
        first = await send(s, named(receiver.url))
        second = await send(s, named(receiver.url))
    assert first.kind == "delivered"
    assert second.kind == "refused" and "10.0.0.1" in second.detail
    assert len(asked) == 2 and len(receiver.seen) == 1


async def test_public_resolver_refuses_localhost() -> None:
    with pytest.raises(wd.TargetRefused):
        await wd.PublicResolver([]).resolve("localhost", 80, socket.AF_INET)
    for allow in (["localhost"], ["127.0.0.0/8"]):
        got = await wd.PublicResolver(allow).resolve("localhost", 80, socket.AF_INET)
        assert got and all(r["host"] == "127.0.0.1" for r in got)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/hook", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https://user@example.com/hook", "credentials"),
        ("http:///hook", "host"),
        ("http://10.0.0.1/hook", "not a public"),
        ("http://169.254.169.254/latest/meta-data", "not a public"),
        ("http://[::1]:8080/hook", "not a public"),
        ("http://100.64.0.1/hook", "not a public"),
        ("http://[::ffff:10.0.0.1]/hook", "not a public"),
        ("http://[fe80::1]/hook", "not a public"),
        ("http://[2002:a00:1::1]/hook", "not a public"),
        ("http://[fec0::1]/hook", "not a public"),
        ("http://[fd00::1]/hook", "not a public"),
        ("http://224.0.0.1/hook", "not a public"),
        ("http://0.0.0.0/hook", "not a public"),
        ("http://192.168.1.1/hook", "not a public"),
        ("http://localhost:8080/hook", "loopback"),
        ("http://LocalHost./hook", "loopback"),
        ("http://2130706433/hook", "canonical"),
        ("http://127.1/hook", "canonical"),
        ("http://0x7f.0.0.1/hook", "canonical"),
        ("not a url", "scheme"),
    ],
)
def test_check_url_refuses(url: str, why: str) -> None:
    with pytest.raises(wd.TargetRefused, match=why):
        wd.check_url(url, [])


@pytest.mark.parametrize(
    "url",
    [
        "https://93.184.216.34/hook",
        "http://[2606:2800:220:1:248:1893:25c8:1946]/hook",
        "https://hooks.example.com/hook",
        "https://HOOKS.example.com:8443/a?b=c",
    ],
)
def test_check_url_passes_public(url: str) -> None:
    wd.check_url(url, [])


@pytest.mark.parametrize(
    ("url", "allow"),
    [
        ("http://10.1.2.3/hook", ["10.0.0.0/8"]),
        ("http://[::1]/hook", ["::1"]),
        ("http://[::ffff:10.0.0.1]/hook", ["10.0.0.0/8"]),
        ("http://localhost/hook", ["LOCALHOST"]),
        ("http://127.0.0.1/hook", ["127.0.0.1"]),
    ],
)
def test_check_url_allow(url: str, allow: list[str]) -> None:
    wd.check_url(url, allow)


def test_check_url_allow_is_exact() -> None:
    with pytest.raises(wd.TargetRefused):
        wd.check_url("http://10.1.2.3/hook", ["10.0.0.0/16"])
    with pytest.raises(wd.TargetRefused):
        wd.check_url("http://127.0.0.2/hook", ["127.0.0.1"])


# Schedule


def test_next_attempt_follows_schedule_with_jitter() -> None:
    rng = random.Random(7)
    for attempts, delay in enumerate(wd.DEFAULT_SCHEDULE, start=1):
        for _ in range(50):
            at = wd.next_attempt(attempts, wd.DEFAULT_SCHEDULE, 1000.0, rng=rng)
            assert at is not None and 1000 + 0.9 * delay <= at <= 1000 + 1.1 * delay


def test_next_attempt_jitter_spreads() -> None:
    rng = random.Random(1)
    times = {wd.next_attempt(2, wd.DEFAULT_SCHEDULE, 0.0, rng=rng) for _ in range(20)}
    assert len(times) > 1


def test_next_attempt_retry_after_floor_and_cap() -> None:
    assert wd.next_attempt(1, (5,), 1000.0, retry_after=60) == 1060.0
    at = wd.next_attempt(1, (300,), 1000.0, retry_after=1)
    assert at is not None and at >= 1000 + 270  # the schedule wins when later
    assert wd.next_attempt(1, (5,), 0.0, retry_after=10**9) == 86400.0


def test_next_attempt_exhausted() -> None:
    assert wd.next_attempt(len(wd.DEFAULT_SCHEDULE) + 1, wd.DEFAULT_SCHEDULE, 0.0) is None
    assert wd.next_attempt(1, (), 0.0) is None
    with pytest.raises(ValueError):
        wd.next_attempt(0, wd.DEFAULT_SCHEDULE, 0.0)


def test_default_schedule() -> None:
    assert wd.DEFAULT_SCHEDULE == (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
