"""CORS (the ``cors_origins`` setting): a browser frontend on another origin may call the API, streams included."""

from __future__ import annotations

import json

from app.config import DEMO_MODEL

from .conftest import make_client

FRONTEND = "http://localhost:5173"
STRANGER = "https://evil.example"
GEN = "/v1/images/generations"


def preflight(client, origin: str):
    return client.options(
        GEN,
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )


def listed(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


def test_preflight_from_an_allowed_origin(tmp_path, fake):
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], cors_origins=[FRONTEND]) as client:
        response = preflight(client, FRONTEND)
        assert response.status_code in (200, 204), response.text
        assert response.headers["access-control-allow-origin"] == FRONTEND
        assert "POST" in {m.upper() for m in listed(response.headers.get("access-control-allow-methods"))}
        assert {"authorization", "content-type"} <= listed(response.headers.get("access-control-allow-headers"))


def test_streamed_post_from_an_allowed_origin(tmp_path, fake):
    body = {"model": DEMO_MODEL, "prompt": "a red fox", "size": "64x64", "stream": True, "partial_images": 1}
    with (
        make_client(tmp_path, [(fake, [DEMO_MODEL])], cors_origins=[FRONTEND]) as client,
        client.stream("POST", GEN, json=body, headers={"origin": FRONTEND, "authorization": "Bearer x"}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["access-control-allow-origin"] == FRONTEND
        assert "retry-after" in listed(response.headers.get("access-control-expose-headers"))
        events = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert events == ["image_generation.partial_image", "image_generation.completed"], events


def test_an_error_answer_carries_the_cors_header_too(tmp_path, fake):
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], cors_origins=[FRONTEND]) as client:
        response = client.post(GEN, json={"prompt": "x", "size": "100x7"}, headers={"origin": FRONTEND})
        assert response.status_code == 400
        assert response.headers["access-control-allow-origin"] == FRONTEND
        assert json.loads(response.text)["error"]["param"] == "size"


def test_a_disallowed_origin_gets_no_cors_grant(tmp_path, fake):
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], cors_origins=[FRONTEND]) as client:
        assert "access-control-allow-origin" not in preflight(client, STRANGER).headers
        response = client.get("/v1/models", headers={"origin": STRANGER})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


def test_no_cors_headers_by_default(client):
    for response in (
        preflight(client, FRONTEND),
        client.get("/v1/models", headers={"origin": FRONTEND}),
        client.post(GEN, json={"prompt": "x", "size": "64x64"}, headers={"origin": FRONTEND}),
    ):
        assert not [h for h in response.headers if h.lower().startswith("access-control-")], response.headers
    # The playground is same-origin, so it needs none.
    assert client.get("/").headers["content-type"].startswith("text/html")
