"""Edit latency vs generation latency on the demo model (CPU), at the same size and number of steps.

One server, interleaved repetitions of: a generation; an image-to-image edit at strength 1.0 (all 20 steps, as
the generation); an inpainting edit with a mask (all 20 steps); and an image-to-image edit at the default strength
0.75 (15 of the 20 steps). The edits carry a 256x256 PNG upload each way through the multipart path.

Usage: ``python benchmarks/edits_cpu.py [--reps 9]``; writes ``benchmarks/results/edits_cpu.json`` and
``edits_cpu.png`` (each variant's median latency over the generation's).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, start_server, stop
from plot import bar_chart

SIZE, STEPS = 256, 20


def png(mode: str, colour: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (SIZE, SIZE), colour).save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    image = png("RGB", (180, 40, 40))
    mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (64, 64, 192, 192))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    mask_png = buf.getvalue()
    fields = {"model": "imagegate-demo", "prompt": "a red fox", "size": f"{SIZE}x{SIZE}"}
    steps = {"num_inference_steps": str(STEPS)}

    data_dir = Path(tempfile.mkdtemp(prefix="imagegate-bench-"))
    proc, url, _ = start_server(data_dir)
    client = httpx.Client(base_url=url, timeout=300)

    def generation(seed: int) -> None:
        body = {**fields, "num_inference_steps": STEPS, "seed": seed}
        client.post("/v1/images/generations", json=body).raise_for_status()

    def edit(seed: int, extra: dict[str, str], with_mask: bool = False) -> None:
        files = [("image", ("fox.png", image, "image/png"))]
        if with_mask:
            files.append(("mask", ("mask.png", mask_png, "image/png")))
        data = {**fields, **steps, "seed": str(seed), **extra}
        client.post("/v1/images/edits", data=data, files=files).raise_for_status()

    variants = {
        "generation": generation,
        "edit_strength_1": lambda seed: edit(seed, {"strength": "1.0"}),
        "inpaint_with_mask": lambda seed: edit(seed, {}, with_mask=True),
        "edit_default_strength_0.75": lambda seed: edit(seed, {}),
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for run in variants.values():  # warm-up
            run(0)
        for i in range(args.reps):
            for name, run in variants.items():
                time.sleep(0.5)  # let the other process's OpenMP threads stop spinning
                t = time.perf_counter()
                run(i)
                runs[name].append(time.perf_counter() - t)
    finally:
        client.close()
        stop(proc)
        shutil.rmtree(data_dir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}
    out = {
        "size": f"{SIZE}x{SIZE}",
        "steps": STEPS,
        "reps": args.reps,
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "seconds_best": {k: round(v, 4) for k, v in best.items()},
        "over_generation_median": {k: round(v / med["generation"], 3) for k, v in med.items()},
        "over_generation_best": {k: round(v / best["generation"], 3) for k, v in best.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in runs.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edits_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    bars = {name.replace("_", " ").replace("edit ", "edit\n"): v for name, v in out["over_generation_median"].items()}
    title = (
        f"Edit latency / generation latency (median of {args.reps})\n"
        f"demo model on CPU, {SIZE}x{SIZE}, {STEPS} steps, all through imagegate"
    )
    bar_chart(RESULTS / "edits_cpu.png", title, bars, "ratio (generation = 1)")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
