"""Recovery after kill -9 of a local worker: how long until the pool serves from it again.

Each measurement starts with ``kill -9`` of a warm worker of ``imagegate serve`` (demo model, CPU) and polls, every
20 ms, the gateway's ``/ready`` and the process table:

- detect: until ``/ready`` no longer shows the worker's backend ready (the supervisor saw its process exit);
- respawn: until a new worker process exists (the supervisor's restart backoff, 1 s for a first crash);
- ready: until ``/ready`` shows the backend ready again (the new process loaded the model and answered its health);
- served: until a request sent from then on was served by it: its ``imagegate_backend_requests_total`` grew and
  the request got its image (64x64, 4 steps).

Two series:

- isolated: each kill on a freshly started ``serve`` (the backoff starts at 1 s), after two warm-up requests: what
  one crash costs;
- crash loop: ``--loop`` kills on one server, each as soon as the previous restart served a request: a worker that
  dies within 60 s of its start is restarted after a doubled wait (1, 2, 4, 8 s ... up to
  ``worker_restart_max_backoff``), so recovery grows kill after kill by design.

With ``--workers 2`` the model runs on two local workers (``devices = ["cpu", "cpu"]``, ``least_work`` routing) and
the first one (local-cpu) is killed; requests go on to the other meanwhile (counted as ``served_by_other``), and
"served" tries send two concurrent requests so that one lands on the restarted worker.

Usage: ``python benchmarks/recovery.py [--reps 3] [--loop 4] [--workers 1]`` (a few minutes on 2 cores); writes
``benchmarks/results/recovery.json`` and ``recovery.png`` (``--out`` for another place).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, children, start_server, stop
from plot import line_chart

MODEL = "imagegate-demo"
BACKEND = "local-cpu"
BODY = {"model": MODEL, "prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 4}
POLL = 0.02
TIMEOUT = 300.0
PHASES = ("detect", "respawn", "ready", "served")


def backend_state(url: str) -> str | None:
    try:
        r = httpx.get(f"{url}/ready", timeout=5)
    except httpx.HTTPError:
        return None
    return next((b["state"] for b in r.json()["backends"] if b["name"] == BACKEND), None)


def counter(url: str, name: str) -> float:
    prefix = f'{name}{{backend="{BACKEND}"}} '
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def request(url: str) -> bool:
    r = httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=120)
    return r.status_code == 200 and len(r.json()["data"]) == 1


def worker_pid(gateway: int) -> int:
    """The local-cpu worker: the gateway's child on the first socket (w0.sock)."""
    for pid in children(gateway):
        try:
            if "/w0.sock\0" in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
        except OSError:
            continue
    raise RuntimeError("no local-cpu worker found")


def measure(proc, url: str, workers: int) -> dict:
    """kill -9 local-cpu and time each phase of its recovery (seconds from the kill)."""
    victim = worker_pid(proc.pid)
    out: dict = {}
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while "ready" not in out:
        now = time.monotonic() - t0
        if now > TIMEOUT:
            raise RuntimeError(f"not recovered after {TIMEOUT}s: {out}")
        state = backend_state(url)
        if "detect" not in out and state != "ready":
            out["detect"] = now
        if "respawn" not in out:
            try:
                if worker_pid(proc.pid) != victim:  # a zombie's cmdline is empty: the victim is never found again
                    out["respawn"] = now
            except RuntimeError:
                pass
        if "detect" in out and state == "ready":
            out["ready"] = now
        time.sleep(POLL)
    before = counter(url, "imagegate_backend_requests_total")
    tries = 0
    with ThreadPoolExecutor(workers) as ex:
        while True:
            tries += 1
            ok = all(ex.map(lambda _: request(url), range(workers)))
            if ok and counter(url, "imagegate_backend_requests_total") > before:
                out["served"] = time.monotonic() - t0
                break
            if time.monotonic() - t0 > TIMEOUT:
                raise RuntimeError(f"not served after {TIMEOUT}s: {out}")
    out = {k: round(v, 3) for k, v in out.items()}
    out["served_tries"] = tries
    out["restarts_total"] = counter(url, "imagegate_worker_restarts_total")
    return out


def measure_with_traffic(proc, url: str, workers: int) -> dict:
    """``measure``, plus (two workers) requests sent meanwhile to see the other worker serve them."""
    if workers == 1:
        return measure(proc, url, workers)
    done = []
    stop_flag = []

    def traffic() -> None:
        while not stop_flag:
            done.append(request(url))

    with ThreadPoolExecutor(1) as ex:
        ex.submit(traffic)
        try:
            out = measure(proc, url, workers)
        finally:
            stop_flag.append(True)
    out["served_by_other"] = {"ok": sum(done), "failed": len(done) - sum(done)}
    return out


def server_args(data_dir: Path, workers: int) -> list[str]:
    if workers == 1:
        return []
    sys.path.insert(0, str(ROOT))
    import msgspec

    from app.config import demo_model

    model = msgspec.to_builtins(demo_model(str(data_dir)))
    model["devices"] = ["cpu"] * workers
    config = data_dir / "imagegate.json"
    config.write_text(json.dumps({"routing": "least_work", "models": [model]}))
    return ["--config", str(config)]


def summary(runs: list[dict]) -> dict:
    return {
        phase: {
            "median": round(statistics.median(r[phase] for r in runs), 3),
            "min": round(min(r[phase] for r in runs), 3),
            "max": round(max(r[phase] for r in runs), 3),
        }
        for phase in PHASES
        if all(phase in r for r in runs)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="isolated kills, each on a fresh server")
    parser.add_argument("--loop", type=int, default=4, help="consecutive kills on one server (0: none)")
    parser.add_argument("--workers", type=int, default=1, choices=(1, 2), help="local workers of the demo model")
    parser.add_argument("--out", type=Path, default=RESULTS / "recovery.json", help="JSON file (the PNG beside it)")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="imagegate-recovery-"))
    extra = server_args(data_dir, args.workers)
    out: dict = {"cpus": os.cpu_count(), "workers": args.workers, "request": BODY, "poll_seconds": POLL}
    isolated: list[dict] = []
    loop: list[dict] = []
    startups: list[float] = []
    try:
        for rep in range(args.reps):
            proc, url, started = start_server(data_dir, *extra)
            startups.append(round(started, 2))
            try:
                for _ in range(2):
                    assert request(url)
                run = measure_with_traffic(proc, url, args.workers)
            finally:
                stop(proc)
            print(f"isolated {rep + 1}/{args.reps}: {run}", flush=True)
            isolated.append(run)
        if args.loop:
            proc, url, started = start_server(data_dir, *extra)
            startups.append(round(started, 2))
            try:
                for _ in range(2):
                    assert request(url)
                for k in range(args.loop):
                    run = measure_with_traffic(proc, url, args.workers)
                    print(f"crash loop {k + 1}/{args.loop}: {run}", flush=True)
                    loop.append(run)
            finally:
                stop(proc)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    out["startup_seconds"] = startups
    out["isolated"] = {"runs": isolated, "summary": summary(isolated)} if isolated else None
    out["crash_loop"] = {"runs": loop} if loop else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"isolated": out["isolated"] and out["isolated"]["summary"]}, indent=2))
    print(chart(out, args.out.with_suffix(".png")))


def chart(out: dict, path: Path) -> Path:
    series = {}
    if out["isolated"]:
        runs = out["isolated"]["runs"]
        xs = list(range(1, len(runs) + 1))
        series["isolated (fresh server): ready"] = (xs, [r["ready"] for r in runs])
        series["isolated (fresh server): served"] = (xs, [r["served"] for r in runs])
    if out["crash_loop"]:
        runs = out["crash_loop"]["runs"]
        xs = list(range(1, len(runs) + 1))
        series["crash loop (one server): ready"] = (xs, [r["ready"] for r in runs])
        series["crash loop (one server): served"] = (xs, [r["served"] for r in runs])
    s = out["isolated"] and out["isolated"]["summary"]
    title = f"Recovery after kill -9 of a worker (demo model, {out['workers']} local worker(s), {out['cpus']} cores)"
    if s:
        title += f"\nisolated median: ready {s['ready']['median']:.1f} s, served {s['served']['median']:.1f} s"
    return line_chart(path, title, series, "kill #", "seconds from kill -9")


if __name__ == "__main__":
    main()
