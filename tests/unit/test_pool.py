"""The pool and its routing policy: who gets a request, admission control, lease accounting and gauges.

Prometheus metrics are process-global, so every test uses its own model and backend names.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from prometheus_client import REGISTRY

from app.backends.fake import FakeBackend
from app.config import ModelConfig
from app.errors import Overloaded, Unavailable
from app.pool import LeastOutstandingWork, Member, Pool, State

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
