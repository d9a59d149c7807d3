"""Logs of a real `imagegate serve` and its worker at debug level, in both formats: never a secret, always the ids.

Each format gets its own server, configured with every kind of secret imagegate holds (admin key, a static key, a
Basic-auth password, a worker token, the URL signing secret, an upstream's key) and driven with each of them, plus
a virtual key and a webhook secret made through the API, a wrong key and a wrong password, and a signed image URL
fetched. Then the log (gateway and worker write to the same file) must hold none of them, and must hold every request
id and principal id, with one access line per request.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import httpx
import msgspec
import pytest

from app.auth.principals import digest
from app.config import DEMO_MODEL, demo_model

from .conftest import Server
from .otlp import FailingUpstream

pytestmark = pytest.mark.e2e

VENDOR_MODEL = "vendor-model"
ACCESS_FIELDS = {
    "request_id",
    "principal",
    "model",
    "method",
    "route",
    "status",
    "duration_ms",
    "overhead_ms",
    "backend",
}


@dataclass
class Logged:
    fmt: str
    srv: Server
    secrets: dict[str, str]
    request_ids: list[str] = field(default_factory=list)
    principals: set[str] = field(default_factory=set)


def _token(prefix: str) -> str:
    return f"{prefix}{secrets.token_urlsafe(24)}"


@pytest.fixture(scope="module", params=["plain", "json"])
def logged(request, tmp_path_factory) -> Iterator[Logged]:
    fmt = request.param
    tmp = tmp_path_factory.mktemp(f"logs-{fmt}")
    upstream = FailingUpstream()
    secret = {
        "admin_key": _token("sk-ig-admin-"),
        "static_key": _token("sk-ig-static-"),
        "password": _token("Pw-"),
        "worker_token": _token("wt-"),
        "url_secret": _token("us-"),
        "vendor_key": _token("sk-vendor-"),
    }
    config = tmp / "imagegate.json"
    demo = msgspec.to_builtins(demo_model(str(tmp)))
    vendor = {"name": VENDOR_MODEL, "devices": [], "default_size": "64x64"}
    config.write_text(
        json.dumps(
            {
                "models": [demo, vendor],
                "upstreams": [
                    {
                        "name": "vendor",
                        "base_url": upstream.url,
                        "api_key_env": "IG_TEST_VENDOR_KEY",
                        "models": {VENDOR_MODEL: "gpt-image-1"},
                    }
                ],
                "api_keys": [{"id": "static-one", "key_sha256": digest(secret["static_key"])}],
                "users": [{"name": "alice", "password_env": "IG_TEST_ALICE_PASSWORD"}],
                "worker_token": secret["worker_token"],
                "url_secret": secret["url_secret"],
                "health_interval": 0.5,
            }
        )
    )
    env = {
        "IMAGEGATE_ADMIN_KEY": secret["admin_key"],
        "IG_TEST_VENDOR_KEY": secret["vendor_key"],
        "IG_TEST_ALICE_PASSWORD": secret["password"],
    }
    srv = Server(tmp, "--config", str(config), "--log-level", "debug", "--log-format", fmt, env=env)
    try:
        srv.wait_ready(timeout=240)
        yield Logged(fmt, srv, secret)
    finally:
        srv.stop()
        upstream.close()


def call(t: Logged, method: str, path: str, *, expect: int, request_id: str | None = None, **kw) -> httpx.Response:
    rid = request_id or f"{t.fmt}-{secrets.token_hex(6)}"
    headers = {**kw.pop("headers", {}), "x-request-id": rid}
    r = httpx.request(method, f"{t.srv.url}{path}", headers=headers, timeout=120, **kw)
    assert r.status_code == expect, (method, path, r.status_code, r.text[:300])
    assert r.headers["x-request-id"] == rid, "the client's request id comes back"
    t.request_ids.append(rid)
    return r


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


GEN = {"model": DEMO_MODEL, "prompt": "a logged fox", "size": "64x64", "num_inference_steps": 2}


def drive(t: Logged) -> dict[str, str]:
    """Every kind of credential and secret through the server; returns the secrets made along the way."""
    s = t.secrets
    admin = bearer(s["admin_key"])
    created = call(t, "POST", "/admin/keys", expect=201, headers=admin, json={"alias": "logged"}).json()
    made = {"virtual_key": created["key"]}
    t.principals |= {"admin", created["id"], "static-one", "user:alice"}
    virtual = bearer(created["key"])
    call(t, "POST", "/v1/images/generations", expect=200, headers=virtual, json=GEN)
    r = call(t, "POST", "/v1/images/generations", expect=200, headers=virtual, json={**GEN, "response_format": "url"})
    url = r.json()["data"][0]["url"]
    made["signature"] = parse_qs(urlsplit(url).query)["signature"][0]
    call(t, "GET", url.removeprefix(t.srv.url), expect=200)
    body = {**GEN, "stream": True, "partial_images": 1}
    streamed = call(t, "POST", "/v1/images/generations", expect=200, headers=virtual, json=body)
    assert "image_generation.completed" in streamed.text
    call(t, "POST", "/v1/images/generations", expect=200, headers={"x-api-key": s["static_key"]}, json=GEN)
    call(t, "POST", "/v1/images/generations", expect=200, auth=("alice", s["password"]), json=GEN)
    made["webhook_secret"] = call(t, "POST", "/v1/webhooks/secret", expect=201, headers=virtual).json()["secret"]
    made["server_webhook_secret"] = call(t, "POST", "/admin/webhooks/secret", expect=201, headers=admin).json()[
        "secret"
    ]
    made["wrong_key"] = _token("sk-ig-wrong-")
    made["wrong_password"] = _token("Wrong-")
    call(t, "POST", "/v1/images/generations", expect=401, headers=bearer(made["wrong_key"]), json=GEN)
    call(t, "POST", "/v1/images/generations", expect=401, auth=("alice", made["wrong_password"]), json=GEN)
    call(t, "GET", "/admin/keys", expect=403, headers=virtual)
    # The upstream gets the vendor key and answers 500 (twice: once per try of each model's one backend).
    call(t, "POST", "/v1/images/generations", expect=502, headers=virtual, json={**GEN, "model": VENDOR_MODEL})
    made["basic"] = base64.b64encode(f"alice:{s['password']}".encode()).decode()
    made["wrong_basic"] = base64.b64encode(f"alice:{made['wrong_password']}".encode()).decode()
    return made


def test_no_secret_in_the_logs_and_every_request_id_and_principal(logged):
    made = drive(logged)
    time.sleep(0.5)  # the last access line and the worker's last lines
    text = logged.srv.log.read_text()
    for name, value in {**logged.secrets, **made}.items():
        assert value not in text, f"the {name} is in the {logged.fmt} log"
    for rid in logged.request_ids:
        assert rid in text, f"request id {rid} is not logged"
    for principal in logged.principals:
        assert principal in text, f"principal {principal} is not logged"
    assert "imagegate.worker" in text, "the worker's lines are in the same log"

    if logged.fmt == "json":
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert len(lines) > 20
        # Lines that are not JSON come from libraries printing to stderr themselves (torch, torchao), not logging.
        others = [line for line in text.splitlines() if line.strip() and not line.startswith("{")]
        assert not any(" [info     ] " in line or " [debug    ] " in line for line in others), others[:5]
        assert all({"event", "level", "logger", "timestamp"} <= set(line) for line in lines)
        access = {a["request_id"]: a for a in lines if a["logger"] == "imagegate.access"}
        assert sorted(access) == sorted(logged.request_ids), "one access line per request"
        for a in access.values():
            assert set(a) >= ACCESS_FIELDS, a
        first = access[logged.request_ids[0]]
        assert (first["method"], first["route"], first["status"]) == ("POST", "/admin/keys", 201)
        assert first["principal"] == "admin"
        generated = access[logged.request_ids[1]]
        assert generated["model"] == DEMO_MODEL and generated["backend"] == "local-cpu"
        assert generated["route"] == "/v1/images/generations" and generated["status"] == 200
        assert generated["duration_ms"] > 0 and 0 <= generated["overhead_ms"] <= generated["duration_ms"]
        refused = [a for a in access.values() if a["status"] == 401]
        assert len(refused) == 2 and all(a["principal"] is None for a in refused)
        vendor = next(a for a in access.values() if a["model"] == VENDOR_MODEL)
        assert vendor["backend"] == "vendor" and vendor["status"] == 502
        # The request id of the vendor request is on the gateway's warning about it too.
        warnings = [w for w in lines if w["level"] == "warning" and w.get("request_id") == vendor["request_id"]]
        assert warnings, "the failure's warning carries the request id"
        assert any(line["logger"] == "imagegate.worker" for line in lines)
    else:
        with contextlib.suppress(StopIteration):
            line = next(line for line in text.splitlines() if f"request_id={logged.request_ids[1]}" in line)
            assert " info    imagegate.access: request " in line, line
            assert "principal=key_" in line and "status=200" in line and "route=/v1/images/generations" in line, line
            assert f"model={DEMO_MODEL}" in line and "backend=local-cpu" in line and "duration_ms=" in line, line
            return
        raise AssertionError("no plain access line for the first generation")
