"""The pool through HTTP: the overhead header and histogram, /ready, failover, fallbacks and the pool's metrics.

Prometheus metrics are process-global, so every test uses its own model and backend names.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import msgspec
import pytest

from app import contract
from app.api.system import Readiness
from app.backends.fake import FakeBackend
from app.pool import State
from tests.helpers import InOrder, sample

from .conftest import make_client
from .test_edits import post_edit

GENERATIONS = "/v1/images/generations"
HEADER = "x-imagegate-overhead-ms"
_ids = itertools.count()


def _n(prefix: str) -> str:
    return f"http-{prefix}-{next(_ids)}"


def _model(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "path": f"/m/{name}", "default_size": "64x64", "default_steps": 3, **fields}


def overhead_count() -> float:
    return sample("imagegate_gateway_overhead_seconds_count")


def sse_types(text: str) -> list[str]:
    return [line.removeprefix("event: ") for line in text.split("\n") if line.startswith("event: ")]


def overhead_ms(response) -> float:
    value = response.headers.get(HEADER)
    assert value is not None, f"no {HEADER} header on {response.request.url}"
    assert re.fullmatch(r"\d+\.\d{3}", value), value
    return float(value)


# -- HTTP metrics ---------------------------------------------------------------------------------------------------


def http_sample(name: str, method: str, path: str, status: int) -> float:
    labels = {"method": method, "path": path, "status_code": str(status), "app_name": "imagegate"}
    return sample(f"imagegate_http_{name}", **labels)


def test_http_metrics_by_method_route_template_and_status(tmp_path):
    model = _n("m")
    routes = [(GENERATIONS, 200), (GENERATIONS, 400), (GENERATIONS, 503), ("/admin/keys/{key_id}", 404)]
    series = [("POST", path, status) for path, status in routes[:3]] + [("GET", *routes[3])]
    names = ("requests_total", "request_duration_seconds_count", "requests_error_total")
    before = {(name, s): http_sample(name, *s) for name in names for s in series}
    with make_client(tmp_path, [(FakeBackend(_n("b")), [model])], models=[_model(model)]) as tc:
        assert tc.post(GENERATIONS, json={"model": model, "prompt": "p"}).status_code == 200
        assert tc.post(GENERATIONS, json={"model": model, "prompt": "p", "size": "1x1"}).status_code == 400
        tc.app.state.pool.members[0].state = State.DOWN
        assert tc.post(GENERATIONS, json={"model": model, "prompt": "p"}).status_code == 503
        assert tc.get("/admin/keys/key_nowhere").status_code == 404  # counted by its template, not its id
        scrapes = http_sample("requests_total", "GET", "/metrics", 200)
        tc.get("/metrics")
        tc.options(GENERATIONS, headers={"origin": "http://x", "access-control-request-method": "POST"})
    delta = {(name, s): http_sample(name, *s) - before[(name, s)] for name in names for s in series}
    for s in series:
        assert delta[("requests_total", s)] == 1, (s, delta)
        assert delta[("request_duration_seconds_count", s)] == 1, (s, delta)
        assert delta[("requests_error_total", s)] == (1 if s[2] >= 500 else 0), (s, delta)
    assert http_sample("requests_in_progress", "POST", GENERATIONS, 200) == 0
    assert http_sample("requests_total", "GET", "/metrics", 200) == scrapes, "scrapes are not counted"
    assert http_sample("requests_total", "OPTIONS", GENERATIONS, 200) == 0, "preflights are not counted"


# -- the overhead header and histogram --------------------------------------------------------------------------


def test_overhead_header_and_histogram_on_a_generation(tmp_path):
    model = _n("m")
    with make_client(tmp_path, [(FakeBackend(_n("b")), [model])], models=[_model(model)]) as tc:
        before = overhead_count()
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p"})
        assert r.status_code == 200, r.text
        assert 0 <= overhead_ms(r) < 1000
        assert overhead_count() == before + 1


def test_overhead_header_and_histogram_on_a_stream(tmp_path):
    model = _n("m")
    with make_client(tmp_path, [(FakeBackend(_n("b")), [model])], models=[_model(model)]) as tc:
        before = overhead_count()
        body = {"model": model, "prompt": "p", "stream": True, "partial_images": 1}
        with tc.stream("POST", GENERATIONS, json=body) as r:
            assert r.status_code == 200
            text = r.read().decode()
        assert sse_types(text) == ["image_generation.partial_image", "image_generation.completed"]
        assert 0 <= overhead_ms(r) < 1000
        assert overhead_count() == before + 1


def test_overhead_excludes_the_time_spent_on_the_backend(tmp_path):
    model = _n("m")
    slow = FakeBackend(_n("slow"), step_delay=0.1)  # 3 steps: 0.3 s on the backend
    with make_client(tmp_path, [(slow, [model])], models=[_model(model)]) as tc:
        before = sample("imagegate_gateway_overhead_seconds_sum")
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p"})
        assert r.status_code == 200
        assert overhead_ms(r) < 250, "the backend's 300 ms were counted as the gateway's own"
        assert sample("imagegate_gateway_overhead_seconds_sum") - before < 0.25


def test_requests_that_reach_no_backend_are_not_in_the_histogram(tmp_path):
    model = _n("m")
    with make_client(tmp_path, [(FakeBackend(_n("b")), [model])], models=[_model(model)]) as tc:
        before = overhead_count()
        ready = tc.get("/ready")
        assert ready.status_code == 200
        overhead_ms(ready)  # every response carries the header
        bad = tc.post(GENERATIONS, json={"model": model, "prompt": "p", "size": "1x1"})
        assert bad.status_code == 400
        assert overhead_count() == before


# -- /ready -----------------------------------------------------------------------------------------------------


def _check_readiness_contract(body: dict[str, Any]) -> None:
    schemas = contract.bundle()["components"]["schemas"]
    readiness, backend = schemas["Readiness"], schemas["ReadyBackend"]
    assert set(body) == set(readiness["properties"])
    assert body["status"] in readiness["properties"]["status"]["enum"]
    for b in body["backends"]:
        assert set(b) == set(backend["properties"]) == set(backend["required"]), sorted(b)
        assert b["state"] in backend["properties"]["state"]["enum"]
        for key, types in (("outstanding", int), ("queued", int), ("recent_failures", int)):
            assert isinstance(b[key], types) and b[key] >= 0, (key, b[key])
        for key in ("weight", "cooldown_seconds_left"):
            assert isinstance(b[key], int | float) and b[key] >= 0, (key, b[key])
    msgspec.convert(body, Readiness)


def test_ready_lists_backends_with_their_state_load_and_weight(tmp_path):
    model, heavy, plain = _n("m"), _n("heavy"), _n("plain")
    backends = [(FakeBackend(heavy), [model]), (FakeBackend(plain), [model])]
    with make_client(tmp_path, backends, models=[_model(model)], backend_weights={heavy: 2.5}) as tc:
        r = tc.get("/ready")
        assert r.status_code == 200
        body = r.json()
        _check_readiness_contract(body)
        assert body["status"] == "ready"
        assert body["models"] == {model: 2}
        by_name = {b["name"]: b for b in body["backends"]}
        assert by_name[heavy] == {
            "name": heavy,
            "state": "ready",
            "models": [model],
            "outstanding": 0,
            "queued": 0,
            "weight": 2.5,
            "recent_failures": 0,
            "cooldown_seconds_left": 0,
            "detail": "",
            "training": False,
        }
        assert by_name[plain]["weight"] == 1


def test_ready_shows_a_backend_in_cooldown(tmp_path):
    model = _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    with make_client(
        tmp_path,
        [(bad, [model]), (good, [model])],
        models=[_model(model)],
        cooldown_failures=1,
        cooldown_seconds=600,
    ) as tc:
        tc.app.state.pool.policy = InOrder()
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p"})
        assert r.status_code == 200, r.text  # moved on to the good backend
        assert bad.started == 1 and good.completed == 1

        ready = tc.get("/ready")
        assert ready.status_code == 200  # the model still has a ready backend
        body = ready.json()
        _check_readiness_contract(body)
        assert body["status"] == "ready"
        assert body["models"] == {model: 1}
        by_name = {b["name"]: b for b in body["backends"]}
        cooling = by_name[bad.name]
        assert cooling["state"] == "cooling_down"
        assert cooling["recent_failures"] == 1
        assert 590 < cooling["cooldown_seconds_left"] <= 600
        assert "unreachable" in cooling["detail"]
        assert by_name[good.name]["state"] == "ready"
        assert by_name[good.name]["cooldown_seconds_left"] == 0

        metrics = tc.get("/metrics").text
        assert f'imagegate_backend_state{{backend="{bad.name}",state="cooling_down"}} 1.0' in metrics
        assert f'imagegate_backend_state{{backend="{bad.name}",state="ready"}} 0.0' in metrics
        assert f'imagegate_backend_cooldowns_total{{backend="{bad.name}"}} 1.0' in metrics


def test_ready_is_503_when_the_only_backend_cools_down(tmp_path):
    model = _n("m")
    bad = FakeBackend(_n("bad"), fail="before")
    with make_client(
        tmp_path, [(bad, [model])], models=[_model(model)], cooldown_failures=1, cooldown_seconds=600
    ) as tc:
        assert tc.post(GENERATIONS, json={"model": model, "prompt": "p"}).status_code == 502
        ready = tc.get("/ready")
        assert ready.status_code == 503
        body = ready.json()
        _check_readiness_contract(body)
        assert body["status"] == "not_ready"
        assert body["backends"][0]["state"] == "cooling_down"
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p"})
        assert r.status_code == 503  # out of the pool: not tried again
        assert bad.started == 1


def test_ready_recent_failures_forget_failures_older_than_the_window(tmp_path):
    model = _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    with make_client(tmp_path, [(bad, [model]), (good, [model])], models=[_model(model)], cooldown_window=60) as tc:
        pool = tc.app.state.pool
        pool.policy = InOrder()
        for _ in range(2):
            assert tc.post(GENERATIONS, json={"model": model, "prompt": "p"}).status_code == 200
        by_name = {b["name"]: b for b in tc.get("/ready").json()["backends"]}
        assert by_name[bad.name]["recent_failures"] == 2
        later = pool.clock() + 120  # two minutes on: both failures are out of the 60 s window
        pool.clock = lambda: later
        by_name = {b["name"]: b for b in tc.get("/ready").json()["backends"]}
        assert by_name[bad.name]["recent_failures"] == 0, (
            "BUG: /ready's recent_failures is len(member.failures), which is pruned only when the next failure "
            "comes (Pool.failed), so failures long out of cooldown_window are still reported as recent"
        )


def test_ready_shows_queued_and_outstanding(tmp_path):
    model = _n("m")
    with make_client(tmp_path, [(FakeBackend(_n("b")), [model])], models=[_model(model)]) as tc:
        pool = tc.app.state.pool
        held = [pool.acquire(model, 1.0) for _ in range(3)]
        held[0].started()
        (backend,) = tc.get("/ready").json()["backends"]
        assert (backend["outstanding"], backend["queued"]) == (3, 2)
        for lease in held:
            lease.release(succeeded=False)


# -- fallbacks --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["fallbacks", "fallbacks[]"])
def test_multipart_edit_with_repeated_fallbacks_parts(tmp_path, field):
    primary, first, second = _n("m"), _n("m"), _n("m")
    b1, b2 = FakeBackend(_n("first")), FakeBackend(_n("second"))
    models = [_model(primary), _model(first), _model(second)]
    with make_client(tmp_path, [(b1, [first]), (b2, [second])], models=models) as tc:
        r = post_edit(tc, model=primary, **{field: [first, second]})
        assert r.status_code == 200, r.text
        assert (b1.started, b2.started) == (1, 0)
        assert b1.last_params.model == first and b1.last_params.task == "img2img"

        pool = tc.app.state.pool
        pool.set_state(pool.members[0], State.DOWN)  # the first fallback cannot: the second part is used
        r = post_edit(tc, model=primary, **{field: [first, second]})
        assert r.status_code == 200, r.text
        assert (b1.started, b2.started) == (1, 1)
        assert b2.last_params.model == second
        assert sample("imagegate_fallbacks_total", model=primary, fallback=second) == 1


def test_multipart_edit_with_an_unknown_fallback_part(tmp_path):
    model = _n("m")
    backend = FakeBackend(_n("b"))
    with make_client(tmp_path, [(backend, [model])], models=[_model(model)]) as tc:
        r = post_edit(tc, model=model, fallbacks=[model, "no-such-model"])
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "fallbacks"
        assert backend.started == 0


def test_json_fallbacks_reach_the_fallback(tmp_path):
    primary, fallback = _n("m"), _n("m")
    backend = FakeBackend(_n("b"))
    with make_client(tmp_path, [(backend, [fallback])], models=[_model(primary), _model(fallback)]) as tc:
        for item in (f"openai/{fallback}", {"provider": "openai", "model": fallback}, {"model": fallback}):
            r = tc.post(GENERATIONS, json={"model": primary, "prompt": "p", "fallbacks": [item]})
            assert r.status_code == 200, (item, r.text)
        assert backend.completed == 3
        assert backend.last_params.model == fallback


def test_json_unknown_fallback_is_a_400(tmp_path):
    model = _n("m")
    backend = FakeBackend(_n("b"))
    with make_client(tmp_path, [(backend, [model])], models=[_model(model)]) as tc:
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p", "fallbacks": ["no-such-model"]})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "fallbacks"
        assert error["code"] == "model_not_found"
        assert error["type"] == "invalid_request_error"
        assert backend.started == 0


@pytest.mark.parametrize("fallbacks", [[{"provider": "x"}], [3], ["a"] * 11])
def test_json_malformed_fallbacks_are_a_400(tmp_path, fallbacks):
    model = _n("m")
    with make_client(tmp_path, [(FakeBackend(_n("b")), [model])], models=[_model(model)]) as tc:
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p", "fallbacks": fallbacks})
        assert r.status_code == 400, r.text


# -- failover ---------------------------------------------------------------------------------------------------


def test_streamed_failover_before_any_event_is_a_normal_stream(tmp_path):
    model = _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    with make_client(tmp_path, [(bad, [model]), (good, [model])], models=[_model(model)]) as tc:
        tc.app.state.pool.policy = InOrder()
        before = sample("imagegate_retries_total", model=model)
        body = {"model": model, "prompt": "p", "stream": True, "partial_images": 2}
        with tc.stream("POST", GENERATIONS, json=body) as r:
            assert r.status_code == 200
            text = r.read().decode()
        assert sse_types(text) == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert "error" not in sse_types(text)
        assert (bad.started, good.started, good.completed) == (1, 1, 1)
        assert sample("imagegate_retries_total", model=model) == before + 1
        assert sample("imagegate_backend_failures_total", backend=bad.name) == 1


def test_streamed_failure_after_a_partial_is_an_error_event_not_a_retry(tmp_path):
    model = _n("m")
    broken, good = FakeBackend(_n("broken"), fail="after_partial"), FakeBackend(_n("good"))
    with make_client(tmp_path, [(broken, [model]), (good, [model])], models=[_model(model)]) as tc:
        tc.app.state.pool.policy = InOrder()
        body = {"model": model, "prompt": "p", "stream": True, "partial_images": 2}
        with tc.stream("POST", GENERATIONS, json=body) as r:
            assert r.status_code == 200
            text = r.read().decode()
        assert sse_types(text) == ["image_generation.partial_image", "error"]
        assert good.started == 0
        assert sample("imagegate_retries_total", model=model) == 0


def test_non_streamed_failover_through_http(tmp_path):
    model = _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    with make_client(tmp_path, [(bad, [model]), (good, [model])], models=[_model(model)]) as tc:
        tc.app.state.pool.policy = InOrder()
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p", "n": 2})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 2
        assert (bad.started, good.completed) == (1, 1)


def test_a_hung_backend_is_a_504(tmp_path):
    model = _n("m")
    hung = FakeBackend(_n("hung"), fail="hang")
    with make_client(tmp_path, [(hung, [model])], models=[_model(model)], request_timeout=0.3) as tc:
        r = tc.post(GENERATIONS, json={"model": model, "prompt": "p"})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout"
        assert hung.cancelled == 1
        (backend,) = tc.get("/ready").json()["backends"]
        assert backend["recent_failures"] == 1
        assert backend["outstanding"] == 0


# -- /metrics ---------------------------------------------------------------------------------------------------


def test_metrics_expose_the_pool(tmp_path):
    model = _n("m")
    bad, good = FakeBackend(_n("bad"), fail="before"), FakeBackend(_n("good"))
    with make_client(tmp_path, [(bad, [model]), (good, [model])], models=[_model(model)]) as tc:
        tc.app.state.pool.policy = InOrder()
        assert tc.post(GENERATIONS, json={"model": model, "prompt": "p"}).status_code == 200
        text = tc.get("/metrics").text
    for line in (
        f'imagegate_backend_state{{backend="{good.name}",state="ready"}} 1.0',
        f'imagegate_backend_state{{backend="{good.name}",state="cooling_down"}} 0.0',
        f'imagegate_backend_requests_total{{backend="{bad.name}"}} 1.0',
        f'imagegate_backend_requests_total{{backend="{good.name}"}} 1.0',
        f'imagegate_backend_failures_total{{backend="{bad.name}"}} 1.0',
        f'imagegate_backend_failures_total{{backend="{good.name}"}} 0.0',
        f'imagegate_backend_in_flight{{backend="{good.name}"}} 0.0',
        f'imagegate_backend_queue_depth{{backend="{good.name}"}} 0.0',
        f'imagegate_retries_total{{model="{model}"}} 1.0',
        f'imagegate_batch_size_count{{model="{model}"}} 1.0',
        f'imagegate_denoising_step_seconds_count{{model="{model}"}} 2.0',
        "imagegate_gateway_overhead_seconds_count",
    ):
        assert line in text, line
