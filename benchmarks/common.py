"""What the benchmark scripts share: starting and stopping a real `imagegate serve`, and reading process memory."""

from __future__ import annotations

import contextlib
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of ``/proc/PID/status`` in MB (VmRSS: now; VmHWM: peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux 4.0+: ``echo 5 > /proc/PID/clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def start_server(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300, log: Path | None = None
) -> tuple[subprocess.Popen, str, float]:
    """Start ``python -m app serve`` and wait for /ready; returns the process, its URL and the seconds it took.

    It logs at ``warning`` unless ``args`` say otherwise (a later ``--log-level`` wins), to ``log`` when given (else
    to this process's stdout and stderr).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "app", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    out = None if log is None else log.open("ab")
    try:
        proc = subprocess.Popen(
            [*cmd, "--log-level", "warning", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
    finally:
        if out is not None:
            out.close()
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url, time.monotonic() - t0
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            stop(proc)
            raise RuntimeError("the server did not become ready")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def concurrent_block(url: str, body: dict, clients: int, per_client: int, seed: int) -> dict:
    """``clients`` threads, each sending ``per_client`` requests back to back; images/s over the whole burst."""
    start = threading.Barrier(clients + 1)
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    with httpx.Client(base_url=url, timeout=3600, limits=limits) as client:

        def one_client(k: int) -> list[float]:
            start.wait()
            latencies = []
            for j in range(per_client):
                t = time.perf_counter()
                r = client.post("/v1/images/generations", json={**body, "seed": seed + k * per_client + j})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)
            return latencies

        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(one_client, k) for k in range(clients)]
            start.wait()
            t = time.perf_counter()
            latencies = [x for f in futures for x in f.result()]
            wall = time.perf_counter() - t
    return {"images": clients * per_client, "seconds": wall, "latency_median_s": statistics.median(latencies)}


def scrape(url: str) -> dict[str, float]:
    """The gateway's /metrics as sample name{labels} -> value (only the imagegate_* families)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name.startswith("imagegate_"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def histogram_delta(before: dict, after: dict, metric: str, model: str) -> dict | None:
    """Counts per bucket (not cumulative), mean and count of ``metric`` for ``model`` between two scrapes."""
    count_key = f"{metric}_count{{model={model}}}"
    if count_key not in after:
        return None
    count = after[count_key] - before.get(count_key, 0.0)
    total = after[f"{metric}_sum{{model={model}}}"] - before.get(f"{metric}_sum{{model={model}}}", 0.0)
    buckets = []
    prefix = f"{metric}_bucket{{le="
    for key, value in after.items():
        if key.startswith(prefix) and key.endswith(f",model={model}}}"):
            le = key[len(prefix) : -len(f",model={model}}}")]
            buckets.append((float(le), value - before.get(key, 0.0)))
    buckets.sort()
    per_bucket, previous = {}, 0.0
    for le, cumulative in buckets:
        if cumulative - previous:
            per_bucket["+Inf" if le == float("inf") else f"<={le:g}"] = int(cumulative - previous)
        previous = cumulative
    return {"count": int(count), "mean": round(total / count, 4) if count else None, "buckets": per_bucket}
