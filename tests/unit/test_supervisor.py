from __future__ import annotations

import importlib.util

from app.config import load_settings
from app.pool import Pool, State
from app.pool.supervisor import Supervisor


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
