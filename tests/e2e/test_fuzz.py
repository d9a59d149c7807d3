"""Property-based fuzzing of a real `imagegate serve` on the demo model, authenticated as an admin.

Every operation of ``openapi.yaml`` is fuzzed by schemathesis (its examples, coverage, fuzzing and stateful phases,
with a fixed seed): no server errors, and status codes, content types, headers and bodies as the contract documents
them. Multipart forms are fuzzed further than the schema can describe: parts without filenames, duplicated and
unknown fields, wrong or unknown charsets, empty parts, huge values, truncated bodies. Every such request gets a
4xx in OpenAI's error shape (or a 200 when it happens to be a valid edit), and no temporary file outlives it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.uploads import MAX_FIELD_BYTES
from app.contract import bundle, bundled_yaml

from .conftest import Server
from .test_edits import hole_mask, png

pytestmark = pytest.mark.e2e

ADMIN_KEY = "sk-admin-fuzz-4Qm9XvT2pL7wK3sD"
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
SEED = 20261129
EXAMPLES = 50  # per operation; 25 already found every defect fixed so far
MAX_IMAGE_BYTES = 2_000_000  # over the 1 MiB spool threshold, so refused images have been on disk
# A tiny demo model: every generation the fuzzer asks for takes milliseconds.
CONFIG = f"""
max_image_bytes = {MAX_IMAGE_BYTES}
max_upload_size = 8000000

[[models]]
name = "imagegate-demo"
path = "{{models}}/imagegate-demo"
demo = true
default_size = "64x64"
max_side = 128
default_steps = 2
max_steps = 3
max_n = 2
"""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> Iterator[tuple[Server, Path]]:
    """The server, and the directory its temporary files go to."""
    data = tmp_path_factory.mktemp("fuzz")
    tmp = data / "tmp"
    tmp.mkdir()
    (data / "config.toml").write_text(CONFIG.format(models=data / "models"))
    srv = Server(
        data, "--config", str(data / "config.toml"), env={"IMAGEGATE_ADMIN_KEY": ADMIN_KEY, "TMPDIR": str(tmp)}
    )
    try:
        srv.wait_ready()
        yield srv, tmp
    finally:
        srv.stop()


def open_temp_files(pid: int, tmp: Path) -> list[str]:
    """The gateway's descriptors of files in its temporary directory (unnamed spools show as ``#N (deleted)``)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(tmp)):
            found.append(target)
    return found


def assert_no_temp_files(server: Server, tmp: Path) -> None:
    deadline = time.monotonic() + 5  # a finished response closes its files as it ends
    while open_temp_files(server.proc.pid, tmp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_temp_files(server.proc.pid, tmp) == []
    assert [p for p in tmp.iterdir() if p.is_file()] == []  # (the workers' socket and cache folders live there)


def test_every_operation_of_the_contract(fuzzed, tmp_path):
    server, tmp = fuzzed
    report, contract = tmp_path / "schemathesis.json", tmp_path / "openapi.yaml"
    contract.write_bytes(bundled_yaml())
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            str(contract),  # from a file: loaded from its URL, schemathesis would leave GET /openapi.yaml out
            "--url",
            server.url,
            "--header",
            f"Authorization: Bearer {ADMIN_KEY}",
            "--max-examples",
            str(EXAMPLES),
            "--seed",
            str(SEED),
            "--checks",
            f"{checks},response_schema_conformance",
            "--generation-database",
            "none",
            "--report",
            "json",
            "--report-json-path",
            str(report),
            "--no-color",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    result = json.loads(report.read_text())
    operations = sum(
        method in ("get", "post", "put", "patch", "delete") for ops in bundle()["paths"].values() for method in ops
    )
    assert result["operations"] == {**result["operations"], "total": operations, "tested": operations}, output
    assert result["failures"] == [] and result["errors"] == [], output
    assert result["test_cases"]["generated"] > 1000
    assert all(phase["status"] == "success" for phase in result["phases"].values()), result["phases"]
    assert_no_temp_files(server, tmp)


# -- multipart forms beyond the schema ----------------------------------------------------------------------------

IMAGE = png((64, 64))
MASK = hole_mask((64, 64))
FIELDS = [
    "image", "image[]", "mask", "mask[]", "prompt", "n", "size", "model", "stream", "partial_images", "strength",
    "seed", "guidance_scale", "fallbacks", "fallbacks[]", "type", "response_format", "output_format", "notes", "",
]  # fmt: skip
VALUES = st.one_of(
    st.sampled_from([IMAGE, MASK, IMAGE[: len(IMAGE) // 2], b"", b"x" * (MAX_FIELD_BYTES + 1)]),
    st.sampled_from([b"2", b"0", b"64x64", b"true", b"imagegate-demo", b"inpainting", b"1e999", b"nan", b"-1"]),
    st.binary(max_size=64),
    st.text(max_size=24).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
FILENAMES = st.sampled_from([None, "", "in.png", 'a"b.png', "ïmage.png"])
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "image/png",
        "application/octet-stream",
        "text/plain; charset=utf-8",
        "text/plain; charset=latin-1",
        "text/plain; charset=utf-16",
        "text/plain; charset=x-no-such-charset",
        "text/plain; charset=hex",
    ]
)
PART = st.tuples(st.sampled_from(FIELDS), VALUES, FILENAMES, CONTENT_TYPES)
BOUNDARY = "fuzz-boundary-7d1c"


def multipart(parts: list[tuple[str, bytes, str | None, str | None]]) -> bytes:
    out = b""
    for name, value, filename, content_type in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        head = f"Content-Disposition: {disposition}\r\n" + (f"Content-Type: {content_type}\r\n" if content_type else "")
        out += f"--{BOUNDARY}\r\n{head}\r\n".encode() + value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


@pytest.fixture(scope="module")
def http(fuzzed) -> Iterator[httpx.Client]:
    server, _ = fuzzed
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    path=st.sampled_from(["/v1/images/edits", "/v1/images/variations"]),
    parts=st.lists(PART, max_size=8),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=400)),
    big_image=st.booleans(),
)
def test_multipart_forms_beyond_the_schema(http, path, parts, cut, big_image):
    if big_image:  # over max_image_bytes: refused while it streams, after it has spilled to disk
        parts = [("image", os.urandom(MAX_IMAGE_BYTES + 1), "big.png", "image/png"), *parts]
    body = multipart(parts)
    if cut is not None:
        body = body[:cut]
    r = http.post(path, content=body, headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        assert r.json()["data"]
        return
    assert 400 <= r.status_code < 500
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error


def test_no_temporary_file_outlives_the_fuzzing(fuzzed):
    assert_no_temp_files(*fuzzed)
