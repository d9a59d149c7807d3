"""The pool and its routing policy: who gets a request, admission control, lease accounting and gauges.

Prometheus metrics are process-global, so every test uses its own model and backend names.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter

import pytest
from prometheus_client import REGISTRY

from app.backends.fake import FakeBackend
from app.config import ConfigError, ModelConfig, load_settings
from app.errors import Overloaded, Unavailable
from app.pool import POLICIES, Breaker, LeastOutstandingWork, Member, Pool, PowerOfTwoLeastWork, State
from tests.helpers import sample

_ids = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def _model(name: str, max_queue: int = 64) -> ModelConfig:
    return ModelConfig(name=name, path=f"/models/{name}", max_queue=max_queue)


def _member(outstanding_work: float = 0.0, outstanding: int = 0, weight: float = 1.0) -> Member:
    return Member(
        backend=FakeBackend(name=_name("b")),
        models=frozenset({"m"}),
        state=State.READY,
        weight=weight,
        outstanding=outstanding,
        outstanding_work=outstanding_work,
    )


def _queue_depth(model: str) -> float | None:
    return REGISTRY.get_sample_value("imagegate_queue_depth", {"model": model})


def _workers_up(model: str) -> float | None:
    return REGISTRY.get_sample_value("imagegate_workers_up", {"model": model})


def _backend_up(backend: str) -> float | None:
    return REGISTRY.get_sample_value("imagegate_backend_up", {"backend": backend})


# -- LeastOutstandingWork ---------------------------------------------------------------------------------------


def test_policy_picks_least_outstanding_work():
    busy, idle, busier = _member(500.0, 1), _member(100.0, 5), _member(900.0, 1)
    assert LeastOutstandingWork().choose([busy, idle, busier], work=10.0) is idle


def test_policy_divides_work_by_weight():
    small = _member(300.0, 1, weight=1.0)  # 300 per unit of weight
    big = _member(400.0, 1, weight=2.0)  # 200 per unit of weight
    assert LeastOutstandingWork().choose([small, big], work=1.0) is big


def test_policy_tie_on_work_prefers_fewer_outstanding():
    a, b, c = _member(0.0, 3), _member(0.0, 1), _member(0.0, 2)
    assert LeastOutstandingWork().choose([a, b, c], work=1.0) is b


def test_policy_single_candidate():
    only = _member(1e9, 100)
    assert LeastOutstandingWork().choose([only], work=1.0) is only


def test_policy_breaks_ties_at_random_and_spreads_load():
    members = [_member() for _ in range(3)]
    policy = LeastOutstandingWork(rng=random.Random(1234))
    picks = Counter(id(policy.choose(members, work=1.0)) for _ in range(300))
    assert set(picks) == {id(m) for m in members}
    assert min(picks.values()) > 60  # roughly even: 100 each expected


def test_policy_random_tie_break_is_reproducible_with_a_seed():
    members = [_member() for _ in range(4)]
    policy_a, policy_b = LeastOutstandingWork(rng=random.Random(7)), LeastOutstandingWork(rng=random.Random(7))
    seq_a = [policy_a.choose(members, 1.0) for _ in range(20)]
    seq_b = [policy_b.choose(members, 1.0) for _ in range(20)]
    assert [id(m) for m in seq_a] == [id(m) for m in seq_b]
    assert len({id(m) for m in seq_a}) > 1


def test_policy_only_ties_are_drawn_from():
    best_a, best_b, worse = _member(10.0, 1), _member(10.0, 1), _member(10.0, 2)
    policy = LeastOutstandingWork(rng=random.Random(0))
    assert {id(policy.choose([best_a, worse, best_b], 1.0)) for _ in range(50)} == {id(best_a), id(best_b)}


# -- Pool: admission --------------------------------------------------------------------------------------------


def test_acquire_without_any_member_is_unavailable():
    model = _name("m")
    pool = Pool([_model(model)])
    with pytest.raises(Unavailable) as info:
        pool.acquire(model, 1.0)
    assert info.value.status == 503
    assert info.value.retry_after is not None
    assert int(info.value.headers()["retry-after"]) >= 1


@pytest.mark.parametrize("state", [State.STARTING, State.DOWN])
def test_acquire_with_no_ready_member_is_unavailable(state):
    model = _name("m")
    pool = Pool([_model(model)])
    pool.add(FakeBackend(name=_name("b")), [model], state=state)
    with pytest.raises(Unavailable):
        pool.acquire(model, 1.0)


def test_member_of_another_model_does_not_serve():
    model, other = _name("m"), _name("m")
    pool = Pool([_model(model), _model(other)])
    pool.add(FakeBackend(name=_name("b")), [other], state=State.READY)
    with pytest.raises(Unavailable):
        pool.acquire(model, 1.0)
    assert pool.acquire(other, 1.0).model == other


@pytest.mark.parametrize(("ready", "max_queue"), [(1, 0), (1, 3), (2, 3), (3, 1)])
def test_admits_ready_plus_max_queue_then_overloaded(ready, max_queue):
    model = _name("m")
    pool = Pool([_model(model, max_queue=max_queue)])
    for _ in range(ready):
        pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    pool.add(FakeBackend(name=_name("b")), [model], state=State.DOWN)  # not counted

    leases = [pool.acquire(model, 10.0) for _ in range(ready + max_queue)]
    with pytest.raises(Overloaded) as info:
        pool.acquire(model, 10.0)
    assert info.value.status == 429
    assert info.value.retry_after >= 1
    assert int(info.value.headers()["retry-after"]) >= 1

    leases[0].release(succeeded=False)  # a place frees up
    leases.append(pool.acquire(model, 10.0))
    with pytest.raises(Overloaded):
        pool.acquire(model, 10.0)


def test_overloaded_retry_after_estimates_from_observed_durations():
    model = _name("m")
    pool = Pool([_model(model, max_queue=2)])
    pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    lease = pool.acquire(model, 1.0)
    lease.started()
    lease.started_at -= 10.0  # the job ran ~10 s
    lease.release(succeeded=True)

    for _ in range(3):  # 1 running + 2 waiting
        pool.acquire(model, 1.0)
    with pytest.raises(Overloaded) as info:
        pool.acquire(model, 1.0)
    # ~10 s per job x (2 waiting + this one) / 1 ready backend
    assert 30 <= info.value.retry_after <= 31


def test_acquire_spreads_over_ready_members():
    model = _name("m")
    pool = Pool([_model(model)], policy=LeastOutstandingWork(rng=random.Random(3)))
    a = pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    b = pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    big = pool.acquire(model, 1000.0)
    small = pool.acquire(model, 10.0)
    assert {big.member, small.member} == {a, b}  # the second goes to the idle backend
    third = pool.acquire(model, 10.0)
    assert third.member is small.member  # 20 < 1000 outstanding work


# -- Pool: leases -----------------------------------------------------------------------------------------------


def test_lease_counters_and_double_release():
    model = _name("m")
    pool = Pool([_model(model)])
    member = pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)

    lease = pool.acquire(model, 250.0)
    assert lease.member is member
    assert (member.outstanding, member.outstanding_work) == (1, 250.0)
    assert _queue_depth(model) == 1

    waited = lease.started()
    assert waited >= 0
    assert _queue_depth(model) == 0
    assert lease.started() == waited  # idempotent: the queue is not decremented twice
    assert _queue_depth(model) == 0

    lease.release(succeeded=True)
    assert lease.released
    assert (member.outstanding, member.outstanding_work) == (0, 0.0)
    assert _queue_depth(model) == 0

    lease.release(succeeded=True)  # no-op
    lease.release(succeeded=False)  # no-op
    assert (member.outstanding, member.outstanding_work) == (0, 0.0)
    assert _queue_depth(model) == 0


def test_release_before_start_leaves_the_queue():
    model = _name("m")
    pool = Pool([_model(model)])
    member = pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    leases = [pool.acquire(model, 1.0) for _ in range(3)]
    assert _queue_depth(model) == 3
    leases[0].started()
    assert _queue_depth(model) == 2
    leases[1].release(succeeded=False)
    assert _queue_depth(model) == 1
    leases[1].release(succeeded=False)
    assert _queue_depth(model) == 1
    assert member.outstanding == 2
    for lease in leases:
        lease.release(succeeded=False)
    assert _queue_depth(model) == 0
    assert (member.outstanding, member.outstanding_work) == (0, 0.0)


# -- Pool: state and gauges -------------------------------------------------------------------------------------


def test_workers_up_and_backend_up_gauges_follow_state():
    model = _name("m")
    pool = Pool([_model(model)])
    a = pool.add(FakeBackend(name=_name("b")), [model])
    b = pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    assert a.state is State.STARTING
    assert _workers_up(model) == 1
    assert _backend_up(a.name) == 0
    assert _backend_up(b.name) == 1

    pool.set_state(a, State.READY)
    assert _workers_up(model) == 2
    assert _backend_up(a.name) == 1
    assert pool.ready(model) == [a, b]

    pool.set_state(b, State.DOWN, "crashed")
    assert b.detail == "crashed"
    assert _workers_up(model) == 1
    assert _backend_up(b.name) == 0
    assert pool.ready(model) == [a]


def test_a_member_serving_two_models_updates_both_gauges():
    m1, m2 = _name("m"), _name("m")
    pool = Pool([_model(m1), _model(m2)])
    member = pool.add(FakeBackend(name=_name("b")), [m1, m2], state=State.READY)
    assert (_workers_up(m1), _workers_up(m2)) == (1, 1)
    pool.set_state(member, State.DOWN)
    assert (_workers_up(m1), _workers_up(m2)) == (0, 0)


def test_is_ready_needs_every_model():
    m1, m2 = _name("m"), _name("m")
    pool = Pool([_model(m1), _model(m2)])
    assert not pool.is_ready()
    a = pool.add(FakeBackend(name=_name("b")), [m1], state=State.READY)
    assert not pool.is_ready()
    b = pool.add(FakeBackend(name=_name("b")), [m2], state=State.STARTING)
    assert not pool.is_ready()
    pool.set_state(b, State.READY)
    assert pool.is_ready()
    pool.set_state(a, State.DOWN)
    assert not pool.is_ready()


def _state_gauges(backend: str) -> dict[str, float | None]:
    return {
        s.value: REGISTRY.get_sample_value("imagegate_backend_state", {"backend": backend, "state": s.value})
        for s in State
    }


# -- PowerOfTwoLeastWork ----------------------------------------------------------------------------------------


class _NoRandom(random.Random):
    """An rng that must not be used."""

    def random(self) -> float:
        raise AssertionError("the policy drew a random number for a single candidate")


class _RecordingRandom(random.Random):
    """A seeded rng that records the candidates each ``choices`` call drew."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.drawn: list[Member] = []

    def choices(self, population, weights=None, *, cum_weights=None, k=1):  # type: ignore[override]
        picked = super().choices(population, weights, cum_weights=cum_weights, k=k)
        self.drawn.extend(picked)
        return picked


def test_p2c_is_the_default_policy_and_policies_are_named():
    assert isinstance(Pool([_model(_name("m"))]).policy, PowerOfTwoLeastWork)
    assert {"least_work_p2c": PowerOfTwoLeastWork, "least_work": LeastOutstandingWork} == POLICIES


def test_p2c_single_candidate_is_taken_without_drawing():
    only = _member(1e9, 100)
    assert PowerOfTwoLeastWork(rng=_NoRandom()).choose([only], work=1.0) is only


@pytest.mark.parametrize("seed", range(20))
def test_p2c_with_two_candidates_takes_the_least_work_per_weight(seed):
    rng = random.Random(seed)
    busy, idle = _member(500.0, 1), _member(100.0, 5)
    assert PowerOfTwoLeastWork(rng=rng).choose([busy, idle], 1.0) is idle
    assert PowerOfTwoLeastWork(rng=rng).choose([idle, busy], 1.0) is idle
    small, big = _member(300.0, 1, weight=1.0), _member(400.0, 1, weight=2.0)  # 300 vs 200 per unit of weight
    assert PowerOfTwoLeastWork(rng=rng).choose([small, big], 1.0) is big
    fewer, more = _member(100.0, 1), _member(100.0, 4)  # equal work: fewer outstanding requests wins
    assert PowerOfTwoLeastWork(rng=rng).choose([more, fewer], 1.0) is fewer


def test_p2c_two_equal_candidates_share_at_random():
    a, b = _member(), _member()
    policy = PowerOfTwoLeastWork(rng=random.Random(11))
    picks = Counter(id(policy.choose([a, b], 1.0)) for _ in range(400))
    assert set(picks) == {id(a), id(b)}
    assert min(picks.values()) > 150  # 200 each expected


def test_p2c_never_takes_the_more_loaded_of_its_two_draws():
    members = [_member(float(100 * i), i) for i in range(1, 7)]  # every load differs
    rng = _RecordingRandom(5)
    policy = PowerOfTwoLeastWork(rng=rng)
    picks = Counter()
    for _ in range(600):
        rng.drawn.clear()
        chosen = policy.choose(members, 1.0)
        assert len(rng.drawn) == 2, "p2c draws exactly two candidates"
        first, second = rng.drawn
        assert first is not second, "the two draws must be different candidates"
        assert chosen is min((first, second), key=lambda m: m.outstanding_work), (
            f"chose {chosen.outstanding_work} of {first.outstanding_work} and {second.outstanding_work}"
        )
        picks[chosen.outstanding_work] += 1
    assert 600.0 not in picks  # the most loaded can never win a pair
    assert picks[100.0] < 600 and picks[200.0] > 0  # not a full scan: the idlest does not take everything
    # P(least loaded) = P(it is one of the two draws) = 1 - (5/6)(4/5) = 1/3
    assert 150 < picks[100.0] < 250


def _p2c_share(weights: list[float], i: int) -> float:
    """Exact probability that p2c picks candidate ``i`` when every load is equal (coin flip between the draws)."""
    total = sum(weights)
    first = weights[i] / total
    second = sum(weights[j] / total * weights[i] / (total - weights[j]) for j in range(len(weights)) if j != i)
    return (first + second) / 2


def test_p2c_equal_loads_draw_in_proportion_to_weight():
    weights = [1.0, 1.0, 2.0, 4.0]
    members = [_member(weight=w) for w in weights]
    policy = PowerOfTwoLeastWork(rng=random.Random(2024))
    draws = 20_000
    picks = Counter(id(policy.choose(members, 1.0)) for _ in range(draws))
    shares = [picks[id(m)] / draws for m in members]
    for i, share in enumerate(shares):
        expected = _p2c_share(weights, i)
        assert abs(share - expected) < 0.02, f"member {i} (weight {weights[i]}): {share:.3f} vs {expected:.3f}"
    assert shares[0] < shares[2] < shares[3]  # heavier backends get more
    assert abs(shares[0] - shares[1]) < 0.03  # equal weights, equal shares


def test_p2c_weights_decide_between_equal_work():
    # 400 work on a weight-4 backend is 100 per unit, less than 150 on a weight-1 backend
    light, heavy = _member(150.0, 1, weight=1.0), _member(400.0, 4, weight=4.0)
    policy = PowerOfTwoLeastWork(rng=random.Random(0))
    assert {id(policy.choose([light, heavy], 1.0)) for _ in range(30)} == {id(heavy)}


def test_pool_weights_apply_by_backend_name():
    model = _name("m")
    heavy, plain = _name("b"), _name("b")
    pool = Pool([_model(model)], weights={heavy: 2.5, "someone-else": 9.0})
    a = pool.add(FakeBackend(name=heavy), [model], state=State.READY)
    b = pool.add(FakeBackend(name=plain), [model], state=State.READY)
    assert (a.weight, b.weight) == (2.5, 1.0)


@pytest.mark.parametrize("weight", [0.0, -1.0])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_non_positive_backend_weight_is_refused_or_harmless(tmp_path, policy, weight):
    model, zero, other = _name("m"), _name("b"), _name("b")
    try:
        settings = load_settings(
            environ={},
            overrides={
                "data_dir": str(tmp_path),
                "models": [{"name": model, "path": "/m"}],
                "backend_weights": {zero: weight},
                "routing": policy,
            },
        )
    except ConfigError:
        return  # refused at start-up: fine
    pool = Pool(settings.resolved_models(), POLICIES[settings.routing](), weights=settings.backend_weights)
    pool.add(FakeBackend(name=zero), [model], state=State.READY)
    pool.add(FakeBackend(name=other), [model], state=State.READY)
    try:
        for _ in range(10):
            pool.acquire(model, 1.0)
    except (ZeroDivisionError, ValueError) as e:
        pytest.fail(
            f"BUG: backend_weights {{{zero!r}: {weight}}} is accepted by the configuration, then every request "
            f"routed over that backend fails with {e!r} (a 500); config should refuse weights <= 0"
        )


# -- Pool: circuit breaker --------------------------------------------------------------------------------------


def _breaker_pool(t: list[float], *, probed: bool = False) -> tuple[Pool, Member, str]:
    model = _name("m")
    pool = Pool([_model(model)], clock=lambda: t[0], breaker=Breaker(failures=3, window=60, cooldown=10))
    member = pool.add(FakeBackend(name=_name("b"), models=[model]), [model], state=State.READY, probed=probed)
    return pool, member, model


def test_breaker_third_failure_in_the_window_starts_a_cooldown():
    t = [1000.0]
    pool, member, model = _breaker_pool(t)
    name = member.name
    assert sample("imagegate_backend_cooldowns_total", backend=name) == 0
    assert REGISTRY.get_sample_value("imagegate_backend_failures_total", {"backend": name}) == 0  # series exist

    pool.failed(member, "unreachable")
    t[0] += 1
    pool.failed(member, "unreachable")
    assert member.state is State.READY
    assert pool.ready(model) == [member]
    assert len(member.failures) == 2
    assert sample("imagegate_backend_failures_total", backend=name) == 2

    t[0] += 1
    pool.failed(member, "broke off")
    assert member.state is State.COOLING_DOWN
    assert member.cooling_until == t[0] + 10
    assert "broke off" in member.detail
    assert pool.ready(model) == []
    assert not pool.is_ready()
    with pytest.raises(Unavailable):
        pool.acquire(model, 1.0)
    assert sample("imagegate_backend_failures_total", backend=name) == 3
    assert sample("imagegate_backend_cooldowns_total", backend=name) == 1
    assert _state_gauges(name) == {"starting": 0, "ready": 0, "cooling_down": 1, "down": 0}
    assert _backend_up(name) == 0
    assert _workers_up(model) == 0


def test_breaker_failures_older_than_the_window_do_not_count():
    t = [1000.0]
    pool, member, _ = _breaker_pool(t)
    pool.failed(member, "x")  # t=1000
    t[0] = 1030.0
    pool.failed(member, "x")
    t[0] = 1061.0  # the first is now 61 s old
    pool.failed(member, "x")
    assert member.state is State.READY
    assert list(member.failures) == [1030.0, 1061.0]
    t[0] = 1089.0  # 1030, 1061, 1089 are within 60 s
    pool.failed(member, "x")
    assert member.state is State.COOLING_DOWN
    assert sample("imagegate_backend_cooldowns_total", backend=member.name) == 1


def test_breaker_failures_while_cooling_do_not_start_another_cooldown():
    t = [1000.0]
    pool, member, _ = _breaker_pool(t)
    for _ in range(3):
        pool.failed(member, "x")
    until = member.cooling_until
    t[0] += 5
    pool.failed(member, "x")  # a request admitted before the cooldown fails late
    assert member.state is State.COOLING_DOWN
    assert member.cooling_until == until
    assert sample("imagegate_backend_cooldowns_total", backend=member.name) == 1


def test_report_health_ready_keeps_a_cooling_backend_out_until_the_cooldown_is_over():
    t = [1000.0]
    pool, member, model = _breaker_pool(t, probed=True)
    for _ in range(3):
        pool.failed(member, "x")
    t[0] += 9.9
    pool.report_health(member, State.READY)
    assert member.state is State.COOLING_DOWN
    assert pool.ready(model) == []
    t[0] += 0.1  # the cooldown is over
    pool.report_health(member, State.READY)
    assert member.state is State.READY
    assert pool.ready(model) == [member]
    assert len(member.failures) == 0
    assert member.cooling_until == 0.0
    assert _state_gauges(member.name) == {"starting": 0, "ready": 1, "cooling_down": 0, "down": 0}
    assert _workers_up(model) == 1


@pytest.mark.parametrize("finding", [State.DOWN, State.STARTING])
def test_report_health_down_during_the_cooldown_does_not_cut_it_short(finding):
    t = [1000.0]
    pool, member, model = _breaker_pool(t, probed=True)
    for _ in range(3):
        pool.failed(member, "x")
    t[0] += 1
    pool.report_health(member, finding, "unreachable")  # a probe fails during the cooldown
    assert pool.ready(model) == []
    t[0] += 1  # 8 s of the 10 s cooldown left
    pool.report_health(member, State.READY)
    assert pool.ready(model) == [], (
        "BUG: a probe that found the backend down during its cooldown reset the breaker (set_state clears "
        "cooling_until), so the next healthy probe brought it back 8 s before the cooldown was over"
    )


class _Probed:
    """What probe_back did to each of several members."""

    def __init__(self) -> None:
        self.t = [1000.0]
        self.model = _name("m")
        self.pool = Pool([_model(self.model)], clock=lambda: self.t[0], breaker=Breaker(3, 60, 10))

    def cooling(self, *, probed: bool = False) -> tuple[Member, FakeBackend]:
        backend = FakeBackend(name=_name("b"), models=[self.model])
        member = self.pool.add(backend, [self.model], state=State.READY, probed=probed)
        for _ in range(3):
            self.pool.failed(member, "x")
        assert member.state is State.COOLING_DOWN
        return member, backend


async def test_probe_back_probes_only_unprobed_members_whose_cooldown_is_over():
    rig = _Probed()
    due, due_backend = rig.cooling()
    rig.t[0] += 5
    early, early_backend = rig.cooling()  # its cooldown ends 5 s later
    probed, probed_backend = rig.cooling(probed=True)
    ready_backend = FakeBackend(name=_name("b"), models=[rig.model])
    ready = rig.pool.add(ready_backend, [rig.model], state=State.READY)
    rig.t[0] = due.cooling_until + 0.5  # due: over; early and probed: 4.5 s left

    await rig.pool.probe_back()
    assert due_backend.health_checks == 1
    assert early_backend.health_checks == 0, "probed before its cooldown was over"
    assert probed_backend.health_checks == 0, "a member with its own prober was probed by probe_back"
    assert ready_backend.health_checks == 0
    assert due.state is State.READY
    assert len(due.failures) == 0
    assert early.state is State.COOLING_DOWN
    assert probed.state is State.COOLING_DOWN
    assert rig.pool.ready(rig.model) == [due, ready]

    rig.t[0] = max(early.cooling_until, probed.cooling_until) + 1
    await rig.pool.probe_back()
    assert (early_backend.health_checks, probed_backend.health_checks, due_backend.health_checks) == (1, 0, 1)
    assert early.state is State.READY
    assert probed.state is State.COOLING_DOWN


@pytest.mark.parametrize("status", ["unreachable", "loading", "failed"])
async def test_probe_back_unhealthy_stays_cooling_with_a_new_cooldown(status):
    rig = _Probed()
    member, backend = rig.cooling()
    backend.health_status = status
    rig.t[0] = member.cooling_until + 3
    await rig.pool.probe_back()
    assert backend.health_checks == 1
    assert member.state is State.COOLING_DOWN
    assert member.cooling_until == rig.t[0] + 10
    assert rig.pool.ready(rig.model) == []

    rig.t[0] += 9  # within the new cooldown: not probed
    await rig.pool.probe_back()
    assert backend.health_checks == 1

    backend.health_status = "ready"
    rig.t[0] += 1
    await rig.pool.probe_back()
    assert backend.health_checks == 2
    assert member.state is State.READY
    assert len(member.failures) == 0


async def test_probe_back_a_backend_missing_a_model_stays_cooling():
    rig = _Probed()
    member, backend = rig.cooling()
    backend.models = ["something-else"]
    rig.t[0] = member.cooling_until
    await rig.pool.probe_back()
    assert backend.health_checks == 1
    assert member.state is State.COOLING_DOWN


def test_set_state_ready_after_a_restart_forgets_failures():
    t = [1000.0]
    pool, member, model = _breaker_pool(t)
    pool.failed(member, "x")
    pool.failed(member, "x")
    pool.set_state(member, State.READY)  # the worker restarted
    assert len(member.failures) == 0
    pool.failed(member, "x")
    pool.failed(member, "x")
    assert member.state is State.READY  # two failures since the restart, not four

    pool.failed(member, "x")
    assert member.state is State.COOLING_DOWN
    pool.set_state(member, State.READY)  # a restart ends the cooldown too
    assert member.state is State.READY
    assert (len(member.failures), member.cooling_until) == (0, 0.0)
    assert pool.ready(model) == [member]


# -- Pool: acquire with exclusions, queue bound, capacity ------------------------------------------------------------


def test_acquire_never_returns_an_excluded_member():
    model = _name("m")
    pool = Pool([_model(model)], policy=PowerOfTwoLeastWork(rng=random.Random(9)))
    members = [pool.add(FakeBackend(name=_name("b")), [model], state=State.READY) for _ in range(3)]
    for _ in range(50):
        lease = pool.acquire(model, 1.0, exclude=[members[0], members[2]])
        assert lease.member is members[1]
        lease.release(succeeded=False)
    seen = set()
    for _ in range(50):
        lease = pool.acquire(model, 1.0, exclude=[members[1]])
        seen.add(id(lease.member))
        lease.release(succeeded=False)
    assert seen == {id(members[0]), id(members[2])}


def test_acquire_with_every_ready_member_excluded_is_unavailable():
    model = _name("m")
    pool = Pool([_model(model)])
    a = pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    b = pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    with pytest.raises(Unavailable) as info:
        pool.acquire(model, 1.0, exclude=[a, b])
    assert info.value.status == 503
    assert (a.outstanding, b.outstanding) == (0, 0)
    assert pool._outstanding[model] == 0
    assert _queue_depth(model) == 0


def test_queue_bound_false_admits_past_max_queue():
    model = _name("m")
    pool = Pool([_model(model, max_queue=0)])
    pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    first = pool.acquire(model, 1.0)
    with pytest.raises(Overloaded):
        pool.acquire(model, 1.0)
    moved = pool.acquire(model, 1.0, queue_bound=False)
    assert moved.member is first.member
    assert first.member.outstanding == 2


def test_capacity_counts_in_admission():
    model = _name("m")
    pool = Pool([_model(model, max_queue=1)])
    pool.add(FakeBackend(name=_name("b")), [model], state=State.READY, capacity=3)
    pool.add(FakeBackend(name=_name("b")), [model], state=State.READY, capacity=2)
    pool.add(FakeBackend(name=_name("b")), [model], state=State.DOWN, capacity=50)  # not ready: not counted
    leases = [pool.acquire(model, 1.0) for _ in range(3 + 2 + 1)]
    with pytest.raises(Overloaded):
        pool.acquire(model, 1.0)
    leases[0].release(succeeded=False)
    pool.acquire(model, 1.0)


def test_cooling_members_do_not_count_in_admission():
    t = [0.0]
    model = _name("m")
    pool = Pool([_model(model, max_queue=0)], clock=lambda: t[0], breaker=Breaker(failures=1))
    a = pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    pool.failed(a, "x")
    assert a.state is State.COOLING_DOWN
    lease = pool.acquire(model, 1.0)
    assert lease.member is not a
    with pytest.raises(Overloaded):
        pool.acquire(model, 1.0)


# -- Pool: drain ------------------------------------------------------------------------------------------------


async def test_drain_refuses_new_requests_and_waits_for_leases():
    model = _name("m")
    pool = Pool([_model(model)])
    pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    a, b = pool.acquire(model, 1.0), pool.acquire(model, 1.0)
    drained = asyncio.create_task(pool.drain(timeout=30))
    await asyncio.sleep(0)
    assert pool.draining
    assert not pool.is_ready()
    with pytest.raises(Unavailable) as info:
        pool.acquire(model, 1.0)
    assert info.value.status == 503
    a.started()
    a.release(succeeded=True)
    await asyncio.sleep(0)
    assert not drained.done()  # one lease is still out
    b.release(succeeded=False)
    assert await asyncio.wait_for(drained, 5) is True


async def test_drain_times_out_with_leases_out():
    model = _name("m")
    pool = Pool([_model(model)])
    pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    lease = pool.acquire(model, 1.0)
    assert await pool.drain(timeout=0.05) is False
    assert pool.draining
    lease.release(succeeded=False)
    assert await pool.drain(timeout=0.05) is True


async def test_drain_with_nothing_in_flight_is_immediate():
    model = _name("m")
    pool = Pool([_model(model)])
    pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    pool.acquire(model, 1.0).release(succeeded=False)
    assert await asyncio.wait_for(pool.drain(timeout=30), 5) is True


async def test_drain_with_a_zero_timeout_and_nothing_in_flight_is_true():
    model = _name("m")
    pool = Pool([_model(model)])
    pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    assert await pool.drain(timeout=0) is True, (
        "BUG: drain(0) with nothing in flight says requests are still in flight: asyncio.wait_for(event.wait(), 0) "
        "times out before the wait runs, so drain_timeout = 0 always logs 'still in flight' and stops the workers"
    )


# -- Pool: per-backend gauges -----------------------------------------------------------------------------------


def _backend_gauges(backend: str) -> tuple[float | None, float | None, float | None]:
    return (
        REGISTRY.get_sample_value("imagegate_backend_in_flight", {"backend": backend}),
        REGISTRY.get_sample_value("imagegate_backend_queue_depth", {"backend": backend}),
        REGISTRY.get_sample_value("imagegate_backend_requests_total", {"backend": backend}),
    )


def test_per_backend_gauges_follow_acquire_started_release():
    model = _name("m")
    pool = Pool([_model(model)])
    member = pool.add(FakeBackend(name=_name("b")), [model], state=State.READY)
    name = member.name
    assert _backend_gauges(name) == (0, 0, 0)  # every series exists from the start

    a, b = pool.acquire(model, 1.0), pool.acquire(model, 1.0)
    assert _backend_gauges(name) == (2, 2, 2)
    a.started()
    assert _backend_gauges(name) == (2, 1, 2)
    a.started()
    assert _backend_gauges(name) == (2, 1, 2)
    a.release(succeeded=True)
    assert _backend_gauges(name) == (1, 1, 2)
    b.release(succeeded=False)  # never started: leaves the queue too
    assert _backend_gauges(name) == (0, 0, 2)
    b.release(succeeded=False)
    assert _backend_gauges(name) == (0, 0, 2)


def test_adapter_affinity_prefers_a_backend_that_holds_the_adapters_unless_it_is_busier():
    from app.pool.policies import adapter_affinity

    cold, warm = FakeBackend(name="cold"), FakeBackend(name="warm")
    warm.adapters = frozenset({"d1", "d2"})  # type: ignore[attr-defined]
    pool = Pool([ModelConfig(name="m", path="x")])
    a = pool.add(cold, ["m"], state=State.READY)
    b = pool.add(warm, ["m"], state=State.READY)
    assert adapter_affinity([a, b], frozenset({"d1"}), 10.0) is b
    assert adapter_affinity([a, b], frozenset({"d1", "d3"}), 10.0) is None  # it lacks one: route as usual
    b.outstanding_work = 10.0  # one request's work more than the idle one: still worth it
    assert adapter_affinity([a, b], frozenset({"d1"}), 10.0) is b
    b.outstanding_work = 25.0  # more than that: the idle backend loads the adapter instead
    assert adapter_affinity([a, b], frozenset({"d1"}), 10.0) is None
    b.outstanding_work = 0.0
    for _ in range(5):  # through the pool: the warm backend each time while it is no busier
        lease = pool.acquire("m", 10.0, adapters=frozenset({"d2"}))
        assert lease.member is b
        lease.release(succeeded=True)


def test_inference_avoids_a_training_worker_while_another_can_serve_and_trainers_are_chosen_by_device():
    from app.backends.worker import WorkerBackend
    from app.worker.protocol import ModelDetails

    pool = Pool([ModelConfig(name="m", path="x")])
    gpu0, gpu1 = WorkerBackend("gpu0", "unix:/nonexistent-0"), WorkerBackend("gpu1", "unix:/nonexistent-1")
    a = pool.add(gpu0, ["m"], state=State.READY, device="cuda:0")
    b = pool.add(gpu1, ["m"], state=State.READY, device="cuda:1")
    upstream = pool.add(FakeBackend(name="upstream"), ["m"], state=State.READY)
    for member in (a, b):
        member.details = {"m": ModelDetails(family="sd", schedulers=[], lora=True, trainable=True, native_side=512)}
    assert pool.trainers("m") == [a, b] and pool.trainers("m", ["cuda:1"]) == [b]
    assert upstream not in pool.trainers("m")  # reported nothing about training: never a trainer
    gpu0.training = 1  # what WorkerBackend.train counts while a training streams
    assert a.training and pool.trainers("m") == [b, a]  # an idle trainer first
    picked = Counter()
    for _ in range(30):
        lease = pool.acquire("m", 1.0)
        picked[lease.member.name] += 1
        lease.release(succeeded=True)
    assert picked["gpu0"] == 0 and picked["gpu1"] + picked["upstream"] == 30
    # when the training worker is the only one, requests still go to it (they run between training slices)
    solo = Pool([ModelConfig(name="m", path="x")])
    only = solo.add(gpu0, ["m"], state=State.READY, device="cuda:0")
    lease = solo.acquire("m", 1.0)
    assert lease.member is only
    lease.release(succeeded=True)
