"""Credentials, per-key limits, usage and the admin API through the real HTTP stack and the official SDK."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import openai
import pytest
from litestar.testing import AsyncTestClient, TestClient

from app.asgi import create_app
from app.auth.principals import KEY_PREFIX, digest, hash_password, new_key
from app.backends.fake import FakeBackend, fake_image
from app.config import DEMO_MODEL, load_settings
from app.protocol.admin import KeyCreate
from app.services.keys import KeyService
from app.store.keys import SqlKeyStore
from tests.helpers import sample

from .conftest import BASE

GEN = "/v1/images/generations"
KEYS = "/admin/keys"
BODY: dict[str, Any] = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2}
AUTH_FAILURES = "imagegate_auth_failures_total"
LIMIT_REJECTIONS = "imagegate_limit_rejections_total"
KEY_IMAGES = "imagegate_key_images_total"

# Distinctive secrets, so that a leak anywhere is found by a plain substring search.
ADMIN_KEY = "sk-admin-Zq8vR2mW7tLx4pN9cB6hJ3dF5gK1sY0e"
STATIC_KEY = "sk-static-Hh3kT9qZ2wX7mV4nB8cL6pR1sD5fG0jU"
UNKNOWN_STATIC_KEY = "sk-static-Uu1nKn0wNkEy7x2c9v4b6n8m3q5w1e7r"
USER = "alice"
PASSWORD = "Tr0ub4dor&3-correct-horse-battery-staple-Yx9"
PASSWORD_HASH = hash_password(PASSWORD)  # argon2 is slow on purpose: hash once for the module
PAST = "2001-01-01T00:00:00+00:00"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


# -- helpers ----------------------------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def auth(scheme: str, secret: Any) -> dict[str, str]:
    """The headers that carry ``secret`` with ``scheme`` (``secret`` is ``(user, password)`` for basic)."""
    if scheme == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    if scheme == "basic":
        return {"Authorization": basic(*secret)}
    return {scheme: secret}  # x-api-key, x-bf-vk


def static_key(**limits: Any) -> dict[str, Any]:
    return {"id": "static", "alias": "static-alias", "key_sha256": digest(STATIC_KEY), **limits}


def user(**limits: Any) -> dict[str, Any]:
    return {"name": USER, "password_hash": PASSWORD_HASH, **limits}


def configured(**limits: Any) -> dict[str, Any]:
    """Settings overrides with an admin key, the static key and the user, both with ``limits``."""
    return {"admin_key": ADMIN_KEY, "api_keys": [static_key(**limits)], "users": [user(**limits)]}


def make_app(tmp_path, *, backend: FakeBackend | None = None, clock: Callable[[], float] = time.time, **overrides):
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), **overrides})
    return create_app(settings, backends=[(backend or FakeBackend(models=[DEMO_MODEL]), [DEMO_MODEL])], clock=clock)


@contextlib.contextmanager
def gateway(tmp_path, **kwargs: Any) -> Iterator[TestClient]:
    with TestClient(make_app(tmp_path, **kwargs), base_url=BASE) as tc:
        yield tc


def create_key(tc: TestClient, **fields: Any) -> dict[str, Any]:
    r = tc.post(KEYS, json={"alias": "vk", **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


def show_key(tc: TestClient, key_id: str) -> dict[str, Any]:
    r = tc.get(f"{KEYS}/{key_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def generate(tc: TestClient, headers: dict[str, str], **body: Any) -> httpx.Response:
    return tc.post(GEN, json={**BODY, **body}, headers=headers)


def error(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]


def sdk_for(tc: TestClient, scheme: str, secret: Any) -> openai.OpenAI:
    """Bearer through ``api_key``; every other scheme through ``default_headers`` with a placeholder ``api_key``."""
    if scheme == "bearer":
        return openai.OpenAI(base_url=f"{BASE}/v1", api_key=secret, http_client=tc, max_retries=0)
    return openai.OpenAI(
        base_url=f"{BASE}/v1", api_key="unused", http_client=tc, max_retries=0, default_headers=auth(scheme, secret)
    )


def sdk_generate(sdk: openai.OpenAI, **kw: Any) -> Any:
    return sdk.images.generate(model=DEMO_MODEL, prompt="p", size="64x64", **kw)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Usage rows are written just after the response; wait until they are."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# -- 1. the matrix: scheme x credential state -------------------------------------------------------------------

SCHEMES = [
    ("bearer", "static"),
    ("bearer", "virtual"),
    ("x-api-key", "static"),
    ("x-api-key", "virtual"),
    ("x-bf-vk", "virtual"),
    ("basic", "user"),
]
STATES = ["valid", "unknown", "expired", "revoked", "wrong_model"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize(("scheme", "kind"), SCHEMES, ids=[f"{s}-{k}" for s, k in SCHEMES])
def test_credential_matrix(tmp_path, scheme, kind, state):
    limits: dict[str, Any] = {
        "valid": {},
        "unknown": {},
        "expired": {"expires_at": PAST},
        "revoked": {"active": False},
        "wrong_model": {"models": ["other-*"]},
    }[state]
    with gateway(tmp_path, **configured(**(limits if kind != "virtual" else {}))) as tc:
        secret: Any
        if kind == "virtual":
            created = create_key(tc, **{k: v for k, v in limits.items() if k != "active"})
            secret = created["key"]
            if state == "revoked":  # through the admin API, after the key has been seen working
                assert generate(tc, auth(scheme, secret)).status_code == 200
                assert tc.post(f"{KEYS}/{created['id']}/revoke", headers=ADMIN).status_code == 200
        else:
            secret = STATIC_KEY if kind == "static" else (USER, PASSWORD)
        if state == "unknown":
            secret = {"static": UNKNOWN_STATIC_KEY, "virtual": new_key(), "user": ("nobody", PASSWORD)}[kind]
        reason = {"unknown": "bad_password" if kind == "user" else "unknown"}.get(state, state)
        failures, model_rejections = sample(AUTH_FAILURES, reason=reason), sample(LIMIT_REJECTIONS, kind="model")

        r = generate(tc, auth(scheme, secret))

        sdk = sdk_for(tc, scheme, secret)
        if state == "valid":
            assert r.status_code == 200, r.text
            assert len(r.json()["data"]) == 1
            assert len(sdk_generate(sdk).data) == 1
        elif state == "wrong_model":
            assert r.status_code == 403, r.text
            assert error(r)["type"] == "permission_error"
            assert error(r)["code"] == "model_not_allowed" and error(r)["param"] == "model"
            assert sample(LIMIT_REJECTIONS, kind="model") == model_rejections + 1
            with pytest.raises(openai.PermissionDeniedError) as denied:
                sdk_generate(sdk)
            assert denied.value.body["code"] == "model_not_allowed"
        else:
            assert r.status_code == 401, r.text
            assert error(r)["code"] == "invalid_api_key" and error(r)["type"] == "invalid_request_error"
            realm = "Basic" if scheme == "basic" else "Bearer"
            assert r.headers["www-authenticate"] == f'{realm} realm="imagegate"'
            assert sample(AUTH_FAILURES, reason=reason) == failures + 1
            with pytest.raises(openai.AuthenticationError) as refused:
                sdk_generate(sdk)
            assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize(("scheme", "kind"), SCHEMES, ids=[f"{s}-{k}" for s, k in SCHEMES])
def test_sdk_raises_rate_limit_error_for_every_scheme(tmp_path, scheme, kind):
    with gateway(tmp_path, **configured(rpm=1)) as tc:
        secret = {"static": STATIC_KEY, "user": (USER, PASSWORD)}.get(kind) or create_key(tc, rpm=1)["key"]
        sdk = sdk_for(tc, scheme, secret)
        assert len(sdk_generate(sdk).data) == 1
        with pytest.raises(openai.RateLimitError) as limited:
            sdk_generate(sdk)
        assert limited.value.status_code == 429 and limited.value.body["code"] == "rate_limit_exceeded"


def test_model_patterns_are_fnmatch(tmp_path):
    with gateway(tmp_path, **configured(models=["imagegate-*"])) as tc:
        assert generate(tc, auth("bearer", STATIC_KEY)).status_code == 200
        empty = create_key(tc, models=[])["key"]  # an empty list allows no model at all
        r = generate(tc, auth("bearer", empty))
        assert r.status_code == 403 and error(r)["code"] == "model_not_allowed"


def test_x_bf_vk_accepts_only_virtual_keys(tmp_path):
    with gateway(tmp_path, **configured()) as tc:
        failures = sample(AUTH_FAILURES, reason="unknown")
        for secret in (STATIC_KEY, ADMIN_KEY):
            r = generate(tc, {"x-bf-vk": secret})
            assert r.status_code == 401 and error(r)["code"] == "invalid_api_key"
        assert sample(AUTH_FAILURES, reason="unknown") == failures + 2
        assert generate(tc, {"x-bf-vk": create_key(tc)["key"]}).status_code == 200
        # x-bf-vk is Bifrost's header: it wins over the placeholder Bearer an SDK always sends.
        vk = create_key(tc)["key"]
        assert generate(tc, {"x-bf-vk": vk, "Authorization": "Bearer unused"}).status_code == 200


def test_x_api_key_next_to_a_placeholder_bearer(tmp_path):
    with gateway(tmp_path, **configured()) as tc:
        sdk = openai.OpenAI(
            base_url=f"{BASE}/v1",
            api_key="unused",
            http_client=tc,
            max_retries=0,
            default_headers={"x-api-key": STATIC_KEY},
        )
        assert len(sdk_generate(sdk).data) == 1
        before = sample(AUTH_FAILURES, reason="unknown")
        r = generate(tc, {"Authorization": "Bearer unused", "x-api-key": UNKNOWN_STATIC_KEY})
        assert r.status_code == 401
        assert sample(AUTH_FAILURES, reason="unknown") == before + 1  # one refused request, one count


def test_expiry_follows_the_clock(tmp_path):
    now = [at("2031-05-17T12:00:00+00:00")]
    expires = "2031-05-17T12:01:00+00:00"
    with gateway(tmp_path, clock=lambda: now[0], **configured(expires_at=expires)) as tc:
        credentials = [
            auth("bearer", STATIC_KEY),
            auth("x-bf-vk", create_key(tc, expires_at=expires)["key"]),
            auth("basic", (USER, PASSWORD)),
        ]
        assert [generate(tc, h).status_code for h in credentials] == [200, 200, 200]
        now[0] = at(expires) - 0.001
        assert [generate(tc, h).status_code for h in credentials] == [200, 200, 200]
        now[0] = at(expires)
        failures = sample(AUTH_FAILURES, reason="expired")
        refused = [generate(tc, h) for h in credentials]
        assert [r.status_code for r in refused] == [401, 401, 401]
        assert all(error(r)["message"] == "This API key has expired." for r in refused)
        assert sample(AUTH_FAILURES, reason="expired") == failures + 3


def test_variations_respect_the_key_limits(tmp_path):
    png = fake_image(64, 64, seed=1)
    files = {"image": ("a.png", png, "image/png")}
    with gateway(tmp_path, **configured(models=["other-*"])) as tc:
        r = tc.post("/v1/images/variations", files=files, headers=auth("bearer", STATIC_KEY))
        assert r.status_code == 403 and error(r)["code"] == "model_not_allowed"
    with gateway(tmp_path, admin_key=ADMIN_KEY) as tc:
        created = create_key(tc, image_quota=1)
        headers = auth("bearer", created["key"])
        assert tc.post("/v1/images/variations", files=files, headers=headers).status_code == 200
        spent = tc.post("/v1/images/variations", files=files, headers=headers)
        assert spent.status_code == 429 and error(spent)["code"] == "insufficient_quota"
        wait_for(lambda: show_key(tc, created["id"])["usage"]["images"] == 1)


def test_edits_respect_the_key_limits(tmp_path):
    png = fake_image(64, 64, seed=1)
    with gateway(tmp_path, **configured(models=["other-*"])) as tc:
        r = tc.post(
            "/v1/images/edits",
            files={"image": ("a.png", png, "image/png")},
            data={"prompt": "p"},
            headers=auth("bearer", STATIC_KEY),
        )
        assert r.status_code == 403 and error(r)["code"] == "model_not_allowed"


# -- 2. missing and malformed credentials, open routes, /metrics ------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason", "realm"),
    [
        ({}, "missing", "Bearer"),
        ({"Authorization": "Token abc"}, "malformed", "Bearer"),
        ({"Authorization": "Bearer"}, "malformed", "Bearer"),
        ({"Authorization": "Basic"}, "malformed", "Bearer"),
        ({"Authorization": "Basic !!!not-base64!!!"}, "malformed", "Basic"),
        ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, "malformed", "Basic"),
        ({"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()}, "malformed", "Basic"),
    ],
    ids=["missing", "other-scheme", "bearer-empty", "basic-empty", "basic-not-base64", "basic-no-colon", "not-utf8"],
)
def test_missing_or_malformed_credential_is_401(tmp_path, headers, reason, realm):
    with gateway(tmp_path, **configured()) as tc:
        before = sample(AUTH_FAILURES, reason=reason)
        r = generate(tc, headers)
        assert r.status_code == 401, r.text
        assert error(r)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == f'{realm} realm="imagegate"'
        assert sample(AUTH_FAILURES, reason=reason) == before + 1
        assert tc.get("/v1/models", headers=headers).status_code == 401


def test_open_routes_need_no_credential(tmp_path):
    with gateway(tmp_path, **configured()) as tc:
        assert tc.get("/health").status_code == 200
        assert tc.get("/ready").status_code == 200
        assert tc.get("/openapi.yaml").status_code == 200
        preflight = tc.options(GEN, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code in (200, 204)
        metrics = tc.get("/metrics")  # open by default
        assert metrics.status_code == 200 and "imagegate_auth_failures_total" in metrics.text
        # signed image URLs are their own credential
        r = generate(tc, auth("bearer", STATIC_KEY), response_format="url")
        url = httpx.URL(r.json()["data"][0]["url"])
        file = tc.get(url.raw_path.decode())
        assert file.status_code == 200 and file.headers["content-type"] == "image/png"


def test_metrics_can_require_the_admin_credential(tmp_path):
    with gateway(tmp_path, metrics_auth="admin", **configured()) as tc:
        assert tc.get("/metrics").status_code == 401
        denied = tc.get("/metrics", headers=auth("bearer", STATIC_KEY))
        assert denied.status_code == 403 and error(denied)["code"] == "admin_required"
        assert tc.get("/metrics", headers=ADMIN).status_code == 200
        assert tc.get("/health").status_code == 200


# -- 3. anonymous until the first credential exists -------------------------------------------------------------


def test_anonymous_until_a_virtual_key_exists(tmp_path):
    with gateway(tmp_path) as tc:
        assert generate(tc, {}).status_code == 200
        assert tc.get(KEYS).status_code == 200  # anonymous is everything, the admin API included
        store = SqlKeyStore(tmp_path / "imagegate.db")  # as the CLI would: another connection to the same file
        try:
            created = asyncio.run(KeyService(store).create(KeyCreate(alias="first")))
            refused = generate(tc, {})
            assert refused.status_code == 401 and error(refused)["code"] == "invalid_api_key"
            assert tc.get(KEYS).status_code == 401
            assert generate(tc, auth("bearer", created.key)).status_code == 200
            asyncio.run(KeyService(store).delete(created.id))
            assert generate(tc, {}).status_code == 200  # no credential left: anonymous again
        finally:
            store.close()


# -- 4. limits --------------------------------------------------------------------------------------------------


def test_rpm_is_hit_exactly(tmp_path):
    with gateway(tmp_path, **configured(rpm=3)) as tc:
        headers = auth("bearer", STATIC_KEY)
        assert [generate(tc, headers).status_code for _ in range(3)] == [200, 200, 200]
        before = sample(LIMIT_REJECTIONS, kind="rpm")
        r = generate(tc, headers)
        assert r.status_code == 429, r.text
        assert error(r)["code"] == "rate_limit_exceeded" and error(r)["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "x-should-retry" not in r.headers
        assert sample(LIMIT_REJECTIONS, kind="rpm") == before + 1
        with pytest.raises(openai.RateLimitError) as limited:
            sdk_generate(sdk_for(tc, "bearer", STATIC_KEY))
        assert limited.value.body["code"] == "rate_limit_exceeded"
        # the limit is per principal: the user is not affected
        assert generate(tc, auth("basic", (USER, PASSWORD))).status_code == 200


async def test_concurrency_limit_answers_429_at_once(tmp_path):
    slow = FakeBackend(models=[DEMO_MODEL], step_delay=0.02)
    app = make_app(tmp_path, backend=slow, **configured(max_concurrent=2))
    async with (
        AsyncTestClient(app, base_url=BASE),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=BASE, headers=auth("bearer", STATIC_KEY)
        ) as tc,
    ):
        body = {**BODY, "num_inference_steps": 25}
        running = [
            asyncio.create_task(tc.post(GEN, json=body)),
            asyncio.create_task(tc.post(GEN, json={**body, "stream": True, "partial_images": 1})),
        ]
        await asyncio.sleep(0.1)
        before = sample(LIMIT_REJECTIONS, kind="concurrency")
        rejected = await tc.post(GEN, json=body)
        assert not any(t.done() for t in running)  # answered at once, while both still run
        assert rejected.status_code == 429, rejected.text
        assert error(rejected)["code"] == "rate_limit_exceeded"
        assert int(rejected.headers["retry-after"]) >= 1
        assert sample(LIMIT_REJECTIONS, kind="concurrency") == before + 1
        done = await asyncio.gather(*running)
        assert [r.status_code for r in done] == [200, 200]
        assert "image_generation.completed" in done[1].text
        assert (await tc.post(GEN, json=BODY)).status_code == 200  # the places were given back


@pytest.mark.parametrize(
    ("period", "start", "next_period"),
    [
        ("day", "2031-05-17T23:30:00+00:00", "2031-05-18T00:00:00+00:00"),
        ("hour", "2031-05-17T10:59:00+00:00", "2031-05-17T11:00:00+00:00"),
        ("month", "2031-12-31T23:59:00+00:00", "2032-01-01T00:00:00+00:00"),
    ],
)
def test_quota_is_exact_and_resets_at_the_period_boundary(tmp_path, period, start, next_period):
    now = [at(start)]
    with gateway(tmp_path, clock=lambda: now[0], admin_key=ADMIN_KEY) as tc:
        created = create_key(tc, image_quota=5, quota_period=period)
        headers = auth("bearer", created["key"])
        assert generate(tc, headers, n=2).status_code == 200
        assert generate(tc, headers, n=2).status_code == 200
        before = sample(LIMIT_REJECTIONS, kind="quota")
        spent = generate(tc, headers, n=2)
        assert spent.status_code == 429, spent.text
        assert error(spent)["type"] == "insufficient_quota" and error(spent)["code"] == "insufficient_quota"
        assert spent.headers["x-should-retry"] == "false"
        assert int(spent.headers["retry-after"]) == round(at(next_period) - now[0])
        assert sample(LIMIT_REJECTIONS, kind="quota") == before + 1
        assert generate(tc, headers, n=1).status_code == 200  # exactly 5
        assert generate(tc, headers, n=1).status_code == 429
        with pytest.raises(openai.RateLimitError) as limited:
            sdk_generate(sdk_for(tc, "bearer", created["key"]), n=1)
        assert limited.value.body["code"] == "insufficient_quota"
        wait_for(lambda: show_key(tc, created["id"])["period_usage"]["images"] == 5)

        now[0] = at(next_period) - 1
        assert generate(tc, headers, n=1).status_code == 429
        now[0] = at(next_period)
        assert generate(tc, headers, n=2).status_code == 200
        wait_for(lambda: show_key(tc, created["id"])["period_usage"]["images"] == 2)
        assert show_key(tc, created["id"])["usage"]["images"] == 7


async def test_concurrent_requests_cannot_overshoot_the_quota(tmp_path):
    slow = FakeBackend(models=[DEMO_MODEL], step_delay=0.01)
    app = make_app(tmp_path, backend=slow, **configured(image_quota=3))
    async with (
        AsyncTestClient(app, base_url=BASE),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=BASE, headers=auth("bearer", STATIC_KEY)
        ) as tc,
    ):
        body = {**BODY, "num_inference_steps": 10, "n": 1}
        answers = await asyncio.gather(*(tc.post(GEN, json=body) for _ in range(8)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [200] * 3 + [429] * 5
        assert {error(r)["code"] for r in answers if r.status_code == 429} == {"insufficient_quota"}
        assert (await tc.post(GEN, json=body)).status_code == 429  # the 3 delivered images stay counted


def test_failed_generation_does_not_spend_quota(tmp_path):
    with gateway(tmp_path, backend=FakeBackend(models=[DEMO_MODEL], fail="before"), **configured(image_quota=1)) as tc:
        for _ in range(3):
            assert generate(tc, auth("bearer", STATIC_KEY)).status_code == 502


# -- 5. usage survives a restart --------------------------------------------------------------------------------


def test_usage_survives_a_restart(tmp_path):
    overrides = {"admin_key": ADMIN_KEY}
    with gateway(tmp_path, **overrides) as tc:
        created = create_key(tc, image_quota=4)
        headers = auth("bearer", created["key"])
        assert generate(tc, headers, n=1, num_inference_steps=5).status_code == 200
        assert generate(tc, headers, n=2, num_inference_steps=5).status_code == 200
    expected = {"requests": 2, "images": 3, "pixel_steps": 3 * 64 * 64 * 5}
    with gateway(tmp_path, **overrides) as tc:
        shown = show_key(tc, created["id"])
        assert shown["usage"] == expected and shown["period_usage"] == expected
        r = generate(tc, headers, n=2)
        assert r.status_code == 429 and error(r)["code"] == "insufficient_quota"
        assert generate(tc, headers, n=1).status_code == 200


# -- 6. the admin API -------------------------------------------------------------------------------------------


def test_admin_api_end_to_end(tmp_path):
    with gateway(tmp_path, **configured()) as tc:
        r = tc.post(KEYS, json={"alias": "team-a", "models": ["imagegate-*"], "image_quota": 100}, headers=ADMIN)
        assert r.status_code == 201, r.text
        created = r.json()
        key, key_id = created["key"], created["id"]
        assert key.startswith(KEY_PREFIX) and len(key) - len(KEY_PREFIX) >= 43
        assert created["prefix"] == key[:10] and key.startswith(created["prefix"])
        assert created["alias"] == "team-a" and created["models"] == ["imagegate-*"] and created["active"] is True
        assert created["usage"] == {"requests": 0, "images": 0, "pixel_steps": 0}

        listed = tc.get(KEYS, headers=ADMIN)
        assert listed.status_code == 200 and listed.json()["object"] == "list"
        assert [k["id"] for k in listed.json()["data"]] == [key_id]
        assert key not in listed.text and "key" not in listed.json()["data"][0]

        headers = auth("bearer", key)
        assert generate(tc, headers, n=2).status_code == 200
        wait_for(lambda: show_key(tc, key_id)["usage"]["images"] == 2)
        shown = tc.get(f"{KEYS}/{key_id}", headers=ADMIN)
        assert key not in shown.text
        assert shown.json()["usage"] == {"requests": 1, "images": 2, "pixel_steps": 2 * 64 * 64 * 2}

        patched = tc.patch(f"{KEYS}/{key_id}", json={"rpm": 2}, headers=ADMIN)
        assert patched.status_code == 200 and patched.json()["rpm"] == 2 and patched.json()["image_quota"] == 100
        assert [generate(tc, headers).status_code for _ in range(3)] == [200, 200, 429]
        cleared = tc.patch(f"{KEYS}/{key_id}", json={"rpm": None}, headers=ADMIN)
        assert cleared.json()["rpm"] is None
        assert generate(tc, headers).status_code == 200

        revoked = tc.post(f"{KEYS}/{key_id}/revoke", headers=ADMIN)
        assert revoked.status_code == 200 and revoked.json()["active"] is False and revoked.json()["revoked_at"]
        assert key not in revoked.text
        refused = generate(tc, headers)  # the very next request
        assert refused.status_code == 401 and refused.json()["error"]["message"].startswith("This API key has been")

        reactivated = tc.patch(f"{KEYS}/{key_id}", json={"active": True}, headers=ADMIN)
        assert reactivated.json()["active"] is True and reactivated.json()["revoked_at"] is None
        assert generate(tc, headers).status_code == 200

        assert tc.delete(f"{KEYS}/{key_id}", headers=ADMIN).status_code == 204
        missing = tc.get(f"{KEYS}/{key_id}", headers=ADMIN)
        assert missing.status_code == 404 and error(missing)["code"] == "key_not_found"
        assert tc.delete(f"{KEYS}/{key_id}", headers=ADMIN).status_code == 404
        assert tc.post(f"{KEYS}/{key_id}/revoke", headers=ADMIN).status_code == 404
        assert tc.patch(f"{KEYS}/{key_id}", json={"rpm": 1}, headers=ADMIN).status_code == 404
        gone = generate(tc, headers)
        assert gone.status_code == 401 and error(gone)["message"] == "Incorrect API key provided."
        assert tc.get(KEYS, headers=ADMIN).json()["data"] == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "alias"),
        ({"alias": ""}, "alias"),
        ({"alias": "a", "rpm": -1}, "rpm"),
        ({"alias": "a", "quota_period": "week"}, "quota_period"),
        ({"alias": "a", "expires_at": "next tuesday"}, "expires_at"),
        # Past what SQLite stores (a 500 once) or what a UTC time can show (a 500 on every later read).
        ({"alias": "a", "max_concurrent": 28860548635229671095533568}, "max_concurrent"),
        ({"alias": "a", "image_quota": 2**63}, "image_quota"),
        ({"alias": "a", "rpm": 1_000_000_001}, "rpm"),
        ({"alias": "a", "expires_at": "9999-12-31T23:59:59-23:59"}, "expires_at"),
        ({"alias": "a", "expires_at": "0001-01-01T00:00:00+23:59"}, "expires_at"),
    ],
)
def test_admin_create_validates(tmp_path, body, param):
    with gateway(tmp_path, admin_key=ADMIN_KEY) as tc:
        r = tc.post(KEYS, json=body, headers=ADMIN)
        assert r.status_code == 400, r.text
        assert error(r)["param"] == param
        key = create_key(tc)
        r = tc.patch(f"{KEYS}/{key['id']}", json={k: v for k, v in body.items() if k != "alias"}, headers=ADMIN)
        assert r.status_code == 400 or param == "alias", r.text
        assert tc.get(KEYS, headers=ADMIN).status_code == 200


def test_admin_api_refuses_non_admins(tmp_path):
    with gateway(tmp_path, **configured()) as tc:
        vk = create_key(tc)["key"]
        for headers in (auth("bearer", STATIC_KEY), auth("bearer", vk), auth("basic", (USER, PASSWORD))):
            before = tc.get(KEYS, headers=headers)
            assert before.status_code == 403, before.text
            assert error(before)["code"] == "admin_required" and error(before)["type"] == "permission_error"
            assert tc.post(KEYS, json={"alias": "x"}, headers=headers).status_code == 403
        assert tc.get(KEYS).status_code == 401
        assert tc.get(KEYS, headers=auth("bearer", "sk-ig-nope")).status_code == 401


def test_admin_key_from_the_environment(tmp_path, monkeypatch):
    env_key = "sk-env-admin-7Yh2Lq9Vx3Pw8Kd4Rn6Bm1Tc5Zs0Fg"
    monkeypatch.setenv("IMAGEGATE_ADMIN_KEY", env_key)
    app = make_app(tmp_path)  # settings say nothing: the key is read from os.environ when the gateway starts
    with TestClient(app, base_url=BASE) as tc:
        assert tc.get(KEYS).status_code == 401
        assert tc.get(KEYS, headers=auth("bearer", env_key)).status_code == 200
        assert tc.get(KEYS, headers=auth("x-api-key", env_key)).status_code == 200
        assert generate(tc, auth("bearer", env_key)).status_code == 200


def test_admin_key_from_settings_and_admin_principals(tmp_path):
    admin_static = {"id": "ops", "key_sha256": digest("sk-ops-" + "9" * 40), "admin": True}
    admin_user = {"name": "root", "password_hash": PASSWORD_HASH, "role": "admin"}
    with gateway(tmp_path, admin_key=ADMIN_KEY, api_keys=[admin_static], users=[admin_user]) as tc:
        assert tc.get(KEYS, headers=ADMIN).status_code == 200
        assert tc.get(KEYS, headers=auth("bearer", "sk-ops-" + "9" * 40)).status_code == 200
        r = tc.post(KEYS, json={"alias": "by-root"}, headers=auth("basic", ("root", PASSWORD)))
        assert r.status_code == 201, r.text
        assert tc.get(f"{KEYS}/{r.json()['id']}", headers=auth("basic", ("root", PASSWORD))).status_code == 200


# -- 7. secrets never leak; metrics count exactly ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown_key", "wrong_password", "revoked_key"])
def test_secrets_never_appear(tmp_path, caplog, case):
    caplog.set_level(logging.DEBUG)
    with gateway(tmp_path, **configured()) as tc:
        if case == "unknown_key":
            secret, headers, reason = UNKNOWN_STATIC_KEY, auth("bearer", UNKNOWN_STATIC_KEY), "unknown"
        elif case == "wrong_password":
            secret = "Wr0ng-Pa55w0rd-Qx7Zk2Lm9Vb4"
            headers, reason = auth("basic", (USER, secret)), "bad_password"
        else:
            created = create_key(tc)
            secret, headers, reason = created["key"], auth("x-bf-vk", created["key"]), "revoked"
            assert tc.post(f"{KEYS}/{created['id']}/revoke", headers=ADMIN).status_code == 200
        before = sample(AUTH_FAILURES, reason=reason)
        r = generate(tc, headers)
        assert r.status_code == 401
        assert sample(AUTH_FAILURES, reason=reason) == before + 1
        metrics = tc.get("/metrics", headers=ADMIN)
        assert metrics.status_code == 200
        logs = "\n".join(f"{rec.getMessage()} {rec.args!r} {rec.exc_text or ''}" for rec in caplog.records)
        for text in (r.text, repr(dict(r.headers)), metrics.text, logs, caplog.text):
            for s in (secret, PASSWORD, STATIC_KEY, ADMIN_KEY):
                assert s not in text
            assert base64.b64encode(f"{USER}:{secret}".encode()).decode() not in text


def test_failure_reasons_are_counted_exactly(tmp_path):
    now = [at("2031-05-17T12:00:00+00:00")]
    with gateway(
        tmp_path,
        clock=lambda: now[0],
        admin_key=ADMIN_KEY,
        api_keys=[static_key(), {"id": "old", "key_sha256": digest("sk-old-" + "1" * 40), "expires_at": PAST}],
        users=[user()],
    ) as tc:
        created = create_key(tc)
        assert tc.post(f"{KEYS}/{created['id']}/revoke", headers=ADMIN).status_code == 200
        cases = {
            "missing": {},
            "malformed": {"Authorization": "Digest x"},
            "unknown": auth("bearer", UNKNOWN_STATIC_KEY),
            "expired": auth("bearer", "sk-old-" + "1" * 40),
            "revoked": auth("bearer", created["key"]),
            "bad_password": auth("basic", (USER, "not-the-password")),
        }
        for reason, headers in cases.items():
            before = {r: sample(AUTH_FAILURES, reason=r) for r in cases}
            assert generate(tc, headers).status_code == 401
            after = {r: sample(AUTH_FAILURES, reason=r) for r in cases}
            assert after == {r: before[r] + (r == reason) for r in cases}, reason


def test_limit_rejections_and_key_images_are_counted(tmp_path):
    with gateway(tmp_path, admin_key=ADMIN_KEY) as tc:
        alias = f"metrics-{new_key()[-8:]}"
        created = create_key(tc, alias=alias, rpm=2, image_quota=3)
        headers = auth("bearer", created["key"])
        elsewhere = auth("bearer", create_key(tc, alias=f"{alias}-other", models=["other-*"])["key"])
        kinds = ("model", "rpm", "concurrency", "quota")
        before = {k: sample(LIMIT_REJECTIONS, kind=k) for k in kinds}
        images = sample(KEY_IMAGES, key=alias)
        assert generate(tc, headers, n=2).status_code == 200
        assert sample(KEY_IMAGES, key=alias) == images + 2
        assert generate(tc, elsewhere).status_code == 403
        assert generate(tc, headers, n=2).status_code == 429  # quota: 2 + 2 > 3
        assert generate(tc, headers, n=1).status_code == 200
        assert generate(tc, headers, n=1).status_code == 429  # quota again (checked before rpm)
        assert tc.patch(f"{KEYS}/{created['id']}", json={"image_quota": None}, headers=ADMIN).status_code == 200
        assert generate(tc, headers, n=1).status_code == 429  # rpm: 2 already admitted this minute
        after = {k: sample(LIMIT_REJECTIONS, kind=k) for k in kinds}
        assert after == {**before, "model": before["model"] + 1, "quota": before["quota"] + 2, "rpm": before["rpm"] + 1}
        assert sample(KEY_IMAGES, key=alias) == images + 3
        assert sample(KEY_IMAGES, key=f"{alias}-other") == 0
        assert f'imagegate_key_images_total{{key="{alias}"}} {images + 3}' in tc.get("/metrics").text
