"""Signed, expiring image URLs and the files behind them."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from app.store.files import ROUTE, ImageFiles, load_or_create_secret

SECRET = b"k" * 32
TTL = 600
T0 = 1_700_000_000.0


class _Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture
def files(tmp_path, clock) -> ImageFiles:
    return ImageFiles(tmp_path / "images", SECRET, TTL, clock=clock)


def _split(url: str) -> tuple[str, str, str]:
    """URL -> (name, expires, signature)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert set(query) == {"expires", "signature"}
    return parts.path.rsplit("/", 1)[1], query["expires"][0], query["signature"][0]


def test_save_writes_the_bytes_under_a_fresh_name(files):
    a = files.save(b"one", "png")
    b = files.save(b"two", "webp")
    assert a != b
    assert a.startswith("img_") and a.endswith(".png")
    assert b.endswith(".webp")
    assert (files.directory / a).read_bytes() == b"one"
    assert (files.directory / b).read_bytes() == b"two"
    assert sorted(p.name for p in files.directory.iterdir()) == sorted([a, b])  # no temp files left behind


def test_url_shape(files):
    name = files.save(b"x", "png")
    url = files.url("https://img.example.com/", name)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == "https://img.example.com"
    assert parts.path == f"{ROUTE}/{name}"
    _, expires, signature = _split(url)
    assert int(expires) == int(T0) + TTL
    assert len(signature) == 64


def test_valid_signature_resolves(files, clock):
    name = files.save(b"payload", "png")
    _, expires, signature = _split(files.url("http://h", name))
    path = files.resolve(name, expires, signature)
    assert path == files.directory / name
    assert path.read_bytes() == b"payload"
    clock.now = T0 + TTL  # still valid at the last second
    assert files.resolve(name, expires, signature) == files.directory / name


def test_expired_url_fails(files, clock):
    name = files.save(b"payload", "png")
    _, expires, signature = _split(files.url("http://h", name))
    clock.now = T0 + TTL + 1
    assert files.resolve(name, expires, signature) is None


def test_tampered_signature_fails(files):
    name = files.save(b"payload", "png")
    _, expires, signature = _split(files.url("http://h", name))
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert files.resolve(name, expires, flipped) is None
    assert files.resolve(name, expires, signature.upper()) is None
    assert files.resolve(name, expires, "") is None
    assert files.resolve(name, expires, None) is None


def test_tampered_expires_fails(files):
    name = files.save(b"payload", "png")
    _, expires, signature = _split(files.url("http://h", name))
    assert files.resolve(name, str(int(expires) + 3600), signature) is None
    assert files.resolve(name, None, signature) is None
    assert files.resolve(name, "", signature) is None
    assert files.resolve(name, "-1", signature) is None
    assert files.resolve(name, "12.5", signature) is None


def test_signature_for_another_name_fails(files):
    a = files.save(b"a", "png")
    b = files.save(b"b", "png")
    _, expires, signature = _split(files.url("http://h", a))
    assert files.resolve(b, expires, signature) is None


def test_other_secret_fails(tmp_path, files, clock):
    name = files.save(b"a", "png")
    _, expires, signature = _split(files.url("http://h", name))
    other = ImageFiles(files.directory, b"z" * 32, TTL, clock=clock)
    assert other.resolve(name, expires, signature) is None


def test_deleted_file_fails(files):
    name = files.save(b"a", "png")
    _, expires, signature = _split(files.url("http://h", name))
    (files.directory / name).unlink()
    assert files.resolve(name, expires, signature) is None


@pytest.mark.parametrize("name", ["../secret", "../../etc/passwd", "sub/img.png", ".hidden", "..", ".", ""])
def test_path_traversal_and_hidden_names_fail_even_when_signed(tmp_path, files, name):
    # Plant a file where a traversal would land, sign the hostile name properly: it must still be refused.
    (tmp_path / "secret").write_bytes(b"do not serve")
    (files.directory / ".hidden").write_bytes(b"temp")
    expires = str(int(T0) + TTL)
    signature = files._signature(name, int(expires))
    assert files.resolve(name, expires, signature) is None


def test_sweep_deletes_old_files_only(files, clock):
    old = files.save(b"old", "png")
    fresh = files.save(b"fresh", "png")
    edge = files.save(b"edge", "png")
    os.utime(files.directory / old, (T0 - TTL - 61, T0 - TTL - 61))
    os.utime(files.directory / edge, (T0 - TTL - 59, T0 - TTL - 59))  # within the grace minute
    os.utime(files.directory / fresh, (T0 - 5, T0 - 5))

    assert files.sweep() == 1
    assert sorted(p.name for p in files.directory.iterdir()) == sorted([edge, fresh])

    clock.now = T0 + 2  # now the edge file is old enough too
    assert files.sweep() == 1
    assert [p.name for p in files.directory.iterdir()] == [fresh]
    assert files.sweep() == 0


def test_load_or_create_secret_persists_with_mode_0600(tmp_path):
    path = tmp_path / "secrets" / "url_secret"
    key = load_or_create_secret(path)
    assert len(key) == 32
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key.hex()
    assert load_or_create_secret(path) == key  # read back, not regenerated


def test_load_or_create_secret_keys_differ_per_data_dir(tmp_path):
    assert load_or_create_secret(tmp_path / "a") != load_or_create_secret(tmp_path / "b")


def test_load_or_create_secret_replaces_garbage(tmp_path):
    path = tmp_path / "url_secret"
    path.write_text("not hex at all")
    key = load_or_create_secret(path)
    assert len(key) == 32
    assert load_or_create_secret(path) == key


def test_load_or_create_secret_never_returns_an_empty_key(tmp_path):
    path = tmp_path / "url_secret"
    path.write_text("")
    assert len(load_or_create_secret(path)) == 32


def test_directory_is_created(tmp_path):
    target = tmp_path / "a" / "b"
    ImageFiles(target, SECRET, TTL)
    assert Path(target).is_dir()
