"""Throughput with and without dynamic batching on the demo model (CPU), at a fixed concurrency.

Two ``imagegate serve`` processes run side by side: one with the defaults (batching on), one whose demo model has
``max_batch_pixels = 0`` (every request alone). Rounds alternate between them, so drift and noise hit both alike
(the idle one costs next to nothing). In a round, ``--concurrency`` client coroutines each send ``--per-client``
generations back to back (256x256, 20 steps, guidance 7.5); its throughput is images over wall time. Each server's
``imagegate_batch_size`` histogram gives the mean batch size its requests saw.

Usage: ``python benchmarks/batching_cpu.py [--rounds 3] [--concurrency 8] [--per-client 2] [--threads N]``;
writes ``benchmarks/results/batching_cpu.json`` and ``batching_cpu.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, start_server, stop
from plot import bar_chart

from app.config import DEMO_MODEL, demo_model

SIZE, STEPS = 256, 20
MODES = ("batching", "no_batching")


async def round_trip(url: str, concurrency: int, per_client: int, seed: int) -> float:
    """Images per second of ``concurrency`` clients each sending ``per_client`` requests back to back."""
    body = {"model": DEMO_MODEL, "prompt": "a red fox", "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS}

    async def client(http: httpx.AsyncClient, c: int) -> None:
        for i in range(per_client):
            r = await http.post("/v1/images/generations", json={**body, "seed": seed + c * per_client + i})
            r.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(concurrency)))
        return concurrency * per_client / (time.perf_counter() - t)


def batch_sizes(url: str) -> tuple[float, float]:
    """Count and sum of the demo model's ``imagegate_batch_size`` observations."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "imagegate_batch_size":
            for s in family.samples:
                if s.labels.get("model") == DEMO_MODEL and s.name.endswith(("_count", "_sum")):
                    values[s.name.rsplit("_", 1)[1]] = s.value
    return values.get("count", 0.0), values.get("sum", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=2, help="Requests each client sends per round.")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the servers (0: torch's own).")
    args = parser.parse_args()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    dirs = {mode: Path(tempfile.mkdtemp(prefix=f"imagegate-bench-{mode}-")) for mode in MODES}
    model = msgspec.to_builtins(demo_model(str(dirs["no_batching"])))
    config = dirs["no_batching"] / "settings.json"
    config.write_text(json.dumps({"models": [{**model, "max_batch_pixels": 0}]}))
    servers: dict[str, tuple] = {}
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        servers["batching"] = start_server(dirs["batching"], env=env)
        servers["no_batching"] = start_server(dirs["no_batching"], "--config", str(config), env=env)
        urls = {mode: server[1] for mode, server in servers.items()}
        for url in urls.values():  # warm-up
            asyncio.run(round_trip(url, args.concurrency, 1, 0))
        before = {mode: batch_sizes(url) for mode, url in urls.items()}
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                time.sleep(0.5)  # let the other process's OpenMP threads stop spinning
                rates[mode].append(asyncio.run(round_trip(urls[mode], args.concurrency, args.per_client, 1000 * r)))
                print(f"round {r + 1} {mode}: {rates[mode][-1]:.3f} images/s", flush=True)
        after = {mode: batch_sizes(url) for mode, url in urls.items()}
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
        for path in dirs.values():
            shutil.rmtree(path, ignore_errors=True)
    median = {mode: statistics.median(v) for mode, v in rates.items()}
    mean_batch = {
        mode: (after[mode][1] - before[mode][1]) / max(1.0, after[mode][0] - before[mode][0]) for mode in MODES
    }
    out = {
        "size": f"{SIZE}x{SIZE}",
        "steps": STEPS,
        "concurrency": args.concurrency,
        "requests_per_client_per_round": args.per_client,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "omp_num_threads": args.threads or None,
        "images_per_second_median": {k: round(v, 4) for k, v in median.items()},
        "images_per_second_all": {k: [round(x, 4) for x in v] for k, v in rates.items()},
        "batching_over_no_batching": round(median["batching"] / median["no_batching"], 3),
        "mean_batch_size": {k: round(v, 2) for k, v in mean_batch.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batching_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    title = (
        f"Throughput at concurrency {args.concurrency} (median of {args.rounds} rounds): "
        f"x{out['batching_over_no_batching']}\n"
        f"demo model on CPU, {SIZE}x{SIZE}, {STEPS} steps, through imagegate"
    )
    bars = {f"{mode.replace('_', ' ')}\n(mean batch {mean_batch[mode]:.1f})": median[mode] for mode in MODES}
    bar_chart(RESULTS / "batching_cpu.png", title, bars, "images / s")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
