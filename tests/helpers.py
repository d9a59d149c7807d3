"""Helpers several test modules share."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import structlog
from prometheus_client import REGISTRY

from app.pool import Member


def sample(name: str, **labels: str) -> float:
    """A Prometheus sample of this process (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class InOrder:
    """A routing policy that takes the first candidate: backends are tried in the order they were added."""

    def choose(self, candidates: Sequence[Member], work: float) -> Member:
        return candidates[0]


@contextlib.contextmanager
def restored_logging() -> Iterator[None]:
    """Give the root logger back its handlers and level, and structlog its defaults, after ``logs.setup``."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        structlog.reset_defaults()
