"""Session-wide set-up shared by every test directory."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis caches what it learns in ``.hypothesis`` of the working directory: keep it in a temporary one."""
    if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
        path = tempfile.mkdtemp(prefix="hypothesis-")
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = path
        config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
