"""The pool with real processes: two local workers and a remote one behind one gateway, kill -9, drain, a hung worker.

Every job here runs on the demo model. How long a job takes depends on the machine and on whatever else runs on it,
so the jobs that must still be running when something happens to them are sized by :func:`long_steps`, from a
measured step time, and each test checks by construction (first partial received, ``/ready`` counts) that what it
needs is in place before it acts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from app.config import demo_model

from .conftest import Server, alive, free_port

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"
TOKEN = "pool-e2e-worker-token"
SIZE = "128x128"
PARTIALS = 3
LOCAL = ("local-cpu", "local-cpu-2")
SHARE = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 3))}
"""The three workers of :func:`pool3` share this host's cores equally, so that they run jobs at the same pace."""


# -- helpers ----------------------------------------------------------------------------------------------------


def write_config(path: Path, model_path: Path, *, devices: list[str], remote: list[str], **settings: object) -> Path:
    """A settings file (JSON) serving the demo model (a copy of ``demo_model()``) on ``devices`` and ``remote``."""
    model = msgspec.to_builtins(demo_model(str(model_path.parent.parent)))
    model.update(
        path=str(model_path),
        devices=devices,
        remote_workers=remote,
        max_batch_pixels=0,  # every job runs alone: a queued job stays queued until the one before it ends
    )
    path.write_text(json.dumps({"health_interval": 0.5, **settings, "models": [model]}))
    return path


def sdk(url: str, timeout: float = 300) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def ready(url: str) -> tuple[int, dict]:
    r = httpx.get(f"{url}/ready", timeout=10)
    return r.status_code, r.json()


def backends(url: str) -> dict[str, dict]:
    return {b["name"]: b for b in ready(url)[1]["backends"]}


def counter(url: str, name: str, **labels: str) -> float:
    """A sample of /metrics (0 when the series does not exist yet: labelled counters appear on first use)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def requests_by_backend(url: str, names: list[str]) -> dict[str, float]:
    return {b: counter(url, "imagegate_backend_requests_total", backend=b) for b in names}


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"timed out after {timeout:g}s waiting until {what}"
        time.sleep(interval)
    return time.monotonic() - start


def generate(url: str, steps: int = 4, size: str = "64x64") -> int:
    """One non-streamed generation; returns the number of images."""
    result = sdk(url).images.generate(model=MODEL, prompt="a fox", size=size, extra_body={"num_inference_steps": steps})
    return len(result.data)


@dataclass
class Stream:
    """A streamed generation read on a thread through the openai SDK: its event types, or the error that ended it."""

    url: str
    steps: int
    size: str = SIZE
    events: list[str] = field(default_factory=list)
    error: Exception | None = None
    first_partial: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> Stream:
        try:
            stream = sdk(self.url).images.generate(
                model=MODEL,
                prompt="a long job",
                size=self.size,
                stream=True,
                partial_images=PARTIALS,
                extra_body={"num_inference_steps": self.steps},
            )
            for event in stream:
                self.events.append(event.type)
                self.first_partial.set()
        except Exception as e:  # what ended the stream is the result
            self.error = e
        finally:
            self.first_partial.set()  # never leave a waiter hanging
            self.done.set()
        return self

    @property
    def complete(self) -> bool:
        full = ["image_generation.partial_image"] * PARTIALS + ["image_generation.completed"]
        return self.error is None and self.events == full


def long_steps(url: str, target: float = 8.0, size: str = SIZE) -> int:
    """Steps at ``size`` for a job of about ``target`` seconds here and now (16-100): time a 10-step job."""
    start = time.monotonic()
    generate(url, steps=10, size=size)
    per_step = (time.monotonic() - start) / 10
    return max(16, min(100, math.ceil(target / per_step)))


def worker_pid(srv: Server, socket_name: str) -> int:
    """The pid of the gateway's local worker listening on ``socket_name`` (w0.sock: the first worker)."""
    for pid in srv.workers():
        with contextlib.suppress(OSError):
            if f"/{socket_name}\0" in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
    raise AssertionError(f"no worker on {socket_name} among {srv.workers()}")


def wait_health(port: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert proc.poll() is None, f"the worker exited with {proc.returncode}:\n{log.read_text()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("status") == "ready":
                return
        time.sleep(0.2)
    raise TimeoutError(f"the remote worker was not ready after {timeout}s:\n{log.read_text()}")


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """One demo pipeline on disk, shared by every worker of the module (created once, not by each worker)."""
    path = tmp_path_factory.mktemp("pool-data") / "models" / MODEL
    done = subprocess.run(
        [sys.executable, "-m", "app", "demo-model", str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return path


@dataclass
class Remote:
    port: int
    proc: subprocess.Popen
    config: Path

    @property
    def name(self) -> str:
        return f"remote-127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def remote(tmp_path_factory, model_path) -> Iterator[Remote]:
    """An `imagegate worker` on TCP, started before the gateways that use it, killed after them.

    It has no worker token: a gateway configured with one cannot use its own local workers (see
    :func:`test_local_workers_serve_jobs_when_a_worker_token_is_set`), and the token on TCP is test_remote.py's.
    """
    tmp = tmp_path_factory.mktemp("remote")
    port = free_port()
    config = write_config(tmp / "worker.json", model_path, devices=[], remote=[f"127.0.0.1:{port}"])
    log = tmp / "worker.log"
    cmd = [sys.executable, "-m", "app", "worker", "--device", "cpu", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--config", str(config), "--model", MODEL]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **SHARE})
    try:
        wait_health(port, proc, log)
        yield Remote(port, proc, config)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=30)


@dataclass
class Pool3:
    srv: Server
    remote: Remote
    steps: int

    @property
    def names(self) -> list[str]:
        return [*LOCAL, self.remote.name]


@pytest.fixture(scope="module")
def pool3(tmp_path_factory, model_path, remote) -> Iterator[Pool3]:
    """A gateway with two local workers (local-cpu, local-cpu-2) and the remote worker.

    Routing is ``least_work`` (a full scan), so requests of equal work spread one per backend by construction: the
    tests need to know that every backend got one. The default, power of two choices, may pick two busy backends
    out of three.
    """
    tmp = tmp_path_factory.mktemp("pool3")
    config = write_config(
        tmp / "imagegate.json",
        model_path,
        devices=["cpu", "cpu"],
        remote=[f"127.0.0.1:{remote.port}"],
        routing="least_work",
    )
    srv = Server(tmp, "--config", str(config), env=SHARE)
    try:
        srv.wait_ready(timeout=300)  # one ready backend is enough for /ready: wait for all three
        assert sorted(backends(srv.url)) == sorted([*LOCAL, remote.name])
        wait_for(
            "every backend is ready",
            lambda: all(b["state"] == "ready" for b in backends(srv.url).values()),
            timeout=300,
            interval=0.2,
        )
        assert len(srv.workers()) == 2
        yield Pool3(srv, remote, long_steps(srv.url))
    finally:
        srv.stop()


# -- 1. spread ----------------------------------------------------------------------------------------------------


def test_concurrent_requests_spread_over_two_local_workers_and_a_remote_one(pool3):
    url = pool3.srv.url
    before = requests_by_backend(url, pool3.names)
    barrier = threading.Barrier(6)

    def one(_: int) -> int:
        barrier.wait()
        return generate(url, steps=8)

    with ThreadPoolExecutor(6) as ex:
        assert list(ex.map(one, range(6))) == [1] * 6
    after = requests_by_backend(url, pool3.names)
    delta = {b: after[b] - before[b] for b in pool3.names}
    assert all(d > 0 for d in delta.values()), f"a backend got no request: {delta}"
    assert sum(delta.values()) == 6, f"each request counts once on one backend: {delta}"


# -- 2. kill -9 mid-stream ------------------------------------------------------------------------------------------


def test_kill_9_of_a_local_worker_mid_stream(pool3):
    srv, url, names = pool3.srv, pool3.srv.url, pool3.names
    gateway = srv.proc.pid
    victim_name = "local-cpu"
    victim = worker_pid(srv, "w0.sock")
    restarts = counter(url, "imagegate_worker_restarts_total", backend=victim_name)
    retries = counter(url, "imagegate_retries_total", model=MODEL)
    sent_before = requests_by_backend(url, names)

    with ThreadPoolExecutor(6) as ex:
        # One long stream on each backend (least_work: idle backends first), each past its first partial image.
        running = [Stream(url, pool3.steps) for _ in names]
        futures = [ex.submit(s.run) for s in running]
        for s in running:
            assert s.first_partial.wait(240), "no partial image"
        assert all(s.error is None and not s.done.is_set() for s in running), (
            f"a long stream ended before the kill (steps={pool3.steps}): {[(s.events, s.error) for s in running]}"
        )
        # Then one short job queued behind each of them: the least-loaded backend, one by one.
        queued: list[Future[int]] = [ex.submit(generate, url, 4) for _ in names]
        wait_for(
            "each backend runs one job and has one queued",
            lambda: all(b["outstanding"] == 2 and b["queued"] == 1 for b in backends(url).values()),
            timeout=30,
            interval=0.02,
        )
        assert not any(s.done.is_set() for s in running), "a long stream ended before the kill: raise its steps"

        os.kill(victim, signal.SIGKILL)

        results = [f.result(timeout=300) for f in futures]
        images = [f.result(timeout=300) for f in queued]

    failed = [s for s in results if s.error is not None]
    assert len(failed) == 1, f"exactly the killed worker's stream fails: {[(s.events, s.error) for s in results]}"
    [broken] = failed
    assert isinstance(broken.error, openai.APIError), repr(broken.error)
    assert broken.events and set(broken.events) == {"image_generation.partial_image"}, broken.events
    assert "closed the stream" in str(broken.error), broken.error
    assert all(s.complete for s in results if s is not broken), [s.events for s in results]
    assert images == [1, 1, 1], "the job queued on the killed worker moves to another backend and succeeds"
    assert counter(url, "imagegate_retries_total", model=MODEL) >= retries + 1
    sent = requests_by_backend(url, names)
    assert sum(sent.values()) - sum(sent_before.values()) == 7, f"6 requests and 1 retry: {sent_before} -> {sent}"

    # The supervisor restarts it; the gateway stays the same process.
    wait_for(f"{victim_name} is ready again", lambda: backends(url)[victim_name]["state"] == "ready", timeout=240)
    assert ready(url)[0] == 200
    assert counter(url, "imagegate_worker_restarts_total", backend=victim_name) == restarts + 1
    assert srv.proc.poll() is None and srv.proc.pid == gateway
    restarted = worker_pid(srv, "w0.sock")
    assert restarted != victim and not alive(victim)

    # And it serves again: three concurrent jobs take one backend each (least_work), so one lands on it.
    served_before = counter(url, "imagegate_backend_requests_total", backend=victim_name)
    for _ in range(5):
        with ThreadPoolExecutor(3) as ex:
            assert list(ex.map(lambda _: generate(url, 8), range(3))) == [1, 1, 1]
        if counter(url, "imagegate_backend_requests_total", backend=victim_name) > served_before:
            break
    else:
        raise AssertionError(f"{victim_name} got no request after its restart: {requests_by_backend(url, names)}")
    assert backends(url)[victim_name]["recent_failures"] == 0


# -- 4. a hung remote worker ------------------------------------------------------------------------------------


def test_a_frozen_remote_worker_gets_a_deadline_not_a_hang(tmp_path, remote, model_path):
    timeout = 8  # small, yet enough for a 4-step job on a busy 2-core machine once the worker is thawed
    config = write_config(
        tmp_path / "imagegate.json",
        model_path,
        devices=[],
        remote=[f"127.0.0.1:{remote.port}"],
        request_timeout=timeout,
        worker_token=TOKEN,  # sent, and ignored by a worker without one
    )
    srv = Server(tmp_path, "--config", str(config))
    try:
        srv.wait_ready(timeout=120)
        remote.proc.send_signal(signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(2) as ex:
                start = time.monotonic()
                plain = ex.submit(
                    httpx.post,
                    f"{srv.url}/v1/images/generations",
                    json={"model": MODEL, "prompt": "p", "size": "64x64", "num_inference_steps": 4},
                    timeout=60,
                )
                streamed = ex.submit(Stream(srv.url, 4).run)
                r = plain.result(timeout=90)
                s = streamed.result(timeout=90)
                elapsed = time.monotonic() - start
            assert r.status_code == 504, r.text
            assert r.json()["error"]["code"] == "timeout"
            assert isinstance(s.error, openai.APIError) and s.events == [], (s.events, s.error)
            assert f"within {timeout} seconds" in str(s.error), s.error
            assert elapsed < timeout + 10, f"the requests took {elapsed:.1f}s with request_timeout = {timeout}"
            # The health probes find it unreachable meanwhile: out of the pool, new requests get 503 at once.
            wait_for("the frozen worker is out of the pool", lambda: ready(srv.url)[0] == 503, timeout=30)
            r = httpx.post(f"{srv.url}/v1/images/generations", json={"prompt": "p", "size": "64x64"}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
        finally:
            remote.proc.send_signal(signal.SIGCONT)
        wait_for("the thawed worker is back", lambda: ready(srv.url)[0] == 200, timeout=60)
        # Once it has worked off what reached it while frozen, it serves within the deadline again.
        health = f"http://127.0.0.1:{remote.port}/health"
        wait_for(
            "the thawed worker is idle",
            lambda: (h := httpx.get(health, timeout=10).json())["running"] == 0 and h["queued"] == 0,
            timeout=120,
            interval=0.2,
        )
        for attempt in range(3):  # a busy 2-core machine may still miss the small deadline now and then
            try:
                assert generate(srv.url) == 1
                break
            except openai.InternalServerError as e:
                assert e.status_code == 504 and attempt < 2, e
    finally:
        srv.stop()


def test_a_job_the_gateway_gave_up_on_is_not_run_for_nobody(tmp_path, remote, model_path):
    """A job that reached a frozen worker, whose request then timed out at the gateway, must not run once thawed.

    BUG: the worker's /v1/generate handler submits the job to the engine before it sends its response headers, and
    cancels it only in a ``finally`` that begins after them (app/worker/server.py, ``generate``: ``submit`` then
    ``await response.prepare(request)`` then ``try: ... finally: job.cancel()``). When the gateway already hung up,
    ``prepare`` raises (ClientConnectionResetError: Cannot write to closing transport) and the job runs to the end
    for nobody, keeping the worker busy (the next request on it may miss its deadline too).
    """
    config = write_config(
        tmp_path / "imagegate.json", model_path, devices=[], remote=[f"127.0.0.1:{remote.port}"], request_timeout=3
    )
    health = f"http://127.0.0.1:{remote.port}/health"
    srv = Server(tmp_path, "--config", str(config))
    try:
        srv.wait_ready(timeout=120)
        wait_for(
            "the worker is idle",
            lambda: (h := httpx.get(health, timeout=10).json())["running"] == 0 and h["queued"] == 0,
            timeout=120,
        )
        before = httpx.get(health, timeout=10).json()
        remote.proc.send_signal(signal.SIGSTOP)
        try:
            body = {"model": MODEL, "prompt": "p", "size": "64x64", "num_inference_steps": 20}
            r = httpx.post(f"{srv.url}/v1/images/generations", json=body, timeout=60)
            assert r.status_code == 504, r.text
        finally:
            remote.proc.send_signal(signal.SIGCONT)
        wait_for(
            "the thawed worker is idle",
            lambda: (h := httpx.get(health, timeout=10).json())["running"] == 0 and h["queued"] == 0,
            timeout=300,
            interval=0.2,
        )
        after = httpx.get(health, timeout=10).json()
        assert after["completed"] == before["completed"], (
            "BUG: the worker ran to the end a job whose request had timed out at the gateway "
            f"(completed {before['completed']} -> {after['completed']}, cancelled {after['cancelled']})"
        )
    finally:
        srv.stop()


# -- 3. drain on SIGTERM ----------------------------------------------------------------------------------------


def start_single(tmp_path: Path, model_path: Path, **settings: object) -> Server:
    config = write_config(tmp_path / "imagegate.json", model_path, devices=["cpu"], remote=[], **settings)
    return Server(tmp_path, "--config", str(config))


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path, model_path):
    srv = start_single(tmp_path, model_path, drain_timeout=300)
    workers: list[int] = []
    try:
        srv.wait_ready(timeout=240)
        workers = srv.workers()
        steps = long_steps(srv.url)
        with ThreadPoolExecutor(1) as ex:
            stream = Stream(srv.url, steps)
            future = ex.submit(stream.run)
            assert stream.first_partial.wait(240) and stream.error is None, stream.error
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(
                "/ready says draining", lambda: ready(srv.url)[1]["status"] == "draining", timeout=10, interval=0.02
            )
            r = httpx.post(f"{srv.url}/v1/images/generations", json={"prompt": "p", "size": "64x64"}, timeout=10)
            code, body = ready(srv.url)
            assert not stream.done.is_set(), f"the stream ended before the checks (steps={steps}): raise its steps"
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "model_unavailable" and "shutting down" in error["message"], error
            assert set(error) >= {"message", "type", "param", "code"}
            assert code == 503 and body["status"] == "draining"
            future.result(timeout=300)
        assert stream.complete, (stream.events, stream.error)
        srv.proc.wait(timeout=60)  # on its own: nothing is left in flight
        assert srv.proc.returncode in (0, -signal.SIGTERM)
        wait_for("the workers are gone", lambda: not any(alive(p) for p in workers), timeout=15)
        assert "Application shutdown complete" in srv.log.read_text()
    finally:
        srv.stop()
        kill_all(workers)


def test_drain_timeout_stops_a_long_request(tmp_path, model_path):
    drain_timeout = 2.0
    srv = start_single(tmp_path, model_path, drain_timeout=drain_timeout)
    workers: list[int] = []
    try:
        srv.wait_ready(timeout=240)
        workers = srv.workers()
        big = "256x256"  # 100 steps of it outlast the drain timeout even on an idle machine
        steps = long_steps(srv.url, target=60, size=big)
        with ThreadPoolExecutor(1) as ex:
            stream = Stream(srv.url, steps, big)
            future = ex.submit(stream.run)
            assert stream.first_partial.wait(240) and stream.error is None, stream.error
            assert not stream.done.is_set()
            start = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            srv.proc.wait(timeout=drain_timeout + 25)
            exited = time.monotonic() - start
            future.result(timeout=30)
            ended = time.monotonic() - start
        bug = (
            "BUG: a worker busy with a job ignores SIGTERM (Engine.stop leaves the running job on the engine thread "
            "and the worker waits for its handler), so the supervisor SIGKILLs it only after its own 10 s timeout"
        )
        assert exited < drain_timeout + 8, f"the gateway took {exited:.1f}s to exit with drain_timeout = 2. {bug}"
        assert ended < drain_timeout + 8, f"the stream hung for {ended:.1f}s after SIGTERM. {bug}"
        assert "image_generation.completed" not in stream.events, "the job cannot have finished in time"
        # An error event (openai.APIError), or the connection broke off (httpx); not a hang, nor a completed image.
        assert isinstance(stream.error, openai.APIError | httpx.HTTPError), repr(stream.error)
        wait_for("the workers are gone", lambda: not any(alive(p) for p in workers), timeout=15)
    finally:
        srv.stop()
        kill_all(workers)


# -- a bug ------------------------------------------------------------------------------------------------------


def test_local_workers_serve_jobs_when_a_worker_token_is_set(tmp_path, model_path):
    """``worker_token`` is for workers on TCP, yet the local workers (Unix sockets) demand it too.

    The supervisor passes the gateway's settings file to each local worker, and ``imagegate worker`` takes
    ``settings.worker_token`` as its token whatever it listens on (app/cli.py, ``token=token or
    settings.worker_token``); but the supervisor's WorkerBackend for a local worker sends no token
    (app/pool/supervisor.py, ``WorkerBackend(name, f"unix:{sock}", connect_timeout=5.0)``). /health needs no token,
    so the worker counts as ready, and every job it gets is refused with 401: 502 for the client, or a retry on a
    remote worker and, after three failures, a cooldown of the local worker.
    """
    config = write_config(tmp_path / "imagegate.json", model_path, devices=["cpu"], remote=[], worker_token=TOKEN)
    srv = Server(tmp_path, "--config", str(config))
    try:
        srv.wait_ready(timeout=240)
        r = httpx.post(
            f"{srv.url}/v1/images/generations",
            json={"model": MODEL, "prompt": "p", "size": "64x64", "num_inference_steps": 2},
            timeout=120,
        )
        assert r.status_code == 200, (
            f"BUG: with worker_token set, the local worker refuses the gateway's jobs: {r.status_code} {r.text}"
        )
    finally:
        srv.stop()
