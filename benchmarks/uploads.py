"""The gateway's memory while it receives large multipart edit uploads, and how fast it refuses an over-limit body.

Measures, in one run, on the demo model (CPU):
- resident memory of the gateway process (the ``serve`` process, not its worker) when idle, after ``/ready`` and a
  small warm-up edit;
- while a ~10 MB and a ~100 MB PNG (random noise, stored uncompressed) arrive as a multipart ``POST /v1/images/edits``
  streamed from disk, and a flat-colour PNG with as many pixels as the 100 MB one but a file of a few hundred kB:
  the gateway's VmRSS sampled every 10 ms (its peak), its VmHWM (peak RSS, reset before each request through
  ``/proc/PID/clear_refs`` where the kernel allows it) and its VmRSS a second after the response; the growth is peak
  minus idle, also per MB uploaded and per megapixel. The gateway spools the upload to a temporary file, checks it
  and streams it to the worker, which decodes the whole image and resizes it to 64x64 (the worker's memory is not
  measured). The flat image tells whether the gateway's memory follows the bytes uploaded or the pixels;
- against a second server with ``--max-upload-size 10000000``, a 100 MB multipart body sent over a raw socket as fast
  as the socket takes it, once with a ``Content-Length`` (refused from the header) and once chunked (refused on the
  bytes streamed): the seconds from the end of the headers to the 413, the body bytes the client had handed to the
  kernel by then, the bytes the gateway had read out of its socket by then (sent, less what still sat in the
  client's send queue and the gateway's receive queue, read from ``/proc/net/tcp``; an upper bound of what it read
  before answering, since a server that keeps the connection may go on reading once its answer is out), and what
  happens if the client keeps sending after the 413 (the gateway closes, or reads and discards the rest).

Target: the gateway's RSS grows by less than 64 MiB while it receives a 100 MB upload.

Usage: ``python benchmarks/uploads.py [--reps 2] [--sizes-mb 10,100]``; writes ``benchmarks/results/uploads.json``
and ``uploads.png`` (the gateway's idle and peak RSS per upload; the 413 times in the title).
Sizes are in MB (10^6 bytes), memory in MiB as /proc reports it (kB / 1024), times in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, proc_status_mb, reset_hwm, start_server, stop
from plot import bar_chart

MB = 1_000_000
FIELDS = {"model": "imagegate-demo", "prompt": "x", "size": "64x64", "num_inference_steps": "1"}
BIG_LIMITS = ["--max-upload-size", "300000000", "--max-image-bytes", "200000000", "--max-image-pixels", "200000000"]
REJECT_LIMIT = 10_000_000
SAMPLE_S = 0.01


def noise_png(path: Path, target_bytes: int) -> int:
    """A PNG of random RGB noise, stored uncompressed: about 3 bytes a pixel, so about ``target_bytes`` long."""
    import numpy as np
    from PIL import Image

    side = max(8, round(math.sqrt(target_bytes / 3)))
    pixels = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format="PNG", compress_level=0)
    return path.stat().st_size


def multipart(path: Path, boundary: str, chunk: int) -> tuple[int, Iterator[bytes]]:
    """The length of an edit's multipart body, and the body as chunks read from ``path`` as they are needed."""
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in FIELDS.items()
    )
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        with path.open("rb") as f:
            while data := f.read(chunk):
                yield data
        yield tail

    return len(head) + path.stat().st_size + len(tail), chunks()


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 10 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._done.is_set():
            self.samples.append((time.perf_counter() - t0, proc_status_mb(self.pid, "VmRSS")))
            self._done.wait(SAMPLE_S)

    def finish(self) -> list[tuple[float, float]]:
        self._done.set()
        self.join()
        return self.samples


def edit(client: httpx.Client, path: Path) -> tuple[int, float]:
    boundary = "imagegate-bench-" + secrets.token_hex(8)
    length, body = multipart(path, boundary, 1 << 20)
    headers = {"content-type": f"multipart/form-data; boundary={boundary}", "content-length": str(length)}
    t = time.perf_counter()
    r = client.post("/v1/images/edits", content=body, headers=headers)
    seconds = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"edit of {path.name} answered {r.status_code}: {r.text[:300]}")
    return r.status_code, seconds


def measure_upload(client: httpx.Client, pid: int, path: Path, idle: float) -> dict:
    hwm_reset = reset_hwm(pid)
    before = proc_status_mb(pid, "VmRSS")
    sampler = RssSampler(pid)
    sampler.start()
    try:
        status, seconds = edit(client, path)
    finally:
        samples = sampler.finish()
    hwm = proc_status_mb(pid, "VmHWM")
    time.sleep(1.0)
    after = proc_status_mb(pid, "VmRSS")
    peak = max(rss for _, rss in samples)
    return {
        "status": status,
        "seconds": round(seconds, 3),
        "rss_before_mb": round(before, 1),
        "peak_rss_during_mb": round(peak, 1),
        "vmhwm_after_mb": round(hwm, 1),
        "vmhwm_was_reset_before": hwm_reset,
        "rss_1s_after_mb": round(after, 1),
        "growth_peak_minus_idle_mb": round(peak - idle, 1),
        "growth_vmhwm_minus_idle_mb": round(hwm - idle, 1) if hwm_reset else None,
        "retained_after_minus_idle_mb": round(after - idle, 1),
        "samples": len(samples),
        # Every 10th sample (~100 ms apart): seconds since the request started, VmRSS MiB.
        "rss_trace_mb": [[round(t, 2), round(rss, 1)] for t, rss in samples[::10]],
    }


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(tx_queue, rx_queue) in bytes of the 127.0.0.1 TCP socket from ``local_port`` to ``remote_port``."""
    want = (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}")
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == want:
            tx, rx = fields[4].split(":")
            return int(tx, 16), int(rx, 16)
    return None


def reject(port: int, path: Path, chunked: bool, after_s: float = 5.0) -> dict:
    """Send an over-limit edit body as fast as the socket takes it; time the 413 and count the bytes."""
    boundary = "imagegate-bench-" + secrets.token_hex(8)
    length, parts = multipart(path, boundary, 1 << 16)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {length}"
    head = (
        f"POST /v1/images/edits HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: multipart/form-data; boundary={boundary}\r\n{framing}\r\n\r\n"
    ).encode()

    def wire() -> Iterator[bytes]:
        for part in parts:
            yield b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
        if chunked:
            yield b"0\r\n\r\n"

    body = wire()
    sock = socket.create_connection(("127.0.0.1", port))
    client_port = sock.getsockname()[1]
    try:
        sock.sendall(head)
        t0 = time.perf_counter()
        sock.setblocking(False)
        sent = 0  # body bytes (chunk framing included) the kernel took
        pending = b""
        response = b""
        answered_at = None
        out: dict = {"body_bytes": length, "framing": "chunked" if chunked else "content-length"}
        closed = None
        finished_sending = False
        finished_at = None
        while True:
            now = time.perf_counter()
            if answered_at is not None and now - answered_at > after_s:
                break
            writing = [sock] if not finished_sending and closed is None else []
            readable, writable, _ = select.select([sock], writing, [], 1.0)
            if readable:
                try:
                    data = sock.recv(1 << 16)
                except ConnectionResetError:
                    data = b""
                if answered_at is None:
                    answered_at = time.perf_counter()
                    queues = tcp_queues(client_port, port), tcp_queues(port, client_port)
                    out["seconds_to_response"] = round(answered_at - t0, 4)
                    out["mb_sent_when_response_arrived"] = round(sent / MB, 2)
                    if queues[0] is not None and queues[1] is not None:
                        # Sent, less what still waits in our send queue and in the gateway's receive queue.
                        read = sent - queues[0][0] - queues[1][1]
                        out["mb_read_by_gateway_when_response_arrived"] = round(read / MB, 2)
                        out["mb_still_in_kernel_buffers"] = round((queues[0][0] + queues[1][1]) / MB, 2)
                if not data:
                    closed = time.perf_counter()
                    break
                response += data
                continue
            if writable:
                if not pending:
                    pending = next(body, b"")
                    if not pending:
                        finished_sending = True
                        finished_at = time.perf_counter()
                        continue
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    closed = time.perf_counter()
                    break
                sent += n
                pending = pending[n:]
            elif answered_at is None and time.perf_counter() - t0 > 120:
                raise RuntimeError("no answer to the over-limit body in 120 s")
        status_line = response.split(b"\r\n", 1)[0].decode(errors="replace")
        out["status"] = int(status_line.split()[1]) if status_line.startswith("HTTP/") else None
        out["mb_sent_in_all"] = round(sent / MB, 2)
        if answered_at is not None:
            out["after_response"] = {
                "gateway_closed_connection": closed is not None,
                "seconds_from_response_to_close": round(closed - answered_at, 4) if closed else None,
                "client_sent_whole_body": finished_sending,
                "seconds_from_response_to_last_byte_sent": (
                    round(finished_at - answered_at, 4) if finished_at is not None else None
                ),
                "mb_sent_after_response": round((sent / MB) - out["mb_sent_when_response_arrived"], 2),
            }
        return out
    finally:
        sock.close()


def chart(out: dict) -> Path:
    bars = {"idle": out["gateway_idle_rss_mb"]}
    for name, growth in out["growth_mb"].items():
        label = f"{name.removeprefix('noise_').removesuffix('mb')} MB upload" if name.startswith("noise_") else name
        if name == "flat_same_pixels":
            label = f"flat PNG, {out['cases'][name]['file_mb']:.1f} MB\nas many pixels as 100 MB"
        bars[f"{label}\npeak"] = round(out["gateway_idle_rss_mb"] + growth["peak_rss_minus_idle"], 1)
    rej = out["reject"]
    title = (
        f"Gateway RSS receiving multipart edits (MiB)\n413 for a 100 MB body over a 10 MB limit after "
        f"{rej['content_length']['seconds_to_response'] * 1000:.1f} ms\n(Content-Length), "
        f"{rej['chunked']['seconds_to_response'] * 1000:.1f} ms (chunked)"
    )
    return bar_chart(RESULTS / "uploads.png", title, bars, "RSS (MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="uploads of each kind")
    parser.add_argument("--sizes-mb", default="10,100", help="noise upload sizes in MB, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    work = Path(tempfile.mkdtemp(prefix="imagegate-uploads-"))
    data_dir, tmp_dir = work / "data", work / "tmp"
    tmp_dir.mkdir()
    out: dict = {"cpus": os.cpu_count(), "reps": args.reps, "fields": FIELDS}
    procs: list[subprocess.Popen] = []
    try:
        from PIL import Image

        small = work / "small.png"
        Image.new("RGB", (64, 64), (200, 40, 40)).save(small)
        cases: dict[str, Path] = {}
        for mb in sorted({*sizes, 100}):
            cases[f"noise_{mb}mb"] = work / f"noise_{mb}mb.png"
            noise_png(cases[f"noise_{mb}mb"], mb * MB)
        # As many pixels as the 100 MB noise image, in a file of a few hundred kB: what the gateway's memory follows.
        side = Image.open(cases["noise_100mb"]).size[0]
        cases["flat_same_pixels"] = work / "flat_same_pixels.png"
        Image.new("RGB", (side, side), (90, 120, 150)).save(cases["flat_same_pixels"])
        measured = [f"noise_{mb}mb" for mb in sizes] + ["flat_same_pixels"]
        out["cases"] = {}
        for name in measured:
            with Image.open(cases[name]) as im:
                out["cases"][name] = {
                    "file_mb": round(cases[name].stat().st_size / MB, 3),
                    "pixels": f"{im.width}x{im.height}",
                    "megapixels": round(im.width * im.height / 1e6, 2),
                }

        # 1-3: memory while big uploads are accepted.
        env = {**os.environ, "TMPDIR": str(tmp_dir)}  # the gateway's spooled uploads land here, and go with it
        proc, url, _ = start_server(data_dir, *BIG_LIMITS, env=env)
        procs.append(proc)
        out["server_flags"] = BIG_LIMITS
        client = httpx.Client(base_url=url, timeout=600)
        for _ in range(3):
            edit(client, small)
        time.sleep(1.0)
        idle = proc_status_mb(proc.pid, "VmRSS")
        out["gateway_idle_rss_mb"] = round(idle, 1)
        out["gateway_idle_vmhwm_mb"] = round(proc_status_mb(proc.pid, "VmHWM"), 1)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.reps):
            for name in measured:
                runs.setdefault(name, []).append(measure_upload(client, proc.pid, cases[name], idle))
        out["uploads"] = runs
        out["growth_mb"] = {}
        for name, rs in runs.items():
            growth = max(r["growth_peak_minus_idle_mb"] for r in rs)
            out["growth_mb"][name] = {
                "peak_rss_minus_idle": growth,
                "vmhwm_minus_idle": max((r["growth_vmhwm_minus_idle_mb"] or 0.0) for r in rs),
                "peak_minus_rss_just_before": round(max(r["peak_rss_during_mb"] - r["rss_before_mb"] for r in rs), 1),
                "retained_1s_after_minus_idle": [r["retained_after_minus_idle_mb"] for r in rs],
                "per_upload_mb": round(growth / out["cases"][name]["file_mb"], 2),
                "per_megapixel": round(growth / out["cases"][name]["megapixels"], 2),
                "request_seconds": min(r["seconds"] for r in rs),
            }
        client.close()
        stop(proc)

        # 4: refusing an over-limit body.
        extra = ["--max-upload-size", str(REJECT_LIMIT)]
        proc, url, _ = start_server(data_dir, *extra, env=env)
        port = int(url.rsplit(":", 1)[1])
        procs.append(proc)
        out["reject"] = {
            "server_flags": extra,
            "content_length": reject(port, cases["noise_100mb"], chunked=False),
            "chunked": reject(port, cases["noise_100mb"], chunked=True),
        }
        stop(proc)
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)
    if "noise_100mb" in out["growth_mb"]:
        out["target_growth_under_64mb_for_100mb"] = out["growth_mb"]["noise_100mb"]["peak_rss_minus_idle"] < 64
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "uploads.json").write_text(json.dumps(out, indent=2) + "\n")
    chart(out)
    summary = {k: v for k, v in out.items() if k != "uploads"}
    summary["uploads"] = {
        name: [{k: v for k, v in r.items() if k != "rss_trace_mb"} for r in rs] for name, rs in out["uploads"].items()
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
