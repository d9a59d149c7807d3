"""The README stays true: its commands exist and its configuration reference covers every setting."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from app.config import ModelConfig, Settings
from app.worker.protocol import SCHEDULERS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented():
    for cls in (Settings, ModelConfig):
        missing = [f.name for f in msgspec.structs.fields(cls) if f"`{f.name}`" not in README]
        assert not missing, f"README does not document {cls.__name__} fields {missing}"


def test_every_scheduler_is_named():
    missing = [name for name in SCHEDULERS if not re.search(rf"\b{name}\b", README)]
    assert not missing


def test_the_two_commands_are_make_targets_and_ci_runs_the_test_one():
    makefile = (ROOT / "Makefile").read_text()
    assert "make serve" in README and "make test" in README
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
