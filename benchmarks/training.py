"""LoRA training of a custom model on the demo model (CPU), through a real ``imagegate serve`` and the seed 001 API.

Measures, in one run:
- time to the first adapter: from ``POST .../trainings`` to the training's ``succeeded`` (queueing, the images sent
  to the worker, encoding them, every step, the adapter sent back and stored), for the ``fast`` preset at strength
  5 on four photos (200 steps at 128x128, the preset's resolution for the 256-class demo model);
- training throughput: steps per second over the run, from the training's own progress (step and timestamps);
- what a training costs inference on the same worker: the latency of a 256x256, 20-step generation while the
  worker trains, against the same request on the idle worker (ratio of medians). Inference runs between training
  slices, so it waits at most a slice (``TRAINING_SLICE``).

Usage: ``python benchmarks/training.py [--reps 5]``; writes ``benchmarks/results/training.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, start_server, stop

API = "/custom-models/v1"
GENERATION = {"model": "imagegate-demo", "prompt": "a red fox", "size": "256x256", "num_inference_steps": 20}


def photo(k: int) -> bytes:
    image = PILImage.new("RGB", (256, 256), (255, 255, 255))
    image.paste((200, 30, 30), (20 + 16 * k, 40, 140 + 16 * k, 160))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def new_model(client: httpx.Client) -> str:
    model_id = client.post(f"{API}/models", json={"displayName": "bench"}).json()["id"]
    for k in range(4):
        assert client.post(f"{API}/models/{model_id}/data", content=photo(k)).status_code == 201
    return model_id


def generation_seconds(client: httpx.Client) -> float:
    t = time.perf_counter()
    r = client.post("/v1/images/generations", json=GENERATION)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t


def train(client: httpx.Client, model_id: str, during: list[float] | None = None) -> dict:
    t = time.perf_counter()
    r = client.post(f"{API}/models/{model_id}/trainings", json={"trainingStrength": 5, "trainingSpeed": "fast"})
    assert r.status_code == 201, r.text
    started = r.json()
    url = f"{API}/models/{model_id}/trainings/{started['trainingId']}"
    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None
    while True:
        body = client.get(url).json()
        now = time.perf_counter()
        if body["status"] != "processing":
            break
        progress = body["progress"]
        if progress:
            first = first or (now, progress["step"])
            last = (now, progress["step"])
            if during is not None and progress["step"] < progress["total"] * 0.8:
                during.append(generation_seconds(client))
                continue
        time.sleep(0.02)
    assert body["status"] == "succeeded", body
    steps = started["hyperparameters"]["steps"]
    rate = (last[1] - first[1]) / (last[0] - first[0]) if first and last and last[0] > first[0] else None
    return {"plan": started["hyperparameters"], "time_to_adapter_s": now - t, "steps_per_s": rate, "steps": steps}


def main(reps: int) -> dict:
    data = Path(tempfile.mkdtemp(prefix="imagegate-bench-training-"))
    proc, url, _ = start_server(data)
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            model_id = new_model(client)
            generation_seconds(client)  # warm up
            trainings = [train(client, model_id) for _ in range(reps)]
            idle = [generation_seconds(client) for _ in range(reps)]
            during: list[float] = []
            train(client, model_id, during)
    finally:
        stop(proc)
    return {
        "training": trainings,
        "time_to_adapter_s": statistics.median(t["time_to_adapter_s"] for t in trainings),
        "steps_per_s": statistics.median(t["steps_per_s"] for t in trainings if t["steps_per_s"]),
        "generation_idle_s": statistics.median(idle),
        "generation_during_training_s": statistics.median(during) if during else None,
        "generation_during_over_idle": statistics.median(during) / statistics.median(idle) if during else None,
        "generations_during_training": len(during),
        "reps": reps,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    results = main(args.reps)
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(results, indent=2) + "\n")
