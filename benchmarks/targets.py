"""The processes the gateway benchmarks start: the stub, the thin proxy, LiteLLM and imagegate, plus what they share.

Every process is started here, pinned to the CPUs it is given, and stopped again by its own id (and the process
group it leads). LiteLLM lives in its own virtual environment (``benchmarks/.venv-litellm``), created and filled on
first use with ``pip install 'litellm[proxy]==LITELLM_VERSION'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, children, free_port, proc_status_mb, start_server, stop

BENCH = ROOT / "benchmarks"
LITELLM_VENV = BENCH / ".venv-litellm"
LITELLM_VERSION = "1.106.2"
"""Pinned: the version the project's anchors were measured with; installs here without torch or CUDA."""
CLK_TCK = os.sysconf("SC_CLK_TCK")

LITELLM_ENV = {
    # No network at start-up: the bundled model cost map instead of a fetch from GitHub.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    # Documented production mode: no .env loading.
    "LITELLM_MODE": "PRODUCTION",
    # LiteLLM's own logger at its documented production level (errors only); default is WARNING.
    "LITELLM_LOG": "ERROR",
}
LITELLM_SETTINGS = {
    "general_settings": {
        "master_key": "os.environ/LITELLM_MASTER_KEY",
        # There is no database; these are the documented production switches for DB writes (no-ops here).
        "disable_spend_logs": True,
        "disable_error_logs": True,
    },
    "litellm_settings": {
        "set_verbose": False,  # documented "switch off debug logging" for production
        "request_timeout": 600,
        "telemetry": False,
        "callbacks": [],
        "success_callback": [],
        "failure_callback": [],
    },
}


@dataclass
class Proc:
    """A started server: its process, base URL and the CPUs it is pinned to."""

    name: str
    proc: subprocess.Popen
    url: str
    cpus: tuple[int, ...] = ()
    log: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.pid, *descendants(self.pid)]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def rss_mb(self, field: str = "VmRSS") -> float:
        total = 0.0
        for p in self.pids():
            with contextlib.suppress(OSError):
                total += proc_status_mb(p, field)
        return total


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_layout(pin: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(gateway CPUs, stub + load generator CPUs): split the CPUs we may use in two halves; none if not pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return (), ()
    half = len(cpus) // 2
    return tuple(cpus[:half]), tuple(cpus[half:])


def pin(pid: int, cpus: Sequence[int]) -> None:
    """Pin every thread of a process and of its descendants."""
    if not cpus:
        return
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


def _preexec(cpus: Sequence[int]):
    def run() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run


def spawn(
    cmd: Sequence[str], cpus: Sequence[int], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen:
    out = log.open("ab")
    try:
        return subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec(cpus),
            start_new_session=True,
        )
    finally:
        out.close()


def wait_http(url: str, proc: subprocess.Popen, timeout: float, headers: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, headers=headers).status_code == 200:
                return time.monotonic() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.1)


def kill(p: Proc | subprocess.Popen | None) -> None:
    """Stop a process we started (SIGTERM, then SIGKILL), and the process group it leads."""
    if p is None:
        return
    proc = p.proc if isinstance(p, Proc) else p
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:  # the leader is gone; its group may not be
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def start_stub(tmp: Path, cpus: Sequence[int]) -> Proc:
    port = free_port()
    log = tmp / "stub.log"
    proc = spawn([sys.executable, str(BENCH / "stub.py"), "--port", str(port)], cpus, log)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc, 60)
    return Proc("stub", proc, url, tuple(cpus), log)


def start_thin_proxy(tmp: Path, cpus: Sequence[int], routes: dict[str, str]) -> Proc:
    port = free_port()
    log = tmp / "thin_proxy.log"
    cmd = [sys.executable, str(BENCH / "thin_proxy.py"), "--port", str(port), "--routes", json.dumps(routes)]
    proc = spawn(cmd, cpus, log)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc, 60)
    return Proc("thin_proxy", proc, url, tuple(cpus), log)


def imagegate_config(path: Path, models: dict[str, str], *, concurrency: int = 2000, max_queue: int = 5000) -> Path:
    """A settings file serving each model (name -> stub base URL) through an upstream of the same name."""
    lines = ["sse_ping_interval = 15.0", ""]
    for name, base in models.items():
        lines += [
            "[[models]]",
            f'name = "{name}"',
            "devices = []",
            f"max_queue = {max_queue}",
            'default_size = "1024x1024"',
            "max_side = 1024",
            "",
            "[[upstreams]]",
            f'name = "{name}"',
            f'base_url = "{base}"',
            f'models = {{ "{name}" = "{name}" }}',
            f"concurrency = {concurrency}",
            "timeout = 120.0",
            "",
        ]
    path.write_text("\n".join(lines))
    return path


def start_imagegate(
    tmp: Path,
    cpus: Sequence[int],
    models: dict[str, str],
    *,
    name: str = "imagegate",
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Proc:
    """``imagegate serve`` with the stub's models as upstreams, pinned to ``cpus``.

    ``args``: more flags (``--log-level info``); ``env``: variables added to this process's environment
    (``OTEL_*``); ``log``: where its output goes (default: this process's stdout and stderr). Several can run side by
    side under different ``name``s (each has its own directory under ``tmp``).
    """
    where = tmp if name == "imagegate" else tmp / name
    where.mkdir(exist_ok=True)
    config = imagegate_config(where / "imagegate.toml", models)
    data = where / "imagegate-data"
    data.mkdir(exist_ok=True)
    environ = None if env is None else {**os.environ, **env}
    proc, url, seconds = start_server(data, "--config", str(config), *args, env=environ, timeout=120, log=log)
    pin(proc.pid, cpus)
    return Proc(name, proc, url, tuple(cpus), log, {"ready_s": round(seconds, 2), "config": config.read_text()})


def stop_imagegate(p: Proc | None) -> None:
    if p is not None:
        stop(p.proc)


# -- LiteLLM -------------------------------------------------------------------------------------------------------


def litellm_bin(name: str = "litellm") -> Path:
    return LITELLM_VENV / "bin" / name


def ensure_litellm(log=print) -> str:
    """Create ``benchmarks/.venv-litellm`` with the pinned LiteLLM unless it is there; returns the version."""
    if not litellm_bin().exists():
        log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (a minute or two) ...")
        python = os.environ.get("LITELLM_BASE_PYTHON", "python3")
        subprocess.run([python, "-m", "venv", str(LITELLM_VENV)], check=True)
        pip = [str(litellm_bin("pip")), "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    out = subprocess.run(
        [str(litellm_bin("python")), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    heavy = subprocess.run(
        [str(litellm_bin("python")), "-c", "import importlib.util as u; print(bool(u.find_spec('torch')))"],
        capture_output=True,
        text=True,
        check=True,
    )
    if heavy.stdout.strip() == "True":
        log("warning: torch is installed in the LiteLLM environment")
    return out.stdout.strip()


def litellm_config(path: Path, models: dict[str, str]) -> Path:
    """LiteLLM's proxy config (JSON, which its YAML loader reads): each model an ``openai/`` image model."""
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {"model": f"openai/{name}", "api_base": base, "api_key": "sk-stub"},
                "model_info": {"mode": "image_generation"},
            }
            for name, base in models.items()
        ],
        **LITELLM_SETTINGS,
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def start_litellm(tmp: Path, cpus: Sequence[int], models: dict[str, str]) -> Proc:
    config = litellm_config(tmp / "litellm.yaml", models)
    port = free_port()
    key = "sk-bench-" + secrets.token_hex(16)
    env = {**os.environ, **LITELLM_ENV, "LITELLM_MASTER_KEY": key}
    env.pop("DATABASE_URL", None)
    cmd = [
        str(litellm_bin()),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--keepalive_timeout",
        "120",
    ]
    log = tmp / "litellm.log"
    proc = spawn(cmd, cpus, log, env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    seconds = wait_http(f"{url}/health/liveliness", proc, 180)
    return Proc(
        "litellm",
        proc,
        url,
        tuple(cpus),
        log,
        {"ready_s": round(seconds, 2), "headers": {"authorization": f"Bearer {key}"}, "command": cmd[1:]},
    )


def quiesce(procs: Iterable[Proc], *, idle: float = 0.05, window: float = 0.3, limit: float = 30.0) -> float:
    """Wait until the processes use less than ``idle`` of a CPU over ``window``; returns the seconds waited."""
    procs = list(procs)
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        c0 = sum(p.cpu_seconds() for p in procs)
        time.sleep(window)
        if sum(p.cpu_seconds() for p in procs) - c0 < idle * window:
            break
    return time.monotonic() - t0
