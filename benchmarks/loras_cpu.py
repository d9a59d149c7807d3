"""What LoRA adapters cost at inference on the demo model (CPU), in the worker's engine.

Measures, in one run (medians, the variants interleaved round by round; 256x256, 20 steps):
- a job on an engine that never loaded an adapter (the reference);
- on an engine with adapters loaded: no adapter (LoRA disabled), one adapter, three adapters;
- switching: jobs alternating between two loaded adapters, against jobs repeating one;
- the first job with an adapter the worker has not loaded yet (the load), against the next one;
- training: steps per second of a ``fast`` LoRA training on four 256x256 images (the preset's resolution for a
  512-class model), and the time from start (encoding the images included) to the adapter's weights.

Usage: ``python benchmarks/loras_cpu.py [--reps 5]``; writes ``benchmarks/results/loras_cpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import torch
from diffusers import DiffusionPipeline
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS

from app.config import demo_model
from app.worker.engine import Engine
from app.worker.pipelines import create_demo_model, quiet_libraries
from app.worker.protocol import Done, Failed, GenerationParams, LoraRef, plan
from app.worker.training import LoraTrainer
from tests.lora import make_lora

SIZE, STEPS = 256, 20


async def timed(engine: Engine, loras: tuple[LoraRef, ...], seed: int = 1) -> float:
    p = GenerationParams(
        model="imagegate-demo",
        prompt="a red fox",
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        guidance=7.5,
        seed=seed,
        loras=loras,
    )
    job = engine.submit(p)
    t = time.perf_counter()
    while True:
        event = await job.events.get()
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        if isinstance(event, Done):
            return time.perf_counter() - t


def train(model_dir: Path, steps: int = 20) -> dict:
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    photos = [PILImage.new("RGB", (256, 256), (40 * k, 120, 200)) for k in range(4)]
    chosen = plan("fast", len(photos), 5.0, 512, max_steps=steps)
    t = time.perf_counter()
    trainer = LoraTrainer(pipe, chosen, photos, ["TOK"] * len(photos), seed=1, checkpoint_dir=Path(tempfile.mkdtemp()))
    ready = time.perf_counter()
    trainer.run()
    done = time.perf_counter()
    return {
        "plan": msgspec.structs.asdict(chosen),
        "setup_s": ready - t,
        "steps_per_s": chosen.steps / (done - ready),
        "time_to_adapter_s": done - t,
    }


async def main(reps: int) -> dict:
    quiet_libraries()
    torch.set_num_threads(2)
    data = Path(tempfile.mkdtemp(prefix="imagegate-bench-loras-"))
    create_demo_model(data / "models" / "imagegate-demo")
    model_dir = data / "models" / "imagegate-demo"
    files = {k: make_lora(model_dir, data / "loras" / f"{k}.safetensors", seed) for seed, k in enumerate("abcd")}
    plain = Engine("cpu", [demo_model(str(data))])
    adapted = Engine("cpu", [demo_model(str(data))])
    for path, digest in files.values():
        adapted.adapter_files.put(digest, path.read_bytes())
    await plain.start()
    await adapted.start()
    a, b, c, d = (LoraRef(files[k][1], 1.0) for k in "abcd")
    for engine, loras in ((plain, ()), (adapted, (a, b, c))):  # warm up; loads a, b, c
        await timed(engine, loras)
    variants = {
        "never_loaded": (plain, [()]),
        "loaded_none": (adapted, [()]),
        "one": (adapted, [(a,)]),
        "three": (adapted, [(a, b, c)]),
        "repeat_one": (adapted, [(a,), (a,)]),
        "switch_two": (adapted, [(a,), (b,)]),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, (engine, sets) in variants.items():
            for loras in sets:
                times[name].append(await timed(engine, loras))
    first = await timed(adapted, (d,))  # d was never loaded: load + run
    after = await timed(adapted, (d,))
    await plain.stop()
    await adapted.stop()
    training = train(model_dir)
    med = {name: statistics.median(v) for name, v in times.items()}
    ref = med["never_loaded"]
    return {
        "seconds": med,
        "ratio_to_never_loaded": {name: m / ref for name, m in med.items()},
        "switching_over_repeating": med["switch_two"] / med["repeat_one"],
        "first_use_s": first,
        "next_use_s": after,
        "load_s": first - after,
        "training": training,
        "size": SIZE,
        "steps": STEPS,
        "reps": reps,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    results = asyncio.run(main(args.reps))
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loras_cpu.json").write_text(json.dumps(results, indent=2) + "\n")
