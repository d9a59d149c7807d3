"""The backend pool: which backends serve which model, their health, their load, and admission control."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from app import metrics
from app.backends.base import Backend
from app.config import ModelConfig
from app.errors import BackendFailed, Overloaded, Unavailable
from app.pool.policies import PowerOfTwoLeastWork, RoutingPolicy, adapter_affinity
from app.worker.protocol import HealthInfo, ModelDetails

log = logging.getLogger("imagegate.pool")


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    COOLING_DOWN = "cooling_down"
    DOWN = "down"


@dataclass(frozen=True)
class Breaker:
    """The circuit breaker: ``failures`` within ``window`` seconds take a backend out for ``cooldown`` seconds."""

    failures: int = 3
    window: float = 60.0
    cooldown: float = 10.0


@dataclass(eq=False)
class Member:
    """A backend in the pool, with its health and the load the gateway has put on it."""

    backend: Backend
    models: frozenset[str]
    state: State = State.STARTING
    weight: float = 1.0
    capacity: int = 1
    """Requests the backend runs at once (a worker: 1; an upstream: its configured concurrency)."""
    device: str = ""
    """Where it runs: a local worker's device, a remote worker's address ("" for upstreams)."""
    probed: bool = False
    """Health-probed all the time (remote workers, upstreams); local workers are watched by their supervisor."""
    outstanding: int = 0
    outstanding_work: float = 0.0
    queued: int = 0
    """Requests sent to it that it has not started yet."""
    detail: str = ""
    tasks: dict[str, frozenset[str]] = field(default_factory=dict)
    """Model -> tasks the backend reported it can run; a model missing here is assumed to support every task."""
    details: dict[str, ModelDetails] = field(default_factory=dict)
    """Model -> the family, schedulers and defaults the backend reported (workers do; upstreams do not)."""
    failures: deque[float] = field(default_factory=deque)
    """When its recent failures happened (the pool's clock)."""
    cooling_until: float = 0.0

    def learn(self, info: HealthInfo) -> None:
        """Record what the backend said about its models when it became ready (its health report)."""
        self.tasks = {model: frozenset(names) for model, names in info.tasks.items()}
        self.details = dict(info.details)

    def can(self, model: str, task: str) -> bool:
        known = self.tasks.get(model)
        return known is None or task in known

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def training(self) -> bool:
        """A LoRA training runs on it now: inference on it waits between training slices."""
        return bool(getattr(self.backend, "training", 0))

    def _gauges(self) -> None:
        metrics.child(metrics.BACKEND_IN_FLIGHT, self.name).set(self.outstanding)
        metrics.child(metrics.BACKEND_QUEUE_DEPTH, self.name).set(self.queued)


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
        """Mark that the backend started the job; returns the seconds it waited."""
        if self.started_at is None:
            self.started_at = time.monotonic()
            self.pool._dequeue(self)
        return self.started_at - self.admitted_at

    @property
    def released(self) -> bool:
        return self._released

    def release(self, *, succeeded: bool) -> None:
        if self._released:
            return
        self._released = True
        if self.started_at is None:
            self.pool._dequeue(self)
        member = self.member
        member.outstanding -= 1
        member.outstanding_work -= self.work
        member._gauges()
        self.pool._outstanding[self.model] -= 1
        if not any(self.pool._outstanding.values()):
            self.pool._idle.set()
        if succeeded and self.started_at is not None:
            self.pool._observe_duration(self.model, time.monotonic() - self.started_at)


class Pool:
    """Backends by model, their state, and bounded admission.

    A model admits a request while its outstanding requests (running or waiting) number fewer than the capacity of
    its ready backends plus ``max_queue``; past that the answer is 429 at once, with a Retry-After estimated from
    recent job durations. With no ready backend the answer is 503, and so it is for every request once the pool
    drains for shutdown.

    Health: a backend that fails ``breaker.failures`` times within ``breaker.window`` seconds (passive health: the
    requests it failed) cools down for ``breaker.cooldown`` seconds; after that a health probe (never a generation)
    brings it back, or it cools down again.
    """

    def __init__(
        self,
        models: Iterable[ModelConfig],
        policy: RoutingPolicy | None = None,
        *,
        weights: Mapping[str, float] | None = None,
        breaker: Breaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = {m.name: m for m in models}
        self.policy = policy or PowerOfTwoLeastWork()
        self.weights = dict(weights or {})
        self.breaker = breaker or Breaker()
        self.clock = clock
        self.members: list[Member] = []
        self.draining = False
        self._outstanding = dict.fromkeys(self.models, 0)
        self._queued = dict.fromkeys(self.models, 0)
        self._avg_seconds = dict.fromkeys(self.models, 0.0)
        self._idle = asyncio.Event()
        self._idle.set()
        for model in self.models:
            metrics.QUEUE_DEPTH.labels(model).set(0)
            metrics.WORKERS_UP.labels(model).set(0)

    def add(
        self,
        backend: Backend,
        models: Iterable[str],
        *,
        state: State = State.STARTING,
        capacity: int = 1,
        probed: bool = False,
        device: str = "",
    ) -> Member:
        member = Member(
            backend=backend,
            models=frozenset(models),
            weight=self.weights.get(backend.name, 1.0),
            capacity=capacity,
            probed=probed,
            device=device,
        )
        self.members.append(member)
        self.set_state(member, state)
        member._gauges()
        for counter in (metrics.BACKEND_REQUESTS, metrics.BACKEND_FAILURES, metrics.BACKEND_COOLDOWNS):
            counter.labels(member.name)
        return member

    # -- health -------------------------------------------------------------------------------------------------

    def set_state(self, member: Member, state: State, detail: str = "") -> None:
        """Set what the backend's owner knows (a local worker started or exited); a fresh start forgets failures."""
        if state is not State.COOLING_DOWN:
            member.failures.clear()
            member.cooling_until = 0.0
        member.state = state
        member.detail = detail
        metrics.BACKEND_UP.labels(member.name).set(1 if state is State.READY else 0)
        for s in State:
            metrics.BACKEND_STATE.labels(member.name, s.value).set(1 if s is state else 0)
        for model in member.models:
            metrics.WORKERS_UP.labels(model).set(len(self.ready(model)))

    def report_health(self, member: Member, state: State, detail: str = "") -> None:
        """Apply a health probe's finding; a cooling-down backend stays out until its cooldown is over."""
        if member.state is State.COOLING_DOWN:
            if self.clock() < member.cooling_until:
                return
            if state is State.READY:
                log.info("backend %s is back from its cooldown", member.name)
        if (state, detail) != (member.state, member.detail):
            self.set_state(member, state, detail)

    def recent_failures(self, member: Member) -> int:
        """The backend's failures within the breaker's window."""
        horizon = self.clock() - self.breaker.window
        while member.failures and member.failures[0] <= horizon:
            member.failures.popleft()
        return len(member.failures)

    def failed(self, member: Member, reason: str) -> None:
        """Count a failure of the backend's own (passive health); too many in the window start a cooldown."""
        metrics.BACKEND_FAILURES.labels(member.name).inc()
        member.failures.append(self.clock())
        if member.state is State.READY and self.recent_failures(member) >= self.breaker.failures:
            member.cooling_until = self.clock() + self.breaker.cooldown
            log.warning(
                "backend %s failed %d times in %.0fs (last: %s); cooling down for %.0fs",
                member.name,
                len(member.failures),
                self.breaker.window,
                reason,
                self.breaker.cooldown,
            )
            metrics.BACKEND_COOLDOWNS.labels(member.name).inc()
            self.set_state(member, State.COOLING_DOWN, f"{len(member.failures)} failures; last: {reason}")

    async def probe(self, member: Member) -> tuple[State, str]:
        """Ask the backend's health (never a generation): ready, starting, or down with why."""
        try:
            info = await member.backend.health()
        except BackendFailed as e:
            return State.DOWN, e.message
        missing = sorted(member.models - set(info.models))
        if missing:
            return State.DOWN, f"does not serve {', '.join(missing)}"
        if info.status != "ready":
            return (State.STARTING if info.status == "loading" else State.DOWN), info.error or info.status
        member.learn(info)
        return State.READY, ""

    async def probe_back(self) -> None:
        """Probe every backend whose cooldown is over and that nothing else probes; bring back the healthy ones."""
        now = self.clock()
        for member in self.members:
            if member.state is State.COOLING_DOWN and not member.probed and now >= member.cooling_until:
                state, _ = await self.probe(member)
                if state is State.READY:
                    self.report_health(member, state)
                else:
                    member.cooling_until = self.clock() + self.breaker.cooldown

    async def probe_back_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.probe_back()
            except Exception:
                log.exception("probing cooled-down backends failed")

    # -- admission ----------------------------------------------------------------------------------------------

    def ready(self, model: str, task: str | None = None) -> list[Member]:
        return [
            m
            for m in self.members
            if m.state is State.READY and model in m.models and (task is None or m.can(model, task))
        ]

    def details(self, model: str) -> ModelDetails | None:
        """What a backend of ``model`` reported about it (all load the same checkpoint); None before one has."""
        return next((m.details[model] for m in self.members if model in m.details), None)

    def tasks(self, model: str) -> frozenset[str] | None:
        """The tasks a backend of ``model`` reported it can run; None before one has."""
        return next((m.tasks[model] for m in self.members if model in m.tasks), None)

    def supports(self, model: str, task: str) -> bool | None:
        """Whether a ready backend can run ``task`` for ``model``; None when none is ready to ask."""
        ready = self.ready(model)
        return None if not ready else any(m.can(model, task) for m in ready)

    def acquire(
        self,
        model: str,
        work: float,
        task: str = "text2img",
        *,
        exclude: Iterable[Member] = (),
        queue_bound: bool = True,
        adapters: frozenset[str] = frozenset(),
    ) -> Lease:
        """Admit a request for ``model`` and pick a backend that can run ``task`` (none of ``exclude``).

        ``queue_bound=False`` admits past ``max_queue``: for a request already admitted, moving to another backend.
        ``adapters`` (the digests of a request's LoRA adapters) prefer a backend that holds them
        (:func:`~app.pool.policies.adapter_affinity`).

        Raises:
            Unavailable: no backend for the model is ready (or the pool is draining).
            Overloaded: the model's queue is full.
        """
        if self.draining:
            raise Unavailable("The server is shutting down; retry on another instance.", retry_after=1)
        ready = self.ready(model, task)
        if not ready:
            failures = [m.detail for m in self.members if model in m.models and m.detail.startswith("cannot load")]
            if failures:
                raise Unavailable(f"Model '{model}' cannot be served now: {failures[0]}", retry_after=60)
            raise Unavailable(f"No worker is ready for model '{model}' yet; try again shortly.", retry_after=5)
        excluded = set(exclude)
        candidates = [m for m in ready if m not in excluded]
        if not candidates:
            raise Unavailable(f"No other backend is ready for model '{model}'.", retry_after=5)
        candidates = [m for m in candidates if not m.training] or candidates  # a training device only if no other
        config = self.models[model]
        capacity = sum(m.capacity for m in ready)
        waiting = self._outstanding[model] - capacity
        if queue_bound and waiting >= config.max_queue:
            estimate = self._avg_seconds[model] * (waiting + 1) / capacity
            raise Overloaded(
                f"The queue for model '{model}' is full ({config.max_queue} waiting); retry later.",
                retry_after=max(1.0, math.ceil(estimate)),
            )
        member = (adapters and adapter_affinity(candidates, adapters, work)) or self.policy.choose(candidates, work)
        metrics.child(metrics.BACKEND_REQUESTS, member.name).inc()
        member.outstanding += 1
        member.outstanding_work += work
        member.queued += 1
        member._gauges()
        self._outstanding[model] += 1
        self._idle.clear()
        self._queued[model] += 1
        metrics.child(metrics.QUEUE_DEPTH, model).set(self._queued[model])
        return Lease(pool=self, member=member, model=model, work=work)

    def queue_depth(self, model: str) -> int:
        """Requests for ``model`` admitted and not started yet."""
        return self._queued.get(model, 0)

    def estimate(self, model: str) -> float:
        """Seconds until one more request for ``model`` would be done, from recent durations and the queue."""
        capacity = sum(m.capacity for m in self.ready(model)) or 1
        waiting = max(0, self._outstanding[model] - capacity)
        return self._avg_seconds[model] * (waiting / capacity + 1)

    def _dequeue(self, lease: Lease) -> None:
        self._queued[lease.model] -= 1
        metrics.child(metrics.QUEUE_DEPTH, lease.model).set(self._queued[lease.model])
        lease.member.queued -= 1
        lease.member._gauges()

    def _observe_duration(self, model: str, seconds: float) -> None:
        avg = self._avg_seconds[model]
        self._avg_seconds[model] = seconds if avg == 0 else 0.8 * avg + 0.2 * seconds

    def trainers(self, model: str, devices: Iterable[str] = ()) -> list[Member]:
        """Ready workers that can train LoRA adapters for ``model`` (on ``devices``, if named), idle ones first."""
        wanted = set(devices)
        found = [
            m
            for m in self.ready(model)
            if hasattr(m.backend, "train")
            and (details := m.details.get(model)) is not None
            and details.trainable
            and (not wanted or m.device in wanted)
        ]
        return sorted(found, key=lambda m: (m.training, m.outstanding))

    def is_ready(self) -> bool:
        """Every model has at least one ready backend, and the pool is not draining."""
        return not self.draining and all(self.ready(model) for model in self.models)

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests from now on and wait up to ``timeout`` seconds for those in flight; True if none is."""
        self.draining = True
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
