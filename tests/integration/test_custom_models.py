"""The custom-models API (seed 001) in process: models, training images, trainings and predictions, refused inputs,
and ownership. No worker trains here (the fake backend cannot), so trainings stay queued; the real flow is e2e."""

from __future__ import annotations

import base64
import hashlib
import io
import os

import pytest
from PIL import Image

from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL
from tests.integration.conftest import make_client

API = "/custom-models/v1"
ALICE = {"authorization": "Bearer sk-alice"}
BOB = {"authorization": "Bearer sk-bob"}


def key(secret: str, **fields) -> dict:
    return {"key_sha256": hashlib.sha256(secret.encode()).hexdigest(), **fields}


@pytest.fixture
def client(tmp_path):
    keys = [{"id": "alice", **key("sk-alice")}, {"id": "bob", **key("sk-bob")}]
    fake = FakeBackend(models=[DEMO_MODEL])
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], api_keys=keys, job_poll_interval=0.1) as tc:
        tc.data_dir = tmp_path  # type: ignore[attr-defined]
        yield tc


def image(fmt: str = "PNG", size: tuple[int, int] = (48, 32), exif: bytes | None = None) -> bytes:
    out = io.BytesIO()
    picture = Image.new("RGB", size, (200, 30, 30))
    picture.paste((20, 20, 200), (0, 0, size[0] // 2, size[1] // 4))
    picture.save(out, fmt, **({"exif": exif} if exif else {}))
    return out.getvalue()


def new_model(client, headers=ALICE, name: str = "Summer Collection Style Model") -> str:
    r = client.post(f"{API}/models", json={"displayName": name}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def upload(client, model_id: str, data: bytes, headers=ALICE, **params):
    return client.post(f"{API}/models/{model_id}/data", content=data, headers=headers, params=params)


def stored_files(client) -> list[str]:
    return sorted(p.name for p in (client.data_dir / "custom-models" / "images").iterdir())


def test_models_are_created_listed_by_cursor_renamed_and_soft_deleted(client):
    r = client.post(f"{API}/models", json={"displayName": "Summer", "customModelType": "style"}, headers=ALICE)
    assert r.status_code == 201
    first = r.json()
    assert first["displayName"] == "Summer" and first["customModelType"] == "style" and first["baseModel"] == DEMO_MODEL
    assert first["imageCount"] == 0 and first["latestTrainingId"] is None
    ids = [first["id"], new_model(client, name="Winter"), new_model(client, name="Spring")]
    page = client.get(f"{API}/models", params={"limit": 2}, headers=ALICE).json()
    assert [m["id"] for m in page["data"]] == ids[:0:-1] and page["nextCursor"] == ids[1]
    rest = client.get(f"{API}/models", params={"limit": 2, "cursor": page["nextCursor"]}, headers=ALICE).json()
    assert [m["id"] for m in rest["data"]] == [ids[0]] and rest["nextCursor"] is None
    r = client.patch(f"{API}/models/{ids[0]}", json={"updatedDisplayName": "Summer Dresses"}, headers=ALICE)
    assert r.status_code == 200 and r.json()["displayName"] == "Summer Dresses"
    assert client.get(f"{API}/models/{ids[0]}", headers=ALICE).json()["displayName"] == "Summer Dresses"
    assert client.delete(f"{API}/models/{ids[0]}", headers=ALICE).json() == {"id": ids[0], "deleted": True}
    assert client.get(f"{API}/models/{ids[0]}", headers=ALICE).status_code == 404
    assert [m["id"] for m in client.get(f"{API}/models", headers=ALICE).json()["data"]] == ids[:0:-1]
    assert client.patch(f"{API}/models/{ids[0]}", json={"updatedDisplayName": "x"}, headers=ALICE).status_code == 404
    for bad in ({}, {"displayName": ""}, {"displayName": "x", "unknown": 1}):
        r = client.post(f"{API}/models", json=bad, headers=ALICE)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", bad
    assert client.get(f"{API}/models").status_code == 401


def test_training_images_are_decoded_on_upload_and_bad_ones_store_nothing(client):
    model_id = new_model(client)
    truncated = image()[:60]
    refused = {
        "corrupt": (truncated, "corrupt or truncated"),
        "gif": (image("GIF"), "webp, png, jpeg or jpg, not GIF"),
        "not an image": (b"hello, this is text", "not an image"),
        "11 MB": (os.urandom(11 * 1024 * 1024), "at most 10 MB"),
        "empty": (b"", "empty"),
    }
    for what, (data, reason) in refused.items():
        r = upload(client, model_id, data)
        assert r.status_code == 400, (what, r.text)
        assert reason in r.json()["error"]["message"], (what, r.json())
    assert client.get(f"{API}/models/{model_id}/data", headers=ALICE).json() == []
    assert stored_files(client) == []

    # EXIF orientation 6 (rotate 90° clockwise to view): stored upright, 32x48
    exif = Image.Exif()
    exif[0x0112] = 6
    r = upload(client, model_id, image("JPEG", (48, 32), exif.tobytes()), caption="a red dress")
    assert r.status_code == 201, r.text
    rotated = r.json()["dataId"]
    webp = upload(client, model_id, image("WEBP")).json()["dataId"]
    listed = client.get(f"{API}/models/{model_id}/data", headers=ALICE).json()
    assert [(d["dataId"], d["format"], d["width"], d["height"]) for d in listed] == [
        (rotated, "jpeg", 32, 48),
        (webp, "webp", 48, 32),
    ]
    assert listed[0]["caption"] == "a red dress" and "dataUrl" not in listed[0]
    shown = client.get(f"{API}/models/{model_id}/data/{rotated}", headers=ALICE).json()
    prefix = "data:image/jpeg;base64,"
    assert shown["dataUrl"].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(shown["dataUrl"][len(prefix) :]))) as stored:
        assert stored.size == (32, 48) and stored.getexif().get(0x0112, 1) in (1, None)

    # replace keeps the id and the caption; the old file goes
    r = client.put(f"{API}/models/{model_id}/data/{rotated}", content=image("PNG", (16, 16)), headers=ALICE)
    assert r.status_code == 200 and r.json() == {"dataId": rotated}
    shown = client.get(f"{API}/models/{model_id}/data/{rotated}", headers=ALICE).json()
    assert (shown["format"], shown["width"], shown["caption"]) == ("png", 16, "a red dress")
    assert len(stored_files(client)) == 2
    r = client.put(f"{API}/models/{model_id}/data/{rotated}", content=b"junk", headers=ALICE)
    assert r.status_code == 400
    assert client.get(f"{API}/models/{model_id}/data/{rotated}", headers=ALICE).json()["format"] == "png"
    # hard delete
    assert client.delete(f"{API}/models/{model_id}/data/{webp}", headers=ALICE).status_code == 200
    assert client.get(f"{API}/models/{model_id}/data/{webp}", headers=ALICE).status_code == 404
    assert len(stored_files(client)) == 1
    assert client.get(f"{API}/models/{model_id}", headers=ALICE).json()["imageCount"] == 1


def test_a_training_needs_enough_images_and_shows_the_seed_fields(client):
    model_id = new_model(client)
    for _ in range(2):
        assert upload(client, model_id, image()).status_code == 201
    r = client.post(f"{API}/models/{model_id}/trainings", json={"trainingStrength": 7}, headers=ALICE)
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_enough_images", r.text
    assert client.get(f"{API}/models/{model_id}/trainings", headers=ALICE).json() == []
    for body in ({"trainingStrength": 11}, {"trainingSpeed": "slow"}, {"trainingStrength": "7"}):
        r = client.post(f"{API}/models/{model_id}/trainings", json=body, headers=ALICE)
        assert r.status_code == 400, body
    assert upload(client, model_id, image(), caption="on white").status_code == 201
    r = client.post(
        f"{API}/models/{model_id}/trainings",
        json={"trainingStrength": 7, "trainingSpeed": "high_quality"},
        headers=ALICE,
    )
    assert r.status_code == 201, r.text
    started = r.json()
    training_id = started["trainingId"]
    hp = started["hyperparameters"]
    assert (hp["rank"], hp["steps"], hp["learningRate"]) == (
        16,
        round(500 * 2 ** (2 / 5)),
        pytest.approx(1e-4 * 2**0.4),
    )
    assert client.get(f"{API}/models/{model_id}/trainings", headers=ALICE).json() == [
        {"id": training_id, "status": "processing"}
    ]
    shown = client.get(f"{API}/models/{model_id}/trainings/{training_id}", headers=ALICE).json()
    assert shown["triggerWord"] == started["triggerWord"] and shown["status"] == "processing"
    assert (shown["trainingStrength"], shown["trainingSpeed"], shown["imageCount"]) == (7, "high_quality", 3)
    inputs = client.data_dir / "job-inputs"
    assert len(list(inputs.glob(f"{training_id}_*"))) == 3  # the training's own copies of its images
    # a training not started yet is cancelled at once, and its copies go
    r = client.post(f"{API}/models/{model_id}/trainings/{training_id}/cancel", headers=ALICE)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert list(inputs.glob(f"{training_id}_*")) == []
    # soft delete: gone from the API, kept in the database
    assert client.delete(f"{API}/models/{model_id}/trainings/{training_id}", headers=ALICE).json()["deleted"]
    assert client.get(f"{API}/models/{model_id}/trainings/{training_id}", headers=ALICE).status_code == 404
    # trainings are no image jobs: /v1/jobs does not show them
    assert client.get("/v1/jobs", headers=ALICE).json()["data"] == []
    assert client.get(f"/v1/jobs/{training_id}", headers=ALICE).status_code == 404


def test_bad_predictions_are_refused_before_anything_is_stored(client):
    model_id = new_model(client)
    body = {"scaleConfigs": {"1": {"modelId": model_id, "scale": 0.8}}, "prompt": "a dress"}
    refused = [
        ({**body, "scaleConfigs": {"1": {"modelId": "cm_nope"}}}, "scaleConfigs.1.modelId", "model_not_found"),
        ({**body, "scaleConfigs": {"one": {"modelId": model_id}}}, "scaleConfigs", "invalid_key"),
        (body, "scaleConfigs.1.modelId", "training_not_ready"),
        (
            {**body, "scaleConfigs": {"1": {"modelId": model_id, "trainingId": "trn_nope"}}},
            "scaleConfigs.1.trainingId",
            "training_not_found",
        ),
    ]
    for request, param, code in refused:
        r = client.post(f"{API}/predictions", json=request, headers=ALICE)
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code), r.json()
    for change in (
        {"scaleConfigs": {"1": {"modelId": model_id, "scale": 3}}},
        {"scaleConfigs": {"1": {"modelId": model_id, "scale": -0.5}}},
        {"scaleConfigs": {}},
        {"image_size": {"width": 256, "height": 512}},
        {"image_size": {"width": 512, "height": 2048}},
        {"num_images": 5},
        {"guidance_scale": 10.5},
        {"num_inference_steps": 51},
        {"output_format": "webp"},
        {"prompt": ""},
    ):
        r = client.post(f"{API}/predictions", json={**body, **change}, headers=ALICE)
        assert r.status_code == 400, (change, r.text)
    assert client.get("/v1/jobs", headers=ALICE).json()["data"] == []
    assert client.get(f"{API}/predictions/pred_nope", headers=ALICE).status_code == 404


def test_a_key_sees_only_its_own_custom_models(client):
    model_id = new_model(client, ALICE)
    data_id = upload(client, model_id, image()).json()["dataId"]
    assert client.get(f"{API}/models/{model_id}", headers=BOB).status_code == 404
    assert client.get(f"{API}/models", headers=BOB).json()["data"] == []
    assert upload(client, model_id, image(), headers=BOB).status_code == 404
    assert client.get(f"{API}/models/{model_id}/data/{data_id}", headers=BOB).status_code == 404
    assert client.delete(f"{API}/models/{model_id}", headers=BOB).status_code == 404
    assert client.post(f"{API}/models/{model_id}/trainings", json={}, headers=BOB).status_code == 404
    r = client.post(
        f"{API}/predictions", json={"scaleConfigs": {"1": {"modelId": model_id}}, "prompt": "x"}, headers=BOB
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"
    assert client.get(f"{API}/models/{model_id}", headers=ALICE).status_code == 200
