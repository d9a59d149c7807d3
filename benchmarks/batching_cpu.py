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
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, concurrent_block, histogram_delta, scrape, start_server, stop
from plot import bar_chart

from app.config import DEMO_MODEL, demo_model

SIZE, STEPS = 256, 20
MODES = ("batching", "no_batching")


BODY = {"model": DEMO_MODEL, "prompt": "a red fox", "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS}


def round_trip(url: str, concurrency: int, per_client: int, seed: int) -> float:
    """Images per second of ``concurrency`` clients each sending ``per_client`` requests back to back."""
    block = concurrent_block(url, BODY, concurrency, per_client, seed)
    return block["images"] / block["seconds"]


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
            round_trip(url, args.concurrency, 1, 0)
        before = {mode: scrape(url) for mode, url in urls.items()}
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                time.sleep(0.5)  # let the other process's OpenMP threads stop spinning
                rates[mode].append(round_trip(urls[mode], args.concurrency, args.per_client, 1000 * r))
                print(f"round {r + 1} {mode}: {rates[mode][-1]:.3f} images/s", flush=True)
        after = {mode: scrape(url) for mode, url in urls.items()}
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
        for path in dirs.values():
            shutil.rmtree(path, ignore_errors=True)
    median = {mode: statistics.median(v) for mode, v in rates.items()}
    seen = {mode: histogram_delta(before[mode], after[mode], "imagegate_batch_size", DEMO_MODEL) for mode in MODES}
    mean_batch = {mode: (seen[mode] or {}).get("mean") or 0.0 for mode in MODES}
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
