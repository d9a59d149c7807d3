"""The backend pool: which backends serve which model, their state, their load, and admission control."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from app import metrics
from app.backends.base import Backend
from app.config import ModelConfig
from app.errors import Overloaded, Unavailable
from app.pool.policies import LeastOutstandingWork, RoutingPolicy


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DOWN = "down"


@dataclass(eq=False)
class Member:
    """A backend in the pool, with the load the gateway has put on it."""

    backend: Backend
    models: frozenset[str]
    state: State = State.STARTING
    weight: float = 1.0
    capacity: int = 1
    """Requests the backend runs at once (a worker: 1; an upstream: its configured concurrency)."""
    outstanding: int = 0
    outstanding_work: float = 0.0
    detail: str = ""
    tasks: dict[str, frozenset[str]] = field(default_factory=dict)
    """Model -> tasks the backend reported it can run; a model missing here is assumed to support every task."""

    def learn_tasks(self, tasks: dict[str, list[str]]) -> None:
        """Record what the backend said it can run (its health report's ``tasks``)."""
        self.tasks = {model: frozenset(names) for model, names in tasks.items()}

    def can(self, model: str, task: str) -> bool:
        known = self.tasks.get(model)
        return known is None or task in known

    @property
    def name(self) -> str:
        return self.backend.name


@dataclass(eq=False)
class Lease:
    """One admitted request on one backend; :meth:`release` exactly once when it ends."""

    pool: Pool
    member: Member
    model: str
    work: float
    admitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    _released: bool = False

    def started(self) -> float:
        """Mark that the worker started the job; returns the seconds it waited."""
        if self.started_at is None:
            self.started_at = time.monotonic()
            self.pool._queued[self.model] -= 1
            metrics.QUEUE_DEPTH.labels(self.model).set(self.pool._queued[self.model])
        return self.started_at - self.admitted_at

    @property
    def released(self) -> bool:
        return self._released

    def release(self, *, succeeded: bool) -> None:
        if self._released:
            return
        self._released = True
        if self.started_at is None:
            self.pool._queued[self.model] -= 1
            metrics.QUEUE_DEPTH.labels(self.model).set(self.pool._queued[self.model])
        self.member.outstanding -= 1
        self.member.outstanding_work -= self.work
        self.pool._outstanding[self.model] -= 1
        if succeeded and self.started_at is not None:
            self.pool._observe_duration(self.model, time.monotonic() - self.started_at)


class Pool:
    """Backends by model, their state, and bounded admission.

    A model admits a request while its outstanding requests (running or waiting) number fewer than its ready
    backends plus ``max_queue``; past that the answer is 429 at once, with a Retry-After estimated from recent job
    durations. With no ready backend the answer is 503.
    """

    def __init__(self, models: Iterable[ModelConfig], policy: RoutingPolicy | None = None) -> None:
        self.models = {m.name: m for m in models}
        self.policy = policy or LeastOutstandingWork()
        self.members: list[Member] = []
        self._outstanding = dict.fromkeys(self.models, 0)
        self._queued = dict.fromkeys(self.models, 0)
        self._avg_seconds = dict.fromkeys(self.models, 0.0)
        for model in self.models:
            metrics.QUEUE_DEPTH.labels(model).set(0)
            metrics.WORKERS_UP.labels(model).set(0)

    def add(
        self, backend: Backend, models: Iterable[str], *, state: State = State.STARTING, capacity: int = 1
    ) -> Member:
        member = Member(backend=backend, models=frozenset(models), capacity=capacity)
        self.members.append(member)
        self.set_state(member, state)
        return member

    def set_state(self, member: Member, state: State, detail: str = "") -> None:
        member.state = state
        member.detail = detail
        metrics.BACKEND_UP.labels(member.name).set(1 if state is State.READY else 0)
        for model in member.models:
            metrics.WORKERS_UP.labels(model).set(len(self.ready(model)))

    def ready(self, model: str, task: str | None = None) -> list[Member]:
        return [
            m
            for m in self.members
            if m.state is State.READY and model in m.models and (task is None or m.can(model, task))
        ]

    def supports(self, model: str, task: str) -> bool | None:
        """Whether a ready backend can run ``task`` for ``model``; None when none is ready to ask."""
        ready = self.ready(model)
        return None if not ready else any(m.can(model, task) for m in ready)

    def acquire(self, model: str, work: float, task: str = "text2img") -> Lease:
        """Admit a request for ``model`` and pick a backend that can run ``task``.

        Raises:
            Unavailable: no backend for the model is ready.
            Overloaded: the model's queue is full.
        """
        ready = self.ready(model, task)
        if not ready:
            raise Unavailable(f"No worker is ready for model '{model}' yet; try again shortly.", retry_after=5)
        config = self.models[model]
        capacity = sum(m.capacity for m in ready)
        waiting = self._outstanding[model] - capacity
        if waiting >= config.max_queue:
            estimate = self._avg_seconds[model] * (waiting + 1) / capacity
            raise Overloaded(
                f"The queue for model '{model}' is full ({config.max_queue} waiting); retry later.",
                retry_after=max(1.0, math.ceil(estimate)),
            )
        member = self.policy.choose(ready, work)
        member.outstanding += 1
        member.outstanding_work += work
        self._outstanding[model] += 1
        self._queued[model] += 1
        metrics.QUEUE_DEPTH.labels(model).set(self._queued[model])
        return Lease(pool=self, member=member, model=model, work=work)

    def _observe_duration(self, model: str, seconds: float) -> None:
        avg = self._avg_seconds[model]
        self._avg_seconds[model] = seconds if avg == 0 else 0.8 * avg + 0.2 * seconds

    def is_ready(self) -> bool:
        """Every model has at least one ready backend."""
        return all(self.ready(model) for model in self.models)
