"""What traces and logs cost the gateway: CPU per request and added latency, with each switched on, in one run.

The set-up of ``overhead.py``: the stub (``stub.py``, fixed 50 ms delay, a tiny PNG), imagegate with the stub as its
upstreams, the open-loop load generator (``loadgen.py``) at a fixed rate, the gateways on one half of the CPUs and
the stub, the generator and the OTLP sink on the other. Configurations of imagegate, each its own process, all
started before the first measurement and loaded one at a time:

- ``baseline``: the defaults: tracing off, ``log_format = "plain"`` at ``info`` (an access line per request);
- ``tracing``: the same, with traces on (``OTEL_EXPORTER_OTLP_ENDPOINT`` to a local sink, ``OTEL_TRACES_SAMPLER =
  traceidratio`` with ``OTEL_TRACES_SAMPLER_ARG = 1.0``: every request traced and exported);
- ``json_logs``: the defaults with ``log_format = "json"``;
- ``no_access_log``: the defaults at ``log_level = warning`` (no access line: what the access line itself costs).

The sink is this script run with ``--sink``: a threaded HTTP server that answers every ``POST /v1/traces`` with 200
and counts the spans in it (``GET /stats``). Logs go to a file per configuration.

Variants: ``small`` (non-streamed) and ``small-stream`` (``stream: true``, 2 partial images), each at ``--rate``
(default 200 req/s) for ``--duration`` seconds (default 10) after a 2 s warm-up; the configurations run back to back
within each round, ``direct`` (the stub itself) first, and ``--rounds`` rounds (default 5) give medians.

Per request: the gateway's CPU (user + system of its process, over the measured and warm-up requests); added p50 and
p99 latency (from the scheduled send to the last byte, minus ``direct``'s in the same round); bytes of log written.
Ratios against ``baseline``.

Usage: ``python benchmarks/telemetry.py`` (about 11 min); writes ``benchmarks/results/telemetry.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets as T
from common import RESULTS, free_port

VARIANTS = ("small", "small-stream")
MIN_LEN = 300


def configs(sink: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Name -> (extra flags of ``imagegate serve``, extra environment)."""
    tracing = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "1.0",
    }
    return {
        "baseline": (["--log-level", "info", "--log-format", "plain"], {}),
        "tracing": (["--log-level", "info", "--log-format", "plain"], tracing),
        "json_logs": (["--log-level", "info", "--log-format", "json"], {}),
        "no_access_log": (["--log-level", "warning", "--log-format", "plain"], {}),
    }


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# -- the OTLP sink --------------------------------------------------------------------------------------------------


def run_sink(port: int) -> None:
    """Answer every OTLP/HTTP export with 200 and count its spans; ``GET /stats`` tells the counts."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    counts = {"exports": 0, "spans": 0, "bytes": 0}
    lock = threading.Lock()
    answer = ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            request = ExportTraceServiceRequest.FromString(body)
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with lock:
                counts["exports"] += 1
                counts["spans"] += n
                counts["bytes"] += len(body)
            self._send(answer, "application/x-protobuf")

        def do_GET(self) -> None:
            with lock:
                self._send(json.dumps(counts).encode(), "application/json")

        def _send(self, data: bytes, ctype: str) -> None:
            self.send_response(200)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


def start_sink(tmp: Path, cpus) -> T.Proc:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--sink", "--port", str(port)]
    proc = T.spawn(cmd, cpus, tmp / "sink.log")
    url = f"http://127.0.0.1:{port}"
    T.wait_http(f"{url}/stats", proc, 60)
    return T.Proc("sink", proc, url, tuple(cpus), tmp / "sink.log")


def sink_stats(sink: T.Proc) -> dict:
    return httpx.get(f"{sink.url}/stats", timeout=10).json()


# -- the benchmark --------------------------------------------------------------------------------------------------


def body(variant: str, partials: int) -> dict:
    b: dict = {"model": "stub-small", "prompt": "a lighthouse at dusk", "size": "1024x1024", "n": 1}
    if variant.endswith("stream"):
        b.update(stream=True, partial_images=partials)
    return b


def _affinity(cpus):
    def run() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.gw_cpus, self.gen_cpus = T.cpu_layout(not args.no_pin)
        self.procs: dict[str, T.Proc] = {}

    def start(self) -> None:
        a = self.args
        stub = self.procs["stub"] = T.start_stub(self.tmp, self.gen_cpus)
        self.models = {"stub-small": f"{stub.url}/small/{a.delay_ms}/v1"}
        sink = self.procs["sink"] = start_sink(self.tmp, self.gen_cpus)
        for name, (flags, env) in configs(sink.url).items():
            if name not in a.configs:
                continue
            log(f"starting imagegate ({name}) ...")
            self.procs[name] = T.start_imagegate(
                self.tmp, self.gw_cpus, self.models, name=name, args=flags, env=env, log=self.tmp / f"{name}.log"
            )

    def url(self, target: str) -> str:
        if target == "direct":
            return f"{self.models['stub-small']}/images/generations"
        return f"{self.procs[target].url}/v1/images/generations"

    def warm(self) -> None:
        """A few requests through each gateway and variant: lazy imports, connections, first spans."""
        for name in self.args.configs:
            for variant in VARIANTS:
                for _ in range(20):
                    r = httpx.post(self.url(name), json=body(variant, self.args.partials), timeout=30)
                    r.raise_for_status()

    def run(self, target: str, variant: str) -> dict:
        a = self.args
        cmd = [
            sys.executable,
            str(T.BENCH / "loadgen.py"),
            "--url",
            self.url(target),
            "--body",
            json.dumps(body(variant, a.partials)),
            "--rate",
            str(a.rate),
            "--duration",
            str(a.duration),
            "--warmup",
            str(a.warmup),
            "--min-len",
            str(MIN_LEN),
        ] + (["--stream"] if variant.endswith("stream") else [])
        proc = self.procs.get(target)
        logfile = proc.log if proc is not None else None
        cpu0 = proc.cpu_seconds() if proc is not None else 0.0
        log0 = logfile.stat().st_size if logfile is not None and logfile.exists() else 0
        spans0 = sink_stats(self.procs["sink"])["spans"] if target == "tracing" else 0
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_affinity(self.gen_cpus))
        if done.returncode != 0:
            raise RuntimeError(f"loadgen failed: {done.stderr[-2000:]}")
        res = json.loads(done.stdout)
        total = res["sent"] + round(a.rate * a.warmup)
        if proc is not None:
            if target == "tracing":
                res["spans_exported_per_request"] = self._exported(spans0, total)
            res["cpu_us_per_request"] = round(1e6 * (proc.cpu_seconds() - cpu0) / max(1, total), 1)
            if logfile is not None:
                res["log_bytes_per_request"] = round((logfile.stat().st_size - log0) / max(1, total), 1)
        lat = res["latency_from_schedule_ms"]
        log(
            f"{variant:13s} {target:14s} ok={res['ok']:5d} err={res['errors']:3d} p50={lat.get('p50', 0):7.2f} "
            f"p99={lat.get('p99', 0):7.2f} ms cpu/req={res.get('cpu_us_per_request', '-')} us "
            f"log/req={res.get('log_bytes_per_request', '-')} B"
        )
        T.quiesce([p for n, p in self.procs.items() if n != "sink"])
        return res

    def _exported(self, before: int, requests: int, per_request: int = 4, timeout: float = 8.0) -> float:
        """Spans the sink got per request, once the batch processor exported this test's last ones (its schedule
        delay is 5 s: the spans of a test's last seconds leave after it, and their CPU counts with it)."""
        deadline = time.monotonic() + timeout
        while True:
            got = sink_stats(self.procs["sink"])["spans"] - before
            if got >= per_request * requests or time.monotonic() > deadline:
                return round(got / requests, 2)
            time.sleep(0.25)

    def stop(self) -> None:
        for name, p in self.procs.items():
            if name in ("stub", "sink"):
                T.kill(p)
            else:
                T.stop_imagegate(p)


def summarize(rounds: list[dict], configs_: list[str]) -> dict:
    """Per variant and configuration: medians over rounds of CPU per request and added p50/p99; ratios to baseline."""
    out: dict = {}
    for variant in VARIANTS:
        per: dict = {}
        for name in configs_:
            cpu, p50, p99, logb, errors = [], [], [], [], 0
            for r in rounds:
                run, direct = r[variant][name], r[variant]["direct"]
                errors += run["errors"]
                if run["errors"] or direct["errors"]:
                    continue  # a test with errors measured something else (the stub went away, the target failed)
                cpu.append(run["cpu_us_per_request"])
                p50.append(run["latency_from_schedule_ms"]["p50"] - direct["latency_from_schedule_ms"]["p50"])
                p99.append(run["latency_from_schedule_ms"]["p99"] - direct["latency_from_schedule_ms"]["p99"])
                logb.append(run.get("log_bytes_per_request", 0.0))
            if not cpu:
                per[name] = {"errors": errors, "note": "no test of this configuration ran without errors"}
                continue
            per[name] = {
                "cpu_us_per_request": round(statistics.median(cpu), 1),
                "added_p50_ms": round(statistics.median(p50), 3),
                "added_p99_ms": round(statistics.median(p99), 3),
                "log_bytes_per_request": round(statistics.median(logb), 1),
                "errors": errors,
                "rounds": {"cpu_us_per_request": cpu, "added_p50_ms": [round(x, 3) for x in p50]},
            }
            if name == "tracing":
                per[name]["spans_exported_per_request"] = [
                    r[variant][name].get("spans_exported_per_request") for r in rounds
                ]
        base = per.get("baseline")
        if base and "cpu_us_per_request" in base:
            for fig in (f for f in per.values() if "cpu_us_per_request" in f):
                fig["vs_baseline"] = {
                    "cpu": _ratio(fig["cpu_us_per_request"], base["cpu_us_per_request"]),
                    # added latencies can be ~0: compared with a 0.1 ms floor, as overhead.py does
                    "added_p50": _ratio(max(fig["added_p50_ms"], 0.1), max(base["added_p50_ms"], 0.1)),
                    "added_p99": _ratio(max(fig["added_p99_ms"], 0.1), max(base["added_p99_ms"], 0.1)),
                }
        out[variant] = per
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per test")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--delay-ms", type=int, default=50)
    ap.add_argument("--partials", type=int, default=2)
    ap.add_argument("--configs", default="baseline,tracing,json_logs,no_access_log")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "telemetry.json"))
    ap.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    return args


def main() -> None:
    args = parse_args()
    if args.sink:
        run_sink(args.port)
        return
    from overhead import machine, on_sigterm, versions
    from stub import raise_nofile

    on_sigterm()
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="imagegate-telemetry-"))
    bench = Bench(args, tmp)
    started = time.monotonic()
    rounds: list[dict] = []
    try:
        bench.start()
        bench.warm()
        for k in range(args.rounds):
            log(f"round {k + 1} of {args.rounds}")
            this: dict = {}
            for variant in VARIANTS:
                this[variant] = {t: bench.run(t, variant) for t in ["direct", *args.configs]}
            rounds.append(this)
        sink = sink_stats(bench.procs["sink"])
    except BaseException:
        log(f"failed; the servers' logs are kept in {tmp}")
        raise
    finally:
        bench.stop()
    summary = summarize(rounds, args.configs)
    out = {
        "benchmark": "telemetry",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "versions": versions(),
        "elapsed_s": round(time.monotonic() - started),
        "setup": {
            "rate_rps": args.rate,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "stub_delay_ms": args.delay_ms,
            "partial_images": args.partials,
            "configs": {
                name: {"flags": flags, "environment": env} for name, (flags, env) in configs("http://SINK").items()
            },
            "pinning": {"gateways": bench.gw_cpus, "stub_loadgen_sink": bench.gen_cpus},
            "cpu_means": "user + system CPU of the gateway process over all requests of a test (warm-up included)",
            "added_latency_means": "p50/p99 from the scheduled send to the last byte, minus direct's in the same round",
        },
        "sink_totals": sink,
        "summary": summary,
        "rounds": rounds,
        "notes": [
            "Noisy 2-core VM: compare configurations within a run (they ran back to back), not across runs.",
            "The tracing configuration's CPU includes the batch span processor's export thread (encoding, HTTP).",
            "A p99 near 100 ms in any configuration is a full garbage collection of the gateway (55-90 ms) during "
            "that test: compare the medians over rounds.",
        ],
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    with contextlib.suppress(OSError):
        for f in tmp.iterdir():
            f.unlink() if f.is_file() else None
    log(f"wrote {path} ({out['elapsed_s']} s)")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
