"""Fixtures of the unit tests that run the worker's engine on the demo model (real diffusers, CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.config import DEMO_MODEL
from app.worker.pipelines import create_demo_model, quiet_libraries


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Iterator[Path]:
    """A data dir holding the demo model; torch runs on one thread while the module's tests do.

    One thread: on a busy machine, OpenMP threads spinning against other processes make each call 10x slower.
    """
    quiet_libraries()
    path = tmp_path_factory.mktemp("demo")
    create_demo_model(path / "models" / DEMO_MODEL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)
