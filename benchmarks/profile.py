"""Where the gateway's CPU goes: a sampling profile of ``imagegate serve`` (or the thin proxy) under a fixed load.

The set-up of ``overhead.py`` (stub with its fixed delay, imagegate with the stub as upstreams, pinning, the same
load generator), one rate and one variant, with `py-spy <https://github.com/benfred/py-spy>`_ sampling the gateway
process for the measured seconds. Prints the functions with the most samples, self and inclusive, and keeps the
collapsed stacks (``--out``, for a flame graph with ``inferno``/``speedscope``).

py-spy is a profiler, not a dependency of the project: the script runs ``py-spy`` from ``PATH`` or the one given
by ``--py-spy`` (``pip install py-spy``).

Usage: ``python benchmarks/profile.py --variant small-stream --rate 300 [--duration 10] [--top 40]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets as T
from overhead import MIN_LEN, VARIANTS, _affinity, body, payload_of


def top(stacks: Path, n: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, the n frames most often on top of the stack, the n frames most often anywhere in it)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    return total, own.most_common(n), inclusive.most_common(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--variant", choices=VARIANTS, default="small-stream")
    ap.add_argument("--target", choices=("imagegate", "thin_proxy"), default="imagegate", help="the process sampled")
    ap.add_argument("--rate", type=float, default=300)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--delay-ms", type=int, default=50)
    ap.add_argument("--partials", type=int, default=2)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument("--out", default="", help="keep the collapsed stacks here")
    a = ap.parse_args()
    gw_cpus, gen_cpus = T.cpu_layout(True)
    with tempfile.TemporaryDirectory(prefix="imagegate-profile-") as tmp_name:
        tmp = Path(tmp_name)
        stub = gateway = None
        try:
            stub = T.start_stub(tmp, gen_cpus)
            models = {f"stub-{p}": f"{stub.url}/{p}/{a.delay_ms}/v1" for p in ("small", "large")}
            if a.target == "imagegate":
                gateway = T.start_imagegate(tmp, gw_cpus, models)
            else:
                gateway = T.start_thin_proxy(tmp, gw_cpus, models)
            load = [
                sys.executable,
                str(T.BENCH / "loadgen.py"),
                "--url",
                f"{gateway.url}/v1/images/generations",
                "--body",
                json.dumps(body(a.variant, a.partials)),
                "--rate",
                str(a.rate),
                "--duration",
                str(a.duration),
                "--warmup",
                "2",
                "--min-len",
                str(MIN_LEN[payload_of(a.variant)]),
            ] + (["--stream"] if a.variant.endswith("stream") else [])
            gen = subprocess.Popen(load, stdout=subprocess.PIPE, text=True, preexec_fn=_affinity(gen_cpus))
            time.sleep(2)  # the warm-up
            stacks = Path(a.out) if a.out else tmp / "stacks.txt"
            cpu0 = gateway.cpu_seconds()
            spy = [a.py_spy, "record", "--pid", str(gateway.pid), "--rate", "200"]
            spy += ["--duration", str(int(a.duration)), "--format", "raw", "--output", str(stacks)]
            subprocess.run(spy, check=True, capture_output=True)
            used = gateway.cpu_seconds() - cpu0
            result = json.loads(gen.communicate()[0])
        finally:
            if a.target == "imagegate":
                T.stop_imagegate(gateway)
            else:
                T.kill(gateway)
            T.kill(stub)
        total, own, inclusive = top(stacks, a.top)
        print(f"{a.target}, {a.variant} at {a.rate:g} req/s: {result['ok']} ok, {result['errors']} errors")
        per_request = 1e6 * used / (a.rate * a.duration)
        print(f"CPU while sampled: {used:.2f} s, {per_request:.0f} us per request; {total} samples")
        for title, rows in (("self", own), ("inclusive", inclusive)):
            print(f"\n-- {title} --")
            for frame, n in rows:
                print(f"{100 * n / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
