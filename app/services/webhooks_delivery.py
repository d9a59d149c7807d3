"""The network side of webhook deliveries: Standard Webhooks signatures, SSRF guards, one attempt, the retry schedule.

No database here: the outbox loop owns the state and calls :func:`deliver` and :func:`next_attempt`.
"""

from __future__ import annotations

import base64
import ipaddress
import random
import re
import secrets as _secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks import Webhook
from yarl import URL

from app.config import WEBHOOK_RETRY_SCHEDULE

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Kind = Literal["delivered", "retry", "gone", "refused"]

USER_AGENT = "imagegate-webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024
MAX_RETRY_AFTER = 86400.0
DEFAULT_SCHEDULE = WEBHOOK_RETRY_SCHEDULE

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not global, yet not is_private before 3.13
# WHATWG's "ends in a number": such a host is an IPv4 address in a legacy form (127.1, 0x7f.1, 2130706433) that
# the resolver would turn into an address ipaddress never saw.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")


class TargetRefused(Exception):
    """The webhook URL or an address it resolves to is not one imagegate may connect to."""


def new_secret() -> str:
    """A new symmetric signing secret, ``whsec_`` and 32 random bytes in standard base64."""
    return "whsec_" + base64.b64encode(_secrets.token_bytes(32)).decode()


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,<sig>`` per secret, space-separated.

    Several secrets sign at once during a rotation, so a receiver that knows either the old or the new one verifies.
    """
    if not secrets:
        raise ValueError("a webhook needs at least one signing secret")
    at = datetime.fromtimestamp(timestamp, UTC)
    data = body.decode()
    return " ".join(Webhook(s).sign(msg_id, at, data) for s in secrets)


def headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The request headers of one delivery attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        # An address that embeds an IPv4 one reaches that IPv4 address, so that one decides.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return _public(embedded)
        if ip.is_site_local:
            return False
    bad = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    return ip.is_global and not bad and not ip.is_unspecified and ip not in _SHARED


def _allowed(host: str | None, ip: IPAddress | None, allow: Sequence[str]) -> bool:
    name = host.rstrip(".").lower() if host else None
    for entry in allow:
        if name is not None and entry.rstrip(".").lower() == name:
            return True
        if ip is not None:
            try:
                net = ipaddress.ip_network(entry.strip("[]"), strict=False)
            except ValueError:
                continue  # a hostname entry
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            if ip in net or (mapped is not None and mapped in net):
                return True
    return False


def check_url(url: str, allow: Sequence[str]) -> None:
    """Refuse a webhook URL that is not plain http(s) or names a non-public address.

    A hostname passes here; :class:`PublicResolver` checks what it resolves to when the connection is made.

    Args:
        url: the endpoint URL.
        allow: hostnames (exact, case-insensitive), IP addresses or CIDR networks exempt from the address check.

    Raises:
        TargetRefused: with the reason.
    """
    try:
        u = URL(url)
    except (ValueError, TypeError) as e:
        raise TargetRefused(f"invalid URL: {e}") from None
    if u.scheme not in ("http", "https"):
        raise TargetRefused("the URL scheme must be http or https")
    if not u.host:
        raise TargetRefused("the URL has no host")
    if u.user is not None or u.password is not None:
        raise TargetRefused("the URL must not carry credentials")
    host = u.host.rstrip(".").lower()
    ip = _ip(host)
    if _allowed(host, ip, allow):
        return
    if ip is None and _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        raise TargetRefused(f"{host} is not a canonical IP address")
    if host == "localhost" or host.endswith(".localhost"):
        raise TargetRefused(f"{host} is a loopback name")
    if ip is not None and not _public(ip):
        raise TargetRefused(f"{ip} is not a public address")


class PublicResolver(AbstractResolver):
    """A resolver that refuses a host when any address it resolves to is not public.

    The connector connects to exactly the addresses returned here, so checking them closes DNS rebinding (a name
    that resolved to a public address at registration and to 169.254.169.254 now). aiohttp never calls a resolver
    for an IP-literal host: :func:`check_url` covers those. Create it within a running event loop.
    """

    def __init__(self, allow: Sequence[str], inner: AbstractResolver | None = None) -> None:
        self._allow = tuple(allow)
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if _allowed(host, None, self._allow):
            return results
        for r in results:
            ip = _ip(r["host"])
            if ip is None or not (_public(ip) or _allowed(None, ip, self._allow)):
                # Not an OSError: aiohttp would wrap that as a DNS failure, which reads as retryable.
                raise TargetRefused(f"{host} resolves to {r['host']}, not a public address")
        return results

    async def close(self) -> None:
        await self._inner.close()


def session(allow: Sequence[str], timeout: float = 15.0) -> aiohttp.ClientSession:
    """A client session for deliveries: every connection checked by :class:`PublicResolver`.

    Call it within a running event loop, and close the session when done.
    """
    connector = aiohttp.TCPConnector(
        resolver=PublicResolver(allow),
        # aiohttp's DNS cache would hand out addresses without the resolver seeing them again.
        use_dns_cache=False,
        limit=64,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        # No proxy from the environment (it would connect on our behalf, unchecked), and no cookies shared
        # between endpoints.
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt came to; ``gone`` means the receiver asked (410) to be disabled."""

    kind: Kind
    status: int | None
    detail: str
    retry_after: float | None
    seconds: float


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT; a naive one from a lax receiver is taken as such
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    # Bounded both ways: a negative, NaN or absurd value must not reach the schedule as is.
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


async def deliver(
    session: aiohttp.ClientSession,
    url: str,
    msg_id: str,
    body: bytes,
    secrets: Sequence[str],
    allow: Sequence[str],
    *,
    now: Callable[[], float] = time.time,
) -> Outcome:
    """Make one delivery attempt; never raises for a refused target or a network failure.

    Args:
        session: from :func:`session`, whose resolver checks resolved addresses against the same ``allow``.
        url: the endpoint URL.
        msg_id: the ``webhook-id``, the same across retries so receivers can deduplicate.
        body: the JSON payload, UTF-8.
        secrets: the endpoint's signing secrets (two during a rotation).
        allow: exemptions from the public-address check, as for :func:`check_url`.
        now: the wall clock, for the signed timestamp.

    Returns:
        ``delivered`` on 2xx; ``gone`` on 410; ``refused`` when the URL or its address is not allowed (nothing
        was sent, or nothing was connected to); ``retry`` otherwise, with ``retry_after`` from the receiver.
    """
    started = time.perf_counter()

    def outcome(kind: Kind, status: int | None, detail: str, retry_after: float | None = None) -> Outcome:
        return Outcome(kind, status, detail, retry_after, time.perf_counter() - started)

    try:
        check_url(url, allow)
    except TargetRefused as e:
        return outcome("refused", None, str(e))
    timestamp = int(now())
    try:
        async with session.post(
            url, data=body, headers=headers(secrets, msg_id, timestamp, body), allow_redirects=False
        ) as resp:
            # Read a little so the receiver is not cut off mid-write; the content is not used.
            await resp.content.read(MAX_RESPONSE_BYTES)
            status, retry_after = resp.status, _retry_after(resp.headers.get("Retry-After"), now())
    except TargetRefused as e:
        return outcome("refused", None, str(e))
    except aiohttp.InvalidURL as e:
        return outcome("refused", None, f"invalid URL: {e}")
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        cause = getattr(e, "os_error", None) or e.__cause__
        if isinstance(cause, TargetRefused):
            return outcome("refused", None, str(cause))
        return outcome("retry", None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    if 200 <= status < 300:
        return outcome("delivered", status, f"HTTP {status}")
    if status == 410:
        return outcome("gone", status, "HTTP 410: the endpoint asked to be disabled")
    if 300 <= status < 400:
        return outcome("retry", status, f"HTTP {status}: redirect not followed")
    return outcome("retry", status, f"HTTP {status}", retry_after)


def next_attempt(
    attempts: int,
    schedule: Sequence[float],
    now: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """When to try again after ``attempts`` failed attempts, or None when the schedule is spent.

    Args:
        attempts: failed attempts so far, 1 after the first.
        schedule: the delay after each failed attempt, in seconds, e.g. :data:`DEFAULT_SCHEDULE`.
        now: the unix time of the failure.
        retry_after: the receiver's ``Retry-After``, honoured as a floor up to 24 hours.
        rng: for the jitter.

    Returns:
        The unix time of the next attempt: the scheduled delay with ±10% jitter, so that a receiver's backlog is not
        retried in one burst, but no sooner than ``retry_after``.
    """
    if attempts < 1:
        raise ValueError("attempts counts failed attempts, from 1")
    if attempts > len(schedule):
        return None
    delay = schedule[attempts - 1] * (rng or random).uniform(0.9, 1.1)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return now + delay
