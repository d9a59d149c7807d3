"""The custom-models inference API (``/infer_api/v1``) through the in-process HTTP stack, on fake backends.

One gateway per module: four models in three projects, three static keys (alice may use ``imagegate-*`` only, bob
every model, root is an admin). Tests that need their own jobs delete them, or look only at the jobs they made.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from litestar.testing import TestClient
from PIL import Image

from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL, ConfigError, load_settings

from .conftest import BASE, make_client

INFER = "/infer_api/v1"
STYLED = "imagegate-styled"
BROKEN = "imagegate-broken"
SECRET = "secret-model"
ALICE = {"authorization": "Bearer sk-alice"}
BOB = {"authorization": "Bearer sk-bob"}
ROOT = {"authorization": "Bearer sk-root"}
RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def key(secret: str, **fields: Any) -> dict[str, Any]:
    return {"key_sha256": hashlib.sha256(secret.encode()).hexdigest(), **fields}


def settings_for(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """The module's models and keys; ``overrides`` are more settings."""
    (tmp / "samples").mkdir(exist_ok=True)
    (tmp / "samples" / "cat.png").write_bytes(png(96, 64))
    (tmp / "samples" / "notes.txt").write_text("not an image")
    demo = {
        "name": DEMO_MODEL,
        "path": str(tmp / "demo"),
        "project": "studio",
        "default_size": "256x256",
        "size_multiple": 16,
        "sample_images": [str(tmp / "samples" / "cat.png"), str(tmp / "samples" / "notes.txt")],
        "trigger_words": ["ohwx"],
        "style": "watercolor, soft light",
    }
    styled = {
        "name": STYLED,
        "path": str(tmp / "styled"),
        "project": "studio",
        "style": "ink",
        "trigger_words": ["zwx"],
        "enhance_template": "{trigger}: {prompt}, drawn in {style}",
    }
    broken = {"name": BROKEN, "path": str(tmp / "broken")}
    secret = {"name": SECRET, "path": str(tmp / "secret"), "project": "private"}
    keys = [
        {"id": "alice", "models": ["imagegate-*"], **key("sk-alice")},
        {"id": "bob", **key("sk-bob")},
        {"id": "root", "admin": True, **key("sk-root")},
    ]
    return {"models": [demo, styled, broken, secret], "api_keys": keys, "job_poll_interval": 0.1, **overrides}


def backends() -> list[tuple[FakeBackend, list[str]]]:
    return [
        (FakeBackend(models=[DEMO_MODEL, STYLED, SECRET], step_delay=0.01), [DEMO_MODEL, STYLED, SECRET]),
        (FakeBackend(name="broken", models=[BROKEN], fail="invalid"), [BROKEN]),
    ]


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("infer")
    with make_client(tmp, backends(), **settings_for(tmp)) as tc:
        yield tc


def generate(client: TestClient, headers: dict[str, str] = ALICE, **fields: Any) -> dict[str, Any]:
    body = {"project": "studio", "model": DEMO_MODEL, "prompt": "a red fox", "size": "64x64", "steps": 3, **fields}
    r = client.post(f"{INFER}/generations", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()


def result(client: TestClient, job: dict[str, Any], headers: dict[str, str] = ALICE) -> dict[str, Any]:
    """Poll the job's result until it ended (200)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = client.get(job["result_url"].removeprefix(BASE), headers=headers)
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 202, r.text
        time.sleep(0.02)
    raise AssertionError(f"job {job['job_id']} did not end")


# -- aspect ratios ------------------------------------------------------------------------------------------------


def test_aspect_ratios_are_the_models_grid(client):
    r = client.get(f"{INFER}/aspect_ratios", headers=ALICE)
    assert r.status_code == 200, r.text
    table = r.json()
    assert table["model"] == DEMO_MODEL, "the first model the caller may use"
    assert [row["aspect_ratio"] for row in table["data"]] == RATIOS
    sizes = {row["aspect_ratio"]: (row["width"], row["height"]) for row in table["data"]}
    # No family reported: the side of the 256x256 default, on the grid of 16.
    assert sizes["1:1"] == (256, 256) and sizes["16:9"] == (336, 192) and sizes["9:16"] == (192, 336)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in sizes.values())
    styled = client.get(f"{INFER}/aspect_ratios", params={"model": STYLED}, headers=ALICE).json()
    assert styled["model"] == STYLED and styled["data"][0] == {"aspect_ratio": "1:1", "width": 512, "height": 512}


@pytest.mark.parametrize("ratio", ["16:9", "16%3A9", "16x9", "16-9", "16_9", "016:09"])
def test_output_dimensions_accept_ratio_spellings(client, ratio):
    r = client.get(f"{INFER}/output_image_dimensions/{ratio}", headers=ALICE)
    assert r.status_code == 200, r.text
    assert r.json() == {"model": DEMO_MODEL, "aspect_ratio": "16:9", "width": 336, "height": 192}


def test_unknown_ratio_or_model_is_404(client):
    r = client.get(f"{INFER}/output_image_dimensions/7:5", headers=ALICE)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "unknown_aspect_ratio" and error["param"] == "aspect_ratio"
    assert all(ratio in error["message"] for ratio in RATIOS), "the message lists the valid ratios"
    for model in ("nope", SECRET):  # a model alice may not use does not exist for her
        r = client.get(f"{INFER}/aspect_ratios", params={"model": model}, headers=ALICE)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert client.get(f"{INFER}/aspect_ratios", params={"model": SECRET}, headers=BOB).status_code == 200


# -- projects and models ------------------------------------------------------------------------------------------


def test_projects_hold_the_models_the_caller_may_use(client):
    alice = client.get(f"{INFER}/projects", headers=ALICE).json()["data"]
    assert alice == [{"name": "studio", "model_count": 2}, {"name": "default", "model_count": 1}]
    bob = client.get(f"{INFER}/projects", headers=BOB).json()["data"]
    assert {"name": "private", "model_count": 1} in bob
    models = client.get(f"{INFER}/projects/studio/models", headers=ALICE).json()
    assert models["project"] == "studio"
    assert [(m["name"], m["trigger_words"], m["sample_image_count"]) for m in models["data"]] == [
        (DEMO_MODEL, ["ohwx"], 2),
        (STYLED, ["zwx"], 0),
    ]
    for path, headers in ((f"{INFER}/projects/nope/models", ALICE), (f"{INFER}/projects/private/models", ALICE)):
        r = client.get(path, headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "project_not_found", r.text


def test_model_config(client):
    r = client.get(f"{INFER}/projects/studio/models/{DEMO_MODEL}/config", headers=ALICE)
    assert r.status_code == 200, r.text
    config = r.json()
    assert (config["name"], config["project"], config["default_size"]) == (DEMO_MODEL, "studio", "256x256")
    assert (config["size_multiple"], config["max_images"], config["max_steps"]) == (16, 10, 100)
    assert config["trigger_words"] == ["ohwx"] and config["style"] == "watercolor, soft light"
    assert [row["aspect_ratio"] for row in config["aspect_ratios"]] == RATIOS
    assert config["output_formats"] == ["png", "jpeg", "webp"]
    for path, headers in (
        (f"{INFER}/projects/studio/models/{BROKEN}/config", ALICE),  # served, but in another project
        (f"{INFER}/projects/studio/models/nope/config", ALICE),
        (f"{INFER}/projects/private/models/{SECRET}/config", ALICE),  # not allowed
    ):
        r = client.get(path, headers=headers)
        assert r.status_code == 404, (path, r.text)
    assert client.get(f"{INFER}/projects/private/models/{SECRET}/config", headers=BOB).status_code == 200


def test_sample_images_list_and_download(client):
    r = client.get(f"{INFER}/projects/studio/models/{DEMO_MODEL}/images", headers=ALICE)
    assert r.status_code == 200, r.text
    samples = r.json()
    assert (samples["project"], samples["model"]) == ("studio", DEMO_MODEL)
    assert [(s["index"], s["name"], s["width"], s["height"]) for s in samples["data"]] == [(0, "cat.png", 96, 64)]
    url = samples["data"][0]["url"]
    assert url == f"{BASE}{INFER}/projects/studio/models/{DEMO_MODEL}/images/0"
    image = client.get(url.removeprefix(BASE), headers=ALICE)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (96, 64)
    assert client.get(url.removeprefix(BASE)).status_code == 401, "the file needs the same credential"
    for index in (1, 2):  # not an image; out of range
        r = client.get(f"{INFER}/projects/studio/models/{DEMO_MODEL}/images/{index}", headers=ALICE)
        assert r.status_code == 404, r.text
    assert client.get(f"{INFER}/projects/studio/models/{STYLED}/images", headers=ALICE).json()["data"] == []


# -- generations --------------------------------------------------------------------------------------------------


def test_generation_then_result(client):
    r = client.post(
        f"{INFER}/generations",
        json={"project": "studio", "model": DEMO_MODEL, "prompt": "a red fox", "aspect_ratio": "16x9", "seed": 5},
        headers=ALICE,
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and (job["project"], job["model"]) == ("studio", DEMO_MODEL)
    assert job["result_url"] == f"{BASE}{INFER}/generations/{job['job_id']}/result" == r.headers["location"]
    pending = client.get(job["result_url"].removeprefix(BASE), headers=ALICE)
    assert pending.status_code == 202 and pending.json()["status"] in ("queued", "running")
    done = result(client, job)
    assert done["status"] == "completed" and done["prompt"] == "a red fox" and done["seed"] == 5
    assert done["size"] == "336x192" and done["model"] == DEMO_MODEL
    assert done["completed_at"] >= done["created_at"] and "error" not in done
    [image] = done["images"]
    file = client.get(image["url"].removeprefix(BASE))
    assert file.status_code == 200 and Image.open(io.BytesIO(file.content)).size == (336, 192)


@pytest.mark.parametrize(
    ("fields", "size"),
    [
        ({"width": 128, "height": 64, "size": None}, "128x64"),
        ({"size": "128x96"}, "128x96"),
        ({"size": None}, "256x256"),
    ],
)
def test_generation_sizes(client, fields, size):
    job = generate(client, **fields, num_images=2)
    done = result(client, job)
    assert done["size"] == size and len(done["images"]) == 2


def test_failed_generation_has_an_error(client):
    job = generate(client, project="default", model=BROKEN)
    done = result(client, job)
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_request" and "images" not in done


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"aspect_ratio": "7:5", "size": None}, 400, "aspect_ratio"),
        ({"aspect_ratio": "1:1"}, 400, "size"),  # with size too
        ({"width": 64}, 400, "height"),
        ({"size": "65x64"}, 400, "size"),  # the image service's check
        ({"steps": 1000}, 400, "num_inference_steps"),
        ({"num_images": 11}, 400, "num_images"),
        ({"prompt": ""}, 400, "prompt"),
        ({"project": "default"}, 404, "model"),  # the model is in studio
        ({"model": "nope"}, 404, "model"),
    ],
)
def test_generation_refusals(client, fields, status, param):
    body = {"project": "studio", "model": DEMO_MODEL, "prompt": "x", "size": "64x64", **fields}
    r = client.post(f"{INFER}/generations", json=body, headers=ALICE)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_generation_of_a_model_the_caller_may_not_use_is_403(client):
    body = {"project": "private", "model": SECRET, "prompt": "x", "size": "64x64"}
    r = client.post(f"{INFER}/generations", json=body, headers=ALICE)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"


def test_idempotency_key(client):
    headers = {**ALICE, "idempotency-key": "infer-k1"}
    body = {"project": "studio", "model": DEMO_MODEL, "prompt": "same", "size": "64x64"}
    first = client.post(f"{INFER}/generations", json=body, headers=headers)
    again = client.post(f"{INFER}/generations", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["job_id"] == again.json()["job_id"]
    other = client.post(f"{INFER}/generations", json={**body, "prompt": "other"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    result(client, first.json())


def test_another_callers_job_does_not_exist(client):
    job = generate(client)
    path = f"{INFER}/generations/{job['job_id']}/result"
    assert client.get(path, headers=BOB).status_code == 404
    assert client.delete(f"{INFER}/jobs/{job['job_id']}", headers=BOB).status_code == 404
    assert client.get(path, headers=ROOT).status_code in (200, 202), "an admin sees every job"
    result(client, job)


def test_jobs_of_other_surfaces_are_not_here(client):
    r = client.post(
        "/v1/images/generations",
        json={"model": DEMO_MODEL, "prompt": "x", "size": "64x64", "num_inference_steps": 2},
        headers={**ALICE, "prefer": "respond-async"},
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert client.get(f"{INFER}/generations/{job_id}/result", headers=ALICE).status_code == 404
    assert client.delete(f"{INFER}/jobs/{job_id}", headers=ALICE).status_code == 404
    listed = client.get(f"{INFER}/jobs", params={"limit": 100}, headers=ALICE).json()["data"]
    assert job_id not in {j["job_id"] for j in listed}


# -- prompt enhancement -------------------------------------------------------------------------------------------


def test_enhance_with_the_template_enhancer(client):
    path = f"{INFER}/projects/studio/models/{DEMO_MODEL}/enhance-prompt"
    r = client.post(path, json={"prompt": "  a cat on a roof "}, headers=ALICE)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["method"] == "template" and out["original_prompt"] == "a cat on a roof"
    assert out["enhanced_prompt"].startswith("ohwx, a cat on a roof, watercolor, soft light")
    r = client.post(f"{INFER}/projects/studio/models/{STYLED}/enhance-prompt", json={"prompt": "a cat"}, headers=ALICE)
    assert r.json()["enhanced_prompt"] == "zwx: a cat, drawn in ink", "the model's enhance_template"
    for body in ({"prompt": ""}, {"prompt": "   "}, {}):
        r = client.post(path, json=body, headers=ALICE)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = client.post(f"{INFER}/projects/default/models/{DEMO_MODEL}/enhance-prompt", json={"prompt": "x"}, headers=ALICE)
    assert r.status_code == 404


def test_a_bad_enhance_template_is_a_config_error(tmp_path):
    models = [{"name": "m", "path": str(tmp_path), "enhance_template": "{prompt} in {colour}"}]
    with pytest.raises(ConfigError, match=r"enhance_template.*colour"):
        load_settings(environ={}, overrides={"data_dir": str(tmp_path), "models": models})


class ChatStub:
    """An OpenAI-compatible chat completions server on a thread of its own; ``status`` is what it answers."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.status = 200
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.url = ""
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    async def _chat(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.json()))
        if self.status != 200:
            return web.json_response({"error": {"message": "down"}}, status=self.status)
        content = '"A sleek cat, golden hour light, oil on canvas"'
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": content}}]})

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_enhance_with_a_chat_upstream(tmp_path, monkeypatch):
    stub = ChatStub()
    monkeypatch.setenv("INFER_TEST_ENHANCER_KEY", "sk-chat")
    try:
        overrides = settings_for(
            tmp_path, enhancer_url=stub.url, enhancer_model="qwen", enhancer_api_key_env="INFER_TEST_ENHANCER_KEY"
        )
        with make_client(tmp_path, backends(), **overrides) as client:
            path = f"{INFER}/projects/studio/models/{DEMO_MODEL}/enhance-prompt"
            r = client.post(path, json={"prompt": "a cat"}, headers=ALICE)
            assert r.status_code == 200, r.text
            assert r.json() == {
                "original_prompt": "a cat",
                "enhanced_prompt": "ohwx, A sleek cat, golden hour light, oil on canvas",
                "method": "llm",
            }, "quotes stripped, the lost trigger word put back"
            headers, body = stub.requests[-1]
            assert headers["Authorization"] == "Bearer sk-chat" and body["model"] == "qwen"
            system = body["messages"][0]["content"]
            assert "watercolor, soft light" in system and "ohwx" in system
            assert body["messages"][1] == {"role": "user", "content": "a cat"}

            stub.status = 500
            r = client.post(path, json={"prompt": "a cat"}, headers=ALICE)
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "enhancer_failed" and "500" in r.json()["error"]["message"]
    finally:
        stub.stop()


# -- jobs ---------------------------------------------------------------------------------------------------------


def test_job_lists_filters_and_pagination(tmp_path):
    with make_client(tmp_path, backends(), **settings_for(tmp_path)) as client:
        done = [generate(client) for _ in range(3)]
        failed = generate(client, project="default", model=BROKEN)
        theirs = generate(client, headers=BOB)
        for job in [*done, failed]:
            result(client, job)
        result(client, theirs, BOB)
        mine = client.get(f"{INFER}/jobs", headers=ALICE).json()
        ids = [j["job_id"] for j in mine["data"]]
        assert ids == [failed["job_id"], *(j["job_id"] for j in reversed(done))], "the caller's own, newest first"
        assert mine["first_id"] == ids[0] and mine["last_id"] == ids[-1] and not mine["has_more"]
        assert mine["data"][0]["status"] == "failed" and mine["data"][0]["error"]["code"] == "invalid_request"
        assert {j["status"] for j in mine["data"][1:]} == {"completed"}

        pages, after = [], None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
            page = client.get(f"{INFER}/jobs/completed", params=params, headers=ALICE).json()
            pages.append([j["job_id"] for j in page["data"]])
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert pages == [ids[1:3], ids[3:]]
        failed_page = client.get(f"{INFER}/jobs/failed", headers=ALICE).json()
        assert [j["job_id"] for j in failed_page["data"]] == [failed["job_id"]]
        everyone = client.get(f"{INFER}/jobs", headers=ROOT).json()["data"]
        assert {j["job_id"] for j in everyone} == {*ids, theirs["job_id"]}, "an admin sees every job"

        for params in ({"limit": 0}, {"limit": 101}):
            assert client.get(f"{INFER}/jobs", params=params, headers=ALICE).status_code == 400
        r = client.get(f"{INFER}/jobs", params={"after": theirs["job_id"]}, headers=ALICE)
        assert r.status_code == 404, "another's job is no cursor"


def test_delete_one_and_all(tmp_path):
    with make_client(tmp_path, backends(), **settings_for(tmp_path)) as client:
        mine = [generate(client) for _ in range(3)]
        theirs = generate(client, headers=BOB)
        for job in mine:
            result(client, job)
        result(client, theirs, BOB)

        r = client.delete(f"{INFER}/jobs/{mine[0]['job_id']}", headers=ALICE)
        assert r.status_code == 200 and r.json() == {"job_id": mine[0]["job_id"], "deleted": True}
        assert client.get(mine[0]["result_url"].removeprefix(BASE), headers=ALICE).status_code == 404
        assert client.delete(f"{INFER}/jobs/{mine[0]['job_id']}", headers=ALICE).status_code == 404

        r = client.delete(f"{INFER}/jobs", headers=ALICE)
        assert r.status_code == 200 and r.json() == {"deleted": 2}, "the caller's own only"
        assert client.get(f"{INFER}/jobs", headers=BOB).json()["data"][0]["job_id"] == theirs["job_id"]
        generate(client)
        assert client.delete(f"{INFER}/jobs", headers=ROOT).json() == {"deleted": 2}, "an admin's: everyone's"
        assert client.get(f"{INFER}/jobs", headers=ROOT).json()["data"] == []


# -- auth ---------------------------------------------------------------------------------------------------------


def test_secure_route(client):
    r = client.get(f"{INFER}/secure-route")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.get(f"{INFER}/secure-route", headers=ALICE)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    r = client.get(f"{INFER}/secure-route", headers=ROOT)
    assert r.status_code == 200 and r.json()["principal"] == "root"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"{INFER}/aspect_ratios"),
        ("GET", f"{INFER}/projects"),
        ("POST", f"{INFER}/generations"),
        ("GET", f"{INFER}/jobs"),
        ("DELETE", f"{INFER}/jobs"),
    ],
)
def test_every_route_needs_a_credential(client, method, path):
    r = client.request(method, path, json={} if method == "POST" else None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
