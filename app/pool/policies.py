"""Routing policies: small classes whose docstring is the algorithm."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from app.pool.pool import Member


class RoutingPolicy(Protocol):
    def choose(self, candidates: Sequence[Member], work: float) -> Member:
        """Pick one of ``candidates`` (never empty, all ready) for a request of ``work`` units."""
        ...


class LeastOutstandingWork:
    """Send the request to the ready backend with the least outstanding work.

    The work of a request is ``width x height x steps x n``: denoising time grows with pixels and steps, and an
    image costs about 100x more at 1024² and 50 steps than at 256² and 20, so counting requests alone misroutes.

    1. For each candidate compute ``outstanding_work / weight`` (work admitted to it and not yet finished).
    2. Take the candidates with the smallest value; among them prefer fewer outstanding requests.
    3. Break remaining ties at random, so idle backends share the load evenly.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Member], work: float) -> Member:
        def key(m: Member) -> tuple[float, int]:
            return (m.outstanding_work / m.weight, m.outstanding)

        best = min(key(m) for m in candidates)
        tied = [m for m in candidates if key(m) == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)
