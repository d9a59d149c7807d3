"""What imagegate costs on top of a raw diffusers call, on the demo model (CPU).

Measures, in one run:
- start-up of ``imagegate serve`` until ``/ready`` (first start creates the demo model; second reuses it);
- resident memory of the gateway process and of its worker process;
- wall time of a raw ``pipe(...)`` call vs the same request through the gateway (256x256, 20 steps), interleaved;
- the cost of one partial image relative to one denoising step: inside the worker (decode on the denoising
  thread, encode on the encoder thread) and end to end (a stream with 2 partial images vs none);
- throughput vs concurrency: bursts of ``--images`` requests from 1, 2, 4, 8 concurrent clients through the gateway
  with its default settings (dynamic batching on), images/s, against raw sequential ``pipe(...)`` calls in this
  process (images/s, the reference line), alternated round by round; and the batch sizes the gateway's ``/metrics``
  reports at each level.

Target: through imagegate, at least 0.97x raw diffusers throughput.

Usage: ``python benchmarks/demo_cpu.py [--reps 7] [--rounds 2] [--images 8] [--levels 1,2,4,8]`` (about 5 minutes
on 2 cores; ``--reps 3 --rounds 1`` for a short run); writes ``benchmarks/results/demo_cpu.json`` and
``demo_cpu.png`` (throughput vs concurrency).
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

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, children, concurrent_block, histogram_delta, proc_status_mb, scrape, start_server, stop
from plot import line_chart

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
SIZE, STEPS = 256, 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="interleaved raw / gateway latency repetitions")
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds (each: raw block, every level)")
    parser.add_argument("--images", type=int, default=8, help="images per throughput block at every level")
    parser.add_argument("--levels", default="1,2,4,8", help="concurrent clients, comma-separated")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    data_dir = Path(tempfile.mkdtemp(prefix="imagegate-bench-"))
    out: dict = {"size": f"{SIZE}x{SIZE}", "steps": STEPS, "reps": args.reps, "cpus": os.cpu_count()}
    try:
        proc, _, cold = start_server(data_dir)
        stop(proc)
        proc, url, warm = start_server(data_dir)
        out["startup_seconds"] = {"first_start_creating_demo_model": round(cold, 2), "later_start": round(warm, 2)}

        import torch
        from diffusers import DiffusionPipeline

        from app.worker.pipelines import quiet_libraries
        from app.worker.previews import Previewer, X0Tracker, encode_image

        quiet_libraries()
        pipe = DiffusionPipeline.from_pretrained(str(data_dir / "models" / "imagegate-demo"))
        pipe.set_progress_bar_config(disable=True)

        def raw(seed: int) -> float:
            t = time.perf_counter()
            image = pipe(
                "a red fox",
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                generator=[torch.Generator("cpu").manual_seed(seed)],
                output_type="pil",
            ).images[0]
            encode_image(image, "png", None)
            return time.perf_counter() - t

        body = {"prompt": "a red fox", "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS}
        client = httpx.Client(base_url=url, timeout=300)

        def gateway(seed: int, partials: int | None = None) -> float:
            t = time.perf_counter()
            if partials is None:
                r = client.post("/v1/images/generations", json={**body, "seed": seed})
                r.raise_for_status()
            else:
                stream = {**body, "seed": seed, "stream": True, "partial_images": partials}
                with client.stream("POST", "/v1/images/generations", json=stream) as r:
                    r.raise_for_status()
                    text = "".join(r.iter_text())
                assert text.count("image_generation.partial_image\n") == partials
            return time.perf_counter() - t

        raw(0), gateway(0), gateway(0, 0), gateway(0, 2)  # warm-up
        runs: dict[str, list[float]] = {"raw": [], "gateway": [], "stream_0_partials": [], "stream_2_partials": []}
        variants = {
            "raw": raw,
            "gateway": gateway,
            "stream_0_partials": lambda i: gateway(i, 0),
            "stream_2_partials": lambda i: gateway(i, 2),
        }
        for i in range(args.reps):  # interleaved, so drift and noise hit every variant alike
            for name, run in variants.items():
                # Two processes share 2 cores: let the other one's OpenMP threads stop spinning first.
                time.sleep(0.5)
                runs[name].append(run(i))
        med = {k: statistics.median(v) for k, v in runs.items()}
        best = {k: min(v) for k, v in runs.items()}
        out["wall_seconds_median"] = {k: round(v, 4) for k, v in med.items()}
        out["wall_seconds_best"] = {k: round(v, 4) for k, v in best.items()}
        out["wall_seconds_all"] = {k: [round(x, 4) for x in v] for k, v in runs.items()}
        # Medians and bests both: on a noisy shared VM the best of N is the steadier estimate of the cost floor.
        out["gateway_over_raw"] = {
            "median": round(med["gateway"] / med["raw"], 4),
            "best": round(best["gateway"] / best["raw"], 4),
        }

        [worker] = children(proc.pid)
        out["rss_mb"] = {"gateway": round(proc_status_mb(proc.pid), 1), "worker": round(proc_status_mb(worker), 1)}
        out["throughput"] = throughput(raw, url, body, levels, args.rounds, args.images)

        # Inside the worker: a step's time vs a preview's decode (on the denoising thread) and encode (off it).
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        job_pipe = type(pipe).from_pipe(pipe, scheduler=scheduler)
        job_pipe.set_progress_bar_config(disable=True)
        tracker = X0Tracker(scheduler)
        tracker.wanted = True
        previewer = Previewer.for_pipeline(pipe, "vae", 1, "")
        last, step_times, decode_s, encode_s = [0.0], [], [], []

        def on_step(p, i, t, kw):
            now = time.perf_counter()
            if i > 0:  # step 0 also carries the prompt encoding
                step_times.append(now - last[0])
            last[0] = now
            if i in (6, 13):
                t0 = time.perf_counter()
                pictures = previewer(tracker.latest, SIZE, SIZE)
                t1 = time.perf_counter()
                encode_image(pictures[0], "png", None, fast=True)
                decode_s.append(t1 - t0)
                encode_s.append(time.perf_counter() - t1)
                last[0] = time.perf_counter()  # previews are not part of the next step's time
            return kw

        for _ in range(3):
            last[0] = time.perf_counter()
            job_pipe(
                "a red fox",
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                callback_on_step_end=on_step,
                output_type="latent",
            )
        step_s = statistics.median(step_times)
        out["preview"] = {
            "step_seconds": round(step_s, 4),
            "decode_seconds_on_denoising_thread": round(statistics.median(decode_s), 4),
            "encode_seconds_off_thread": round(statistics.median(encode_s), 4),
            "decode_in_steps": round(statistics.median(decode_s) / step_s, 3),
            "end_to_end_cost_of_one_partial_in_steps_best": round(
                (best["stream_2_partials"] - best["stream_0_partials"]) / 2 / step_s, 3
            ),
        }
        stop(proc)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    chart(out)
    print(json.dumps(out, indent=2))


def throughput(raw, url: str, body: dict, levels: list[int], rounds: int, images: int) -> dict:
    """Images/s through the gateway at each concurrency level vs raw sequential calls, alternated round by round."""
    concurrent_block(url, body, max(levels), 1, 90_000)  # warm-up: the largest batch shape once
    raw_rates: list[float] = []
    rates: dict[int, list[float]] = {c: [] for c in levels}
    batches: dict[int, list] = {c: [] for c in levels}
    for r in range(rounds):
        time.sleep(0.5)
        t = time.perf_counter()
        for i in range(images):
            raw(100_000 * (r + 1) + i)
        raw_rates.append(images / (time.perf_counter() - t))
        for c in levels:
            time.sleep(0.5)  # let this process's OpenMP threads stop spinning
            before = scrape(url)
            block = concurrent_block(url, body, c, max(1, images // c), 100_000 * (r + 1))
            batches[c].append(histogram_delta(before, scrape(url), "imagegate_batch_size", "imagegate-demo"))
            rates[c].append(block["images"] / block["seconds"])
    raw_rate = statistics.median(raw_rates)
    gateway = {c: statistics.median(v) for c, v in rates.items()}
    mean_batch = {}
    for c, hs in batches.items():
        counted = [h for h in hs if h and h["count"]]
        total = sum(h["count"] for h in counted)
        mean_batch[str(c)] = round(sum(h["mean"] * h["count"] for h in counted) / total, 2) if total else None
    return {
        "images_per_block": images,
        "rounds": rounds,
        "raw_sequential_images_per_s": round(raw_rate, 4),
        "raw_sequential_images_per_s_per_round": [round(x, 4) for x in raw_rates],
        "gateway_images_per_s": {str(c): round(v, 4) for c, v in gateway.items()},
        "gateway_images_per_s_per_round": {str(c): [round(x, 4) for x in v] for c, v in rates.items()},
        "gateway_over_raw_sequential": {str(c): round(v / raw_rate, 4) for c, v in gateway.items()},
        # Mean requests per pipeline call as the gateway's imagegate_batch_size saw them (None: not reported).
        "mean_batch_size": mean_batch,
        "batch_size_histograms": {str(c): hs for c, hs in batches.items()},
    }


def chart(out: dict) -> Path:
    tp = out["throughput"]
    levels = [int(c) for c in tp["gateway_images_per_s"]]
    series = {
        "imagegate (default settings)": (levels, list(tp["gateway_images_per_s"].values())),
        "raw diffusers, sequential": (levels, [tp["raw_sequential_images_per_s"]] * len(levels)),
    }
    title = (
        f"Demo model on CPU ({out['cpus']} cores), {out['size']}, {out['steps']} steps\n"
        f"one request through imagegate / raw pipe(): {out['gateway_over_raw']['median']:.3f} (median)"
    )
    return line_chart(RESULTS / "demo_cpu.png", title, series, "concurrent clients", "images/s")


if __name__ == "__main__":
    main()
