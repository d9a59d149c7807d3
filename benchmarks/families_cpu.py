"""Each model family on a CPU: start-up, one denoising step, and one partial image relative to one step.

The tiny random-weight pipelines of ``tests/families.py`` (each family's real classes, latent shapes and published
scheduler config), saved and loaded with ``from_pretrained`` like any model, then, per family and in one run:

- start-up: ``load_model`` with only a name and a path, which loads the pipeline, finds its family and runs each of
  its schedulers once (two steps at 64x64: also the warm-up);
- one step: the median time between denoising steps of a 128x128 request (8 steps, through the worker's engine);
- one preview: the median time to decode and encode one partial image of those latents, and its ratio to a step.

Figures describe the serving path on tiny models, not the speed of the real ones.

Usage: ``python benchmarks/families_cpu.py [--reps 5]`` (about a minute on 2 cores); writes
``benchmarks/results/families_cpu.json`` and ``families_cpu.png`` (preview cost relative to a step).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: app and tests.families
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS
from plot import bar_chart

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
SIDE, STEPS = 128, 8


async def measure(family: str, path: Path, reps: int) -> dict:
    from app.config import ModelConfig
    from app.worker.engine import Engine
    from app.worker.previews import encode_image
    from app.worker.protocol import Done, Failed, GenerationParams, Progress

    config = ModelConfig(name=family, path=str(path))
    started = time.perf_counter()
    engine = Engine("cpu", [config])
    await engine.start()
    startup = time.perf_counter() - started
    loaded = engine.models[family]
    try:
        gaps: list[float] = []
        for seed in range(reps):
            params = GenerationParams(
                model=family, prompt="a red fox", width=SIDE, height=SIDE, steps=STEPS, guidance=4.0, seed=seed
            )
            job = engine.submit(params)
            stamps = []
            while True:
                event = await job.events.get()
                if isinstance(event, Progress):
                    stamps.append(time.perf_counter())
                if isinstance(event, Done | Failed):
                    break
            gaps += [b - a for a, b in itertools.pairwise(stamps)]
        step = statistics.median(gaps)
        preview = None
        if not loaded.previews_failed:
            latents = loaded.latents(None, SIDE, SIDE, 2)
            costs = []
            for _ in range(reps):
                t = time.perf_counter()
                [picture] = loaded.previewer(latents[:1], SIDE, SIDE)
                encode_image(picture, "png", None, fast=True)
                costs.append(time.perf_counter() - t)
            preview = statistics.median(costs)
        return {
            "family": loaded.family.name,
            "pipeline": type(loaded.pipe).__name__,
            "schedulers": list(loaded.schedulers),
            "startup_seconds": round(startup, 3),
            "step_ms": round(step * 1000, 2),
            "preview_ms": None if preview is None else round(preview * 1000, 2),
            "preview_per_step": None if preview is None else round(preview / step, 2),
            "preview_decoder": "none (cannot decode)" if preview is None else loaded.previewer.mode,
        }
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="requests per family, and preview decodes")
    args = parser.parse_args()

    import torch

    from app.worker.pipelines import quiet_libraries
    from tests.families import FAMILIES, save_family

    quiet_libraries()
    torch.set_num_threads(os.cpu_count() or 1)
    out: dict = {"size": f"{SIDE}x{SIDE}", "steps": STEPS, "reps": args.reps, "cpus": os.cpu_count(), "families": {}}
    with tempfile.TemporaryDirectory(prefix="imagegate-families-") as tmp:
        for name in FAMILIES:
            path = save_family(name, Path(tmp) / name)
            out["families"][name] = result = asyncio.run(measure(name, path, args.reps))
            print(name, json.dumps(result), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "families_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    ratios = {n: r["preview_per_step"] for n, r in out["families"].items() if r["preview_per_step"] is not None}
    bar_chart(RESULTS / "families_cpu.png", "One partial image / one denoising step (CPU)", ratios, "ratio")


if __name__ == "__main__":
    main()
