from __future__ import annotations

import importlib.util
import os

import msgspec

from app.config import demo_model, load_settings
from app.pool import Pool, State
from app.pool.supervisor import LocalWorker, Supervisor


async def test_local_devices_without_the_worker_extra_are_down_with_a_reason(tmp_path, monkeypatch, caplog):
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path)})
    pool = Pool(settings.models)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    supervisor = Supervisor(settings, pool, tmp_path / "run")
    await supervisor.start()
    [member] = pool.members
    assert member.state is State.DOWN and member.detail == "the worker extra is not installed"
    assert supervisor.workers == [], "no process may be spawned"
    assert "install imagegate[worker]" in caplog.text
    await supervisor.stop()


def _workers_environment(tmp_path, monkeypatch, devices: list[str], cores: int) -> dict[str, str | None]:
    """Each local worker's OMP_NUM_THREADS (None: the environment is inherited unchanged) on a host of ``cores``."""
    demo = msgspec.to_builtins(demo_model(str(tmp_path)))
    models = [{**demo, "devices": devices}]
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "models": models})
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    supervisor = Supervisor(settings, Pool(settings.models), tmp_path / "run")
    environments = {}
    for device, k in supervisor._layout():
        env = supervisor._environment(LocalWorker(device, [], tmp_path / "w.sock", member=None))  # type: ignore[arg-type]
        environments[Supervisor._name(device, k)] = None if env is None else env["OMP_NUM_THREADS"]
    return environments


def test_cpu_workers_share_the_cores_of_the_host(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _workers_environment(tmp_path, monkeypatch, ["cpu"], 8) == {"local-cpu": "8"}
    assert _workers_environment(tmp_path, monkeypatch, ["cpu", "cpu"], 8) == {"local-cpu": "4", "local-cpu-2": "4"}
    assert _workers_environment(tmp_path, monkeypatch, ["cpu"] * 3, 2) == {
        "local-cpu": "1",
        "local-cpu-2": "1",
        "local-cpu-3": "1",
    }
    # GPU workers keep the environment as it is, and do not count against the CPU workers' share.
    assert _workers_environment(tmp_path, monkeypatch, ["cuda:0", "cpu"], 8) == {"local-cuda0": None, "local-cpu": "8"}


def test_an_operator_set_thread_count_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _workers_environment(tmp_path, monkeypatch, ["cpu", "cpu"], 8) == {"local-cpu": None, "local-cpu-2": None}


def test_workers_inherit_the_otel_variables_under_their_own_service_name(tmp_path, monkeypatch):
    demo = msgspec.to_builtins(demo_model(str(tmp_path)))
    settings = load_settings(
        environ={}, overrides={"data_dir": str(tmp_path), "models": [{**demo, "devices": ["cuda:0"]}]}
    )
    supervisor = Supervisor(settings, Pool(settings.models), tmp_path / "run")
    worker = LocalWorker("cuda:0", [], tmp_path / "w.sock", member=None)  # type: ignore[arg-type]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    assert supervisor._environment(worker) is None, "inherited as it is: the worker names itself imagegate-worker"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "images-eu")
    env = supervisor._environment(worker)
    assert env is not None and env["OTEL_SERVICE_NAME"] == "images-eu-worker"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4318"
