"""``loras`` on image requests, in process with a fake backend: resolved to adapter digests, or refused with a 400."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import msgspec
import pytest

from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL, demo_model
from app.worker.protocol import LoraRef
from tests.integration.conftest import make_client
from tests.integration.test_edits import data_url, png
from tests.integration.test_jobs import wait_for


def safetensors(path: Path, names: list[str]) -> str:
    """A small safetensors file with these tensor names (its bytes differ by file name); returns its SHA-256."""
    header: dict = {}
    offset = 0
    for name in names:
        header[name] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [offset, offset + 16]}
        offset += 16
    raw = json.dumps(header).encode()
    fill = hashlib.sha256(path.name.encode()).digest()[:1]
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + fill * offset)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def adapters(tmp_path) -> dict[str, str]:
    folder = tmp_path / "loras"
    folder.mkdir()
    lora = [
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight",
    ]
    digests = {name: safetensors(folder / f"{name}.safetensors", lora) for name in ("style", "product", "extra")}
    safetensors(folder / "not-a-lora.safetensors", ["unet.conv_in.weight"])  # skipped, with a warning
    (folder / "readme.txt").write_text("not an adapter")
    return digests


@pytest.fixture
def client(tmp_path, adapters):
    fake = FakeBackend(models=[DEMO_MODEL])
    model = demo_model(str(tmp_path))
    model.adapters_dir = str(tmp_path / "loras")
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], models=[msgspec.to_builtins(model)], max_loras=2) as tc:
        tc.fake = fake  # type: ignore[attr-defined]
        yield tc


BODY = {"prompt": "a red fox", "size": "64x64"}


def test_loras_reach_the_backend_as_digests_with_their_scales(client, adapters):
    r = client.post(
        "/v1/images/generations", json={**BODY, "loras": [{"id": "style", "scale": 0.7}, {"id": "product"}]}
    )
    assert r.status_code == 200, r.text
    assert client.fake.last_params.loras == (LoraRef(adapters["style"], 0.7), LoraRef(adapters["product"], 1.0))
    client.post("/v1/images/generations", json=BODY)
    assert client.fake.last_params.loras == ()
    r = client.post(
        "/v1/images/edits",
        json={"prompt": "a hat", "images": [{"image_url": data_url(png())}], "loras": [{"id": "extra", "scale": -0.5}]},
    )
    assert r.status_code == 200, r.text
    assert client.fake.last_params.loras == (LoraRef(adapters["extra"], -0.5),)


def test_a_job_keeps_its_loras(client, adapters):
    r = client.post(
        "/v1/images/generations",
        json={**BODY, "loras": [{"id": "style", "scale": 0.3}]},
        headers={"prefer": "respond-async"},
    )
    assert wait_for(client, r.json()["id"])["status"] == "succeeded"
    assert client.fake.last_params.loras == (LoraRef(adapters["style"], 0.3),)


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ([{"id": "nope"}], "does not exist"),
        ([{"id": "not-a-lora"}], "does not exist"),
        ([{"id": "style"}, {"id": "style", "scale": 0.5}], "named twice"),
        ([{"id": "style"}, {"id": "product"}, {"id": "extra"}], "At most 2"),
        ([{"id": "style", "scale": 2.5}], "<= 2.0"),
        ([{"id": ""}], "length >= 1"),
    ],
)
def test_bad_loras_are_a_400_before_anything_runs(client, loras, message):
    started = client.fake.started
    r = client.post("/v1/images/generations", json={**BODY, "loras": loras})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] in ("loras", "loras[0].scale", "loras[0].id")
    assert client.fake.started == started


ADMIN = {"authorization": "Bearer admin-key"}
LORA_NAMES = ["unet.mid_block.attentions.0.proj_in.lora_A.weight", "unet.mid_block.attentions.0.proj_in.lora_B.weight"]


@pytest.fixture
def admin_client(tmp_path):
    fake = FakeBackend(models=[DEMO_MODEL])
    with make_client(tmp_path, [(fake, [DEMO_MODEL])], admin_key="admin-key") as tc:
        tc.fake = fake  # type: ignore[attr-defined]
        yield tc


def test_uploaded_adapters_are_checked_kept_by_digest_owned_and_deleted(admin_client, tmp_path):
    client = admin_client
    key = client.post("/admin/keys", json={"alias": "brand"}, headers=ADMIN).json()
    other = client.post("/admin/keys", json={"alias": "other"}, headers=ADMIN).json()
    as_key, as_other = ({"authorization": f"Bearer {k['key']}"} for k in (key, other))
    digest = safetensors(tmp_path / "brand.safetensors", LORA_NAMES)
    data = (tmp_path / "brand.safetensors").read_bytes()
    upload = {"model": DEMO_MODEL, "name": "brand", "trigger_word": "FJA90AB", "owner": key["id"]}
    r = client.post("/admin/adapters", params=upload, content=data, headers=ADMIN)
    assert r.status_code == 201, r.text
    adapter = r.json()
    assert adapter["digest"] == digest and adapter["size"] == len(data) and adapter["owner"] == key["id"]
    assert (tmp_path / "adapters" / f"{digest}.safetensors").read_bytes() == data
    again = client.post("/admin/adapters", params={"model": DEMO_MODEL}, content=data, headers=ADMIN).json()
    assert again["id"] != adapter["id"] and again["owner"] is None  # a second record of the same file

    body = {**BODY, "loras": [{"id": adapter["id"], "scale": 0.5}]}
    assert client.post("/v1/images/generations", json=body, headers=as_key).status_code == 200
    assert client.fake.last_params.loras == (LoraRef(digest, 0.5),)
    denied = client.post("/v1/images/generations", json=body, headers=as_other)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "adapter_not_allowed"
    listed = client.get("/v1/adapters", headers=as_other).json()["data"]
    assert [a["id"] for a in listed] == [again["id"]]  # not the other key's
    assert len(client.get("/admin/adapters", params={"model": DEMO_MODEL}, headers=ADMIN).json()["data"]) == 2
    assert client.get(f"/admin/adapters/{adapter['id']}", headers=ADMIN).json() == adapter
    assert client.post("/admin/adapters", params=upload, content=data, headers=as_key).status_code == 403

    assert client.delete(f"/admin/adapters/{adapter['id']}", headers=ADMIN).status_code == 204
    assert (tmp_path / "adapters" / f"{digest}.safetensors").exists()  # the other record still uses the file
    assert client.delete(f"/admin/adapters/{again['id']}", headers=ADMIN).status_code == 204
    assert not (tmp_path / "adapters" / f"{digest}.safetensors").exists()
    gone = client.post("/v1/images/generations", json=body, headers=as_key)
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "adapter_not_found"
    assert client.delete(f"/admin/adapters/{adapter['id']}", headers=ADMIN).status_code == 404


def test_bad_uploads_store_nothing(admin_client, tmp_path):
    client = admin_client
    safetensors(tmp_path / "plain.safetensors", ["unet.conv_in.weight"])
    cases = [
        ({"model": DEMO_MODEL}, b"not safetensors at all", 400),
        ({"model": DEMO_MODEL}, (tmp_path / "plain.safetensors").read_bytes(), 400),
        ({"model": "nope"}, b"x" * 100, 404),
    ]
    for params, data, status in cases:
        r = client.post("/admin/adapters", params=params, content=data, headers=ADMIN)
        assert r.status_code == status, r.text
    assert client.get("/admin/adapters", headers=ADMIN).json()["data"] == []
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == []


def test_multipart_edits_take_loras_as_a_json_part(client, adapters):
    files = {"image": ("in.png", png(), "image/png")}
    form = {"prompt": "a hat", "loras": json.dumps([{"id": "product", "scale": 0.25}])}
    r = client.post("/v1/images/edits", files=files, data=form)
    assert r.status_code == 200, r.text
    assert client.fake.last_params.loras == (LoraRef(adapters["product"], 0.25),)
    bad = client.post("/v1/images/edits", files=files, data={**form, "loras": "product:0.25"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "loras"
