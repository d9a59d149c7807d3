"""Helpers several test modules share."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import REGISTRY

from app.pool import Member


def sample(name: str, **labels: str) -> float:
    """A Prometheus sample of this process (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class InOrder:
    """A routing policy that takes the first candidate: backends are tried in the order they were added."""

    def choose(self, candidates: Sequence[Member], work: float) -> Member:
        return candidates[0]
