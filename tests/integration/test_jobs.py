"""The job layer through the in-process HTTP stack with fake backends: submit, follow, cancel, delete, limits.

Real processes (kill -9 of the gateway, the demo model) are in ``tests/e2e/test_jobs_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from litestar.testing import TestClient
from standardwebhooks import Webhook

from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL
from app.store.jobs import JobRecord
from tests.helpers import sample
from tests.integration.conftest import BASE, make_client
from tests.integration.test_edits import png

ASYNC = {"prefer": "respond-async"}
ADMIN = "admin-secret-key"


def body(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 4, **fields}


def wait_for(client: TestClient, job_id: str, statuses=("succeeded", "failed", "cancelled", "expired"), **kw) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", **kw).json()
        if job.get("status") in statuses:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {job}")


def sse_events(text: str) -> list[tuple[str, dict]]:
    out, kind = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind:
            out.append((kind, json.loads(line[6:])))
    return out


@pytest.fixture
def slow() -> FakeBackend:
    return FakeBackend(models=[DEMO_MODEL], step_delay=0.02)


@pytest.fixture
def client(tmp_path, slow) -> Iterator[TestClient]:
    with make_client(tmp_path, [(slow, [DEMO_MODEL])], job_lease=3.0, job_poll_interval=0.1) as tc:
        yield tc


def test_submit_poll_result_and_download(client, slow):
    r = client.post("/v1/images/generations", json=body(seed=7, response_format="b64_json"), headers=ASYNC)
    assert r.status_code == 202
    job = r.json()
    assert job["object"] == "image.job" and job["status"] == "queued" and job["kind"] == "image.generation"
    assert r.headers["location"] == f"{BASE}/v1/jobs/{job['id']}" == job["urls"]["get"]
    assert r.headers["preference-applied"] == "respond-async"
    done = wait_for(client, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["error"] is None
    assert done["progress"] == {"step": 4, "total": 4, "percent": 100, "eta_seconds": 0.0}
    assert done["started_at"] is not None and done["completed_at"] >= done["started_at"]
    assert done["expires_at"] == done["created_at"] + 86400
    result = done["result"]
    assert result["size"] == "64x64" and result["usage"]["output_tokens"] == 16
    assert slow.last_params is not None and slow.last_params.seed == 7
    image = client.get(result["data"][0]["url"].removeprefix(BASE))
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    tampered = result["data"][0]["url"].removeprefix(BASE).replace("signature=", "signature=0")
    assert client.get(tampered).status_code == 404


def test_events_replay_then_end(client):
    job = client.post("/v1/images/generations", json=body(partial_images=2, n=2), headers=ASYNC).json()
    wait_for(client, job["id"])
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse_events("".join(s.iter_text()))
    kinds = [k for k, _ in events]
    assert kinds[0] == "image.job.queued" and kinds[1] == "image.job.started"
    assert kinds[-1] == "image.job.succeeded" and "image.job.progress" in kinds
    partials = [d for k, d in events if k == "image.job.partial_image"]
    assert sorted((d["image_index"], d["partial_image_index"]) for d in partials) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(d["b64_json"] for d in partials)
    final = events[-1][1]["job"]
    assert final["status"] == "succeeded" and len(final["result"]["data"]) == 2


def test_events_follow_a_running_job_live(tmp_path):
    slow = FakeBackend(models=[DEMO_MODEL], step_delay=0.1)
    with make_client(tmp_path, [(slow, [DEMO_MODEL])], job_poll_interval=5.0) as client:
        job = client.post("/v1/images/generations", json=body(num_inference_steps=12), headers=ASYNC).json()
        seen: list[tuple[str, float]] = []
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
            for line in s.iter_lines():
                if line.startswith("event: "):
                    seen.append((line[7:], time.monotonic()))
        kinds = [k for k, _ in seen]
        assert kinds[-1] == "image.job.succeeded" and kinds.count("image.job.progress") >= 2
        # live, not at the poll interval: the stream ended soon after the run did
        assert seen[-1][1] - seen[0][1] < 4.0


def test_cancel_queued_running_and_finished(tmp_path):
    hang = FakeBackend(models=[DEMO_MODEL], fail="hang")
    with make_client(tmp_path, [(hang, [DEMO_MODEL])], job_poll_interval=0.1) as client:
        running = client.post("/v1/images/generations", json=body(), headers=ASYNC).json()
        wait_for(client, running["id"], statuses=("running",))
        queued = client.post("/v1/images/generations", json=body(), headers=ASYNC).json()
        time.sleep(0.3)  # one model slot for jobs: the second stays queued
        assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
        r = client.post(f"/v1/jobs/{queued['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert r.json()["error"]["code"] == "cancelled"
        r = client.post(f"/v1/jobs/{running['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert hang.cancelled == 1  # the backend's run was stopped, not left to finish
        r = client.post(f"/v1/jobs/{running['id']}/cancel")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_delete_removes_the_job_and_its_files(client, tmp_path):
    job = client.post("/v1/images/generations", json=body(), headers=ASYNC).json()
    done = wait_for(client, job["id"])
    files = list((tmp_path / "job-files").glob(f"{job['id']}_*"))
    assert files
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json() == {"id": job["id"], "object": "image.job.deleted", "deleted": True}
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert not any(f.exists() for f in files)
    assert client.get(done["result"]["data"][0]["url"].removeprefix(BASE)).status_code == 404


def test_idempotency_key(client):
    key = {"idempotency-key": "order-1234", **ASYNC}
    first = client.post("/v1/images/generations", json=body(), headers=key)
    again = client.post("/v1/images/generations", json=body(), headers=key)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/images/generations", json=body(prompt="a blue fox"), headers=key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert len(client.get("/v1/jobs").json()["data"]) == 1


def test_list_filters_and_pages(client):
    ids = [client.post("/v1/images/generations", json=body(), headers=ASYNC).json()["id"] for _ in range(5)]
    for job_id in ids:
        wait_for(client, job_id)
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] and [j["id"] for j in page["data"]] == ids[::-1][:2]
    rest = client.get("/v1/jobs", params={"limit": 10, "after": page["last_id"]}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    assert len(client.get("/v1/jobs", params={"status": "succeeded"}).json()["data"]) == 5
    assert client.get("/v1/jobs", params={"status": "queued"}).json()["data"] == []
    assert client.get("/v1/jobs", params={"status": "nonsense"}).status_code == 400


def test_another_principal_never_sees_a_job(tmp_path, slow):
    with make_client(tmp_path, [(slow, [DEMO_MODEL])], admin_key=ADMIN) as client:
        admin = {"authorization": f"Bearer {ADMIN}"}
        keys = [
            client.post("/admin/keys", json={"alias": a, "models": ["*"]}, headers=admin).json()["key"]
            for a in ("alice", "bob")
        ]
        alice, bob = ({"authorization": f"Bearer {k}"} for k in keys)
        job = client.post("/v1/images/generations", json=body(), headers={**alice, **ASYNC}).json()
        wait_for(client, job["id"], headers=alice)
        for method, path in [
            ("GET", f"/v1/jobs/{job['id']}"),
            ("GET", f"/v1/jobs/{job['id']}/events"),
            ("POST", f"/v1/jobs/{job['id']}/cancel"),
            ("DELETE", f"/v1/jobs/{job['id']}"),
        ]:
            r = client.request(method, path, headers=bob)
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (method, path)
        assert client.get("/v1/jobs", headers=bob).json()["data"] == []
        assert client.get("/v1/jobs", params={"after": job["id"]}, headers=bob).status_code == 404
        assert [j["id"] for j in client.get("/v1/jobs", headers=admin).json()["data"]] == [job["id"]]
        assert client.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200


def test_quota_is_reserved_at_submit_and_settled_at_the_end(tmp_path):
    hang = FakeBackend(models=[DEMO_MODEL], fail="hang")
    with make_client(tmp_path, [(hang, [DEMO_MODEL])], admin_key=ADMIN, job_poll_interval=0.1) as client:
        admin = {"authorization": f"Bearer {ADMIN}"}
        created = client.post("/admin/keys", json={"alias": "q", "image_quota": 3}, headers=admin).json()
        key = {"authorization": f"Bearer {created['key']}"}
        first = client.post("/v1/images/generations", json=body(n=2), headers={**key, **ASYNC})
        assert first.status_code == 202
        # the queued/running job holds 2 of 3 images: 2 more are refused now, not failed later
        refused = client.post("/v1/images/generations", json=body(n=2), headers={**key, **ASYNC})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        sync = client.post("/v1/images/generations", json=body(n=2), headers=key)
        assert sync.status_code == 429
        client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=key)  # cancelled: nothing delivered, nothing held
        assert client.post("/v1/images/generations", json=body(n=3), headers={**key, **ASYNC}).status_code == 202


def test_usage_is_charged_when_a_job_succeeds(tmp_path, slow):
    with make_client(tmp_path, [(slow, [DEMO_MODEL])], admin_key=ADMIN) as client:
        admin = {"authorization": f"Bearer {ADMIN}"}
        created = client.post("/admin/keys", json={"alias": "u", "image_quota": 3}, headers=admin).json()
        key = {"authorization": f"Bearer {created['key']}"}
        job = client.post("/v1/images/generations", json=body(n=2), headers={**key, **ASYNC}).json()
        wait_for(client, job["id"], headers=key)
        usage = client.get(f"/admin/keys/{created['id']}", headers=admin).json()["usage"]
        assert usage["requests"] == 1 and usage["images"] == 2
        r = client.post("/v1/images/generations", json=body(n=2), headers={**key, **ASYNC})
        assert r.status_code == 429


def test_refusals_are_immediate(client):
    r = client.post("/v1/images/generations", json=body(size="13x13"), headers=ASYNC)
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    r = client.post("/v1/images/generations", json=body(model="nope"), headers=ASYNC)
    assert r.status_code == 404
    r = client.post("/v1/images/generations", json=body(webhook_url="https://hooks.example.com/x"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url"
    for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/latest", "ftp://hooks.example.com/x"):
        r = client.post("/v1/images/generations", json=body(webhook_url=url), headers=ASYNC)
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", url
    assert client.get("/v1/jobs").json()["data"] == []


def test_a_failed_run_says_why(tmp_path):
    bad = FakeBackend(models=[DEMO_MODEL], fail="invalid")
    with make_client(tmp_path, [(bad, [DEMO_MODEL])], job_poll_interval=0.1) as client:
        job = client.post("/v1/images/generations", json=body(), headers=ASYNC).json()
        done = wait_for(client, job["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "invalid_request"
        assert done["result"] is None and done["attempts"] == 1


def test_edits_and_variations_run_as_jobs(client, slow):
    image = png(64, 64)
    r = client.post(
        "/v1/images/edits",
        files={"image": ("in.png", image, "image/png")},
        data={"prompt": "a hat", "size": "64x64", "num_inference_steps": "4"},
        headers=ASYNC,
    )
    assert r.status_code == 202 and r.json()["kind"] == "image.edit"
    done = wait_for(client, r.json()["id"])
    assert done["status"] == "succeeded" and slow.last_attachments == [image]
    r = client.post("/v1/images/variations", files={"image": ("in.png", image, "image/png")}, headers=ASYNC)
    assert r.status_code == 202 and r.json()["kind"] == "image.variation"
    assert wait_for(client, r.json()["id"])["status"] == "succeeded" and slow.last_attachments == [image]


class Counted(FakeBackend):
    """A fake backend that counts the runs in flight on every instance at once."""

    running = 0
    most = 0

    async def generate(self, params, attachments=()):
        Counted.running += 1
        Counted.most = max(Counted.most, Counted.running)
        try:
            async for event in super().generate(params, attachments):
                yield event
        finally:
            Counted.running -= 1


def test_jobs_take_only_their_share_of_capacity(tmp_path):
    backends = [Counted(name=f"fake{i}", models=[DEMO_MODEL], step_delay=0.05) for i in range(4)]
    with make_client(tmp_path, [(b, [DEMO_MODEL]) for b in backends], job_share=0.5, job_poll_interval=0.05) as client:
        ids = [
            client.post("/v1/images/generations", json=body(num_inference_steps=6), headers=ASYNC).json()["id"]
            for _ in range(6)
        ]
        wait_for(client, ids[0], statuses=("running",))
        # a synchronous request meanwhile finds a free backend: it is not queued behind the jobs
        sync = client.post("/v1/images/generations", json=body())
        assert sync.status_code == 200
        Counted.most = 0
        for job_id in ids:
            wait_for(client, job_id)
        assert Counted.most == 2  # half of four backends


def test_lost_runs_are_rerun_then_fail_and_expired_ones_are_swept(tmp_path, slow):
    now = [time.time()]
    settings = {"job_lease": 0.6, "job_poll_interval": 0.05, "job_max_attempts": 2, "job_retention": 100.0}
    from app.asgi import create_app
    from app.config import load_settings

    app = create_app(
        load_settings(environ={}, overrides={"data_dir": str(tmp_path), **settings}),
        backends=[(slow, [DEMO_MODEL])],
        clock=lambda: now[0],
    )
    with TestClient(app, base_url=BASE) as client:
        store = app.state.jobs.store
        job = client.post("/v1/images/generations", json=body(), headers=ASYNC).json()
        wait_for(client, job["id"])

        def orphan(job_id: str, attempts: int) -> None:
            """A run that a dead gateway left: running, its lease expired."""
            record = store.get(job["id"])
            row = {**{f: getattr(record, f) for f in JobRecord.__struct_fields__}}
            row.update(id=job_id, status="running", attempts=attempts, lease_owner="gw_dead", result=None)
            row.update(lease_expires_at=now[0] - 1, idempotency_key=None, completed_at=None)
            store.insert(JobRecord(**row), [], [])

        orphan("job_rerun", attempts=1)
        orphan("job_spent", attempts=2)
        rerun = wait_for(client, "job_rerun")
        assert rerun["status"] == "succeeded" and rerun["attempts"] == 2
        spent = wait_for(client, "job_spent")
        assert spent["status"] == "failed" and spent["error"]["code"] == "worker_lost"
        assert client.get("/metrics").text.count(
            'imagegate_jobs_finished_total{kind="image.generation",status="failed"}'
        )
        now[0] += 101  # past the retention: rows and files go
        deadline = time.monotonic() + 10
        while client.get(f"/v1/jobs/{job['id']}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not list((tmp_path / "job-files").glob(f"{job['id']}_*"))


def test_queued_jobs_expire_past_their_deadline(tmp_path):
    hang = FakeBackend(models=[DEMO_MODEL], fail="hang")
    with make_client(
        tmp_path, [(hang, [DEMO_MODEL])], job_queue_timeout=0.5, job_lease=0.6, job_poll_interval=0.05
    ) as client:
        first = client.post("/v1/images/generations", json=body(), headers=ASYNC).json()
        wait_for(client, first["id"], statuses=("running",))
        second = client.post("/v1/images/generations", json=body(), headers=ASYNC).json()
        expired = wait_for(client, second["id"])
        assert expired["status"] == "expired" and expired["error"]["code"] == "expired"


# -- webhooks ---------------------------------------------------------------------------------------------------


class Receiver:
    """A webhook endpoint on loopback that verifies every delivery with the Standard Webhooks library."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.secret: str | None = None
        self.answers = list(answers or [])
        self.received: list[dict] = []
        self.unverified = 0
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        status = self.answers.pop(0) if self.answers else 200
        try:
            payload = Webhook(self.secret).verify(raw, dict(request.headers)) if self.secret else json.loads(raw)
        except Exception:
            self.unverified += 1
            return web.Response(status=400)
        self.received.append({"id": request.headers["webhook-id"], "status": status, **payload})
        return web.Response(status=status)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    import threading

    rec = Receiver()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    rec.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def delivered(rec: Receiver, count: int, timeout: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok = [r for r in rec.received if r["status"] < 300]
        if len(ok) >= count:
            return ok
        time.sleep(0.02)
    raise AssertionError(f"{len(rec.received)} deliveries: {rec.received}")


def hook_client(tmp_path, backend, **overrides):
    return make_client(
        tmp_path,
        [(backend, [DEMO_MODEL])],
        webhook_allowlist=["127.0.0.1"],
        webhook_retry_schedule=[0.2, 0.2, 0.2],
        job_poll_interval=0.1,
        **overrides,
    )


def test_webhooks_are_signed_retried_and_stop_at_410(tmp_path, slow, receiver):
    counted = {o: sample("imagegate_webhook_deliveries_total", outcome=o) for o in ("retry", "gone")}
    with hook_client(tmp_path, slow) as client:
        receiver.secret = client.post("/v1/webhooks/secret").json()["secret"]
        assert receiver.secret.startswith("whsec_")
        receiver.answers = [500, 503]  # the first two attempts fail: the third delivers
        url = f"http://127.0.0.1:{receiver.port}/hook"
        job = client.post(
            "/v1/images/generations", json=body(webhook_url=url, webhook_events=["completed"]), headers=ASYNC
        ).json()
        ok = delivered(receiver, 1)
        assert receiver.unverified == 0
        assert [r["status"] for r in receiver.received] == [500, 503, 200]
        assert len({r["id"] for r in receiver.received}) == 1  # the same message id on every attempt
        assert ok[0]["type"] == "image.job.succeeded" and ok[0]["data"]["id"] == job["id"]
        assert ok[0]["data"]["status"] == "succeeded" and ok[0]["data"]["result"]["data"][0]["url"]

        receiver.answers = [410]
        client.post("/v1/images/generations", json=body(webhook_url=url), headers=ASYNC)
        deadline = time.monotonic() + 10
        while not any(r["status"] == 410 for r in receiver.received):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        while (
            r := client.post("/v1/images/generations", json=body(webhook_url=url), headers=ASYNC)
        ).status_code != 400:
            assert r.status_code == 202 and time.monotonic() < deadline  # until the 410 is on record
            time.sleep(0.05)
        assert "410" in r.json()["error"]["message"]
        time.sleep(0.5)
        assert sum(r["status"] == 410 for r in receiver.received) == 1  # nothing more after Gone
        assert 'imagegate_webhook_deliveries_total{outcome="retry"}' in client.get("/metrics").text
        # The counters are the process's: other tests' deliveries count too.
        assert {o: sample("imagegate_webhook_deliveries_total", outcome=o) - n for o, n in counted.items()} == {
            "retry": 2,
            "gone": 1,
        }


def test_webhook_events_filter_and_rotation(tmp_path, slow, receiver):
    with hook_client(tmp_path, slow) as client:
        old = client.post("/v1/webhooks/secret").json()
        new = client.post("/v1/webhooks/secret").json()
        assert new["previous_valid_until"] is not None and new["secret"] != old["secret"]
        receiver.secret = old["secret"]  # a receiver that has not switched yet still verifies
        url = f"http://127.0.0.1:{receiver.port}/hook"
        client.post("/v1/images/generations", json=body(webhook_url=url), headers=ASYNC)
        ok = delivered(receiver, 2)
        assert sorted(r["type"] for r in ok) == ["image.job.started", "image.job.succeeded"]
        receiver.secret = new["secret"]
        receiver.received.clear()
        client.post(
            "/v1/images/generations",
            json=body(webhook_url=url, webhook_events=["progress", "completed"], num_inference_steps=3),
            headers=ASYNC,
        )
        ok = delivered(receiver, 3)  # the first step, the last step (the ones between are throttled), the end
        types = sorted(r["type"] for r in ok)  # sent concurrently: receivers order them by the payload's timestamp
        assert types == ["image.job.progress", "image.job.progress", "image.job.succeeded"]
        steps = sorted(r["data"]["progress"]["step"] for r in ok if r["type"] == "image.job.progress")
        assert steps == [1, 3] and receiver.unverified == 0


def test_server_secret_signs_for_keys_without_one(tmp_path, slow, receiver):
    with hook_client(tmp_path, slow, admin_key=ADMIN) as client:
        admin = {"authorization": f"Bearer {ADMIN}"}
        key = client.post("/admin/keys", json={"alias": "k"}, headers=admin).json()["key"]
        assert client.post("/admin/webhooks/secret", headers={"authorization": f"Bearer {key}"}).status_code == 403
        server = client.post("/admin/webhooks/secret", headers=admin).json()
        assert server["owner"] == "server"
        receiver.secret = server["secret"]
        url = f"http://127.0.0.1:{receiver.port}/hook"
        client.post(
            "/v1/images/generations",
            json=body(webhook_url=url, webhook_events=["completed"]),
            headers={"authorization": f"Bearer {key}", **ASYNC},
        )
        delivered(receiver, 1)
        assert receiver.unverified == 0
