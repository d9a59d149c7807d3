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


def _load(m: Member) -> tuple[float, int]:
    return (m.outstanding_work / m.weight, m.outstanding)


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
        best = min(_load(m) for m in candidates)
        tied = [m for m in candidates if _load(m) == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class PowerOfTwoLeastWork:
    """Power of two choices on outstanding work (the default).

    1. One candidate: take it.
    2. Otherwise draw two different candidates at random, each with probability proportional to its weight.
    3. Of the two, take the one with less ``outstanding_work / weight`` (work is ``width x height x steps x n``);
       then the one with fewer outstanding requests; then either, at random.

    Two random choices keep the load within a small factor of the best possible while never herding every request
    onto the one backend that looked idlest a moment ago (as a full scan does when several gateways share backends,
    or between a backend's failure and its cooldown); with two backends it is the exact least-work choice.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Member], work: float) -> Member:
        if len(candidates) == 1:
            return candidates[0]
        first = self._rng.choices(candidates, weights=[m.weight for m in candidates])[0]
        rest = [m for m in candidates if m is not first]
        second = self._rng.choices(rest, weights=[m.weight for m in rest])[0]
        a, b = _load(first), _load(second)
        if a == b:
            return self._rng.choice((first, second))
        return first if a < b else second


def adapter_affinity(candidates: Sequence[Member], adapters: frozenset[str], work: float) -> Member | None:
    """A backend that already holds a request's LoRA adapters, unless that would overload it; None: route as usual.

    1. Among the candidates whose backend holds every adapter of the request (it ran them lately, so they are loaded
       and need neither a transfer nor a load), take the one with the least ``outstanding_work / weight``.
    2. Use it if its load is at most the least-loaded candidate's plus this request's own work: waiting behind one
       more request costs less than loading the adapters elsewhere, waiting behind more does not.
    """
    warm = [m for m in candidates if adapters <= getattr(m.backend, "adapters", frozenset())]
    if not warm:
        return None
    best_warm = min(warm, key=_load)
    least = min(_load(m)[0] for m in candidates)
    return best_warm if _load(best_warm)[0] <= least + work / best_warm.weight else None


POLICIES: dict[str, type[LeastOutstandingWork | PowerOfTwoLeastWork]] = {
    "least_work_p2c": PowerOfTwoLeastWork,
    "least_work": LeastOutstandingWork,
}
