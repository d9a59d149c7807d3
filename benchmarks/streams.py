"""Streaming at scale: 1,000 concurrent SSE streams held open against one gateway, vs the same streams direct.

One run, same machine, same client, same stub (``stub.py``, payload ``stamp``):

- every stream is ``POST /v1/images/generations`` with ``stream: true, partial_images: 3``; the stub answers
  with 3 partial-image events and the completed event spread over ``--hold-s`` seconds (default 10: an event
  every 2.5 s), each image a tiny PNG carrying the stub's emit time (``time.monotonic_ns``, system-wide on Linux);
- ``--streams`` streams (default 1000) are opened by one client process (``loadgen.py --collect-events``, uvloop)
  at an even pace over ``--ramp-s`` seconds (default 4: 250 new streams a second), so all of them are open
  together from the end of the ramp to the end of the first stream;
- phases, one after the other: ``direct`` (the stub itself), ``imagegate`` (``python -m app serve``, the stub as an
  ``upstreams`` backend, one gateway process), and ``thin_proxy`` (``thin_proxy.py``, which relays the upstream's
  bytes untouched: the floor for a Python gateway).

Per phase: errors (non-200, a stream without its completed event, an ``error`` event, a broken connection or
timeout), time to first event (from the request's write; the stub sends the first event ``hold/4`` after the
request), event delivery delay (arrival at the client minus the stub's emit time, every event of every stream;
and only the events emitted once every stream was open, without the cost of opening new streams competing),
streams open at once (peak), and for the gateway: resident memory (idle before, sampled every 100 ms during, VmHWM
peak, after), file descriptors open (peak), CPU used.

Usage: ``python benchmarks/streams.py [--streams 1000] [--hold-s 10] [--ramp-s 4]``; writes
``benchmarks/results/streams.json`` and ``streams.png``. Pinning as in ``overhead.py`` (gateway on one half of
the CPUs, stub and client on the other).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets as T
from common import RESULTS, reset_hwm
from overhead import _affinity, machine, on_sigterm, versions
from stub import raise_nofile

PHASES = ("direct", "imagegate", "thin_proxy")
PARTIALS = 3


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class Sampler(threading.Thread):
    """Samples a process's VmRSS every ``interval`` s and its open file descriptors every 5th sample."""

    def __init__(self, proc: T.Proc, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.max_fds = 0
        self.stopping = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic() - self.t0, self.proc.rss_mb()))
                if i % 5 == 0:
                    self.max_fds = max(self.max_fds, len(os.listdir(f"/proc/{self.proc.pid}/fd")))
            i += 1
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def nofile_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return " / ".join(line.split()[3:5])
    return "?"


def run_phase(name: str, url: str, args: argparse.Namespace, gen_cpus, gateway: T.Proc | None) -> dict:
    body = {
        "model": "stub-stamp",
        "prompt": "a lighthouse at dusk",
        "size": "1024x1024",
        "n": 1,
        "stream": True,
        "partial_images": PARTIALS,
    }
    cmd = [
        sys.executable,
        str(T.BENCH / "loadgen.py"),
        "--url",
        url,
        "--body",
        json.dumps(body),
        "--rate",
        str(args.streams / args.ramp_s),
        "--duration",
        str(args.ramp_s),
        "--warmup",
        "0",
        "--stream",
        "--collect-events",
        "--max-conns",
        str(args.streams + 16),
        "--timeout",
        str(args.hold_s + 60),
    ]
    out: dict = {"phase": name}
    sampler = None
    if gateway is not None:
        T.quiesce([gateway])
        out["gateway_idle_rss_mb"] = round(gateway.rss_mb(), 1)
        out["gateway_hwm_reset"] = reset_hwm(gateway.pid)
        out["gateway_nofile_limit"] = nofile_of(gateway.pid)
        sampler = Sampler(gateway)
        sampler.start()
        cpu0 = gateway.cpu_seconds()
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_affinity(gen_cpus))
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {done.stderr[-2000:]}")
    res = json.loads(done.stdout)
    if gateway is not None and sampler is not None:
        sampler.stop()
        used = gateway.cpu_seconds() - cpu0
        out["gateway_cpu_s"] = round(used, 2)
        out["gateway_cpu_util"] = round(used / wall, 3)
        out["gateway_cpu_ms_per_stream"] = round(1000 * used / args.streams, 2)
        out["gateway_peak_rss_mb"] = round(max((s[1] for s in sampler.samples), default=0.0), 1)
        out["gateway_vmhwm_mb"] = round(gateway.rss_mb("VmHWM"), 1)
        time.sleep(1.0)
        out["gateway_rss_after_mb"] = round(gateway.rss_mb(), 1)
        out["gateway_peak_fds"] = sampler.max_fds
        step = max(1, len(sampler.samples) // 200)
        out["gateway_rss_series"] = [[round(t, 2), round(m, 1)] for t, m in sampler.samples[::step]]
    out["wall_s"] = round(wall, 1)
    keep = (
        "sent",
        "ok",
        "errors",
        "error_kinds",
        "peak_open_streams",
        "events_per_stream",
        "unstamped_events",
        "first_event_from_send_ms",
        "first_byte_from_send_ms",
        "event_delivery_delay_ms",
        "event_delivery_delay_all_open_ms",
        "event_delivery_delay_by_event_ms",
        "stream_duration_from_send_ms",
        "lag_ms",
        "connections_opened",
        "generator_cpu_util",
    )
    out.update({k: res[k] for k in keep if k in res})
    return out


def chart(path: Path, phases: dict[str, dict], args: argparse.Namespace) -> Path:
    from plot import plt  # pyplot on the Agg backend

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110)
    names = list(phases)
    qs = (
        ("event_delivery_delay_ms", "p50", "p50"),
        ("event_delivery_delay_ms", "p99", "p99"),
        ("event_delivery_delay_ms", "max", "max"),
        ("event_delivery_delay_all_open_ms", "p99", "p99, once all were open"),
    )
    width = 0.8 / len(qs)
    for i, (key, q, label) in enumerate(qs):
        vals = [phases[n][key].get(q, 0) for n in names]
        xs = [k + (i - (len(qs) - 1) / 2) * width for k in range(len(names))]
        bars = ax1.bar(xs, vals, width, label=f"delivery delay {label}")
        ax1.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=7, padding=2)
    ax1.set_xticks(range(len(names)))
    ax1.set_xticklabels(
        [
            f"{n}\n{phases[n]['errors']} errors, TTFE p50 {phases[n]['first_event_from_send_ms'].get('p50', 0):.0f} ms"
            for n in names
        ],
        fontsize=8,
    )
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (log): client arrival - stub emit")
    ax1.set_title(f"{args.streams} concurrent SSE streams: event delivery delay")
    ax1.grid(alpha=0.3, axis="y")
    ax1.legend(fontsize=8)
    for n in names:
        series = phases[n].get("gateway_rss_series")
        if series:
            ax2.plot(
                [s[0] for s in series],
                [s[1] for s in series],
                label=f"{n} (VmHWM {phases[n]['gateway_vmhwm_mb']:.0f} MB)",
            )
    ax2.axhline(500, color="grey", linestyle=":", label="goal: 500 MB")
    ax2.set_xlabel("seconds since the first stream was opened")
    ax2.set_ylabel("gateway RSS, MB")
    ax2.set_title("gateway resident memory")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = path.with_suffix(".png")
    fig.savefig(path)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--hold-s", type=float, default=10.0, help="seconds each stream stays open (stub side)")
    ap.add_argument("--ramp-s", type=float, default=4.0, help="seconds over which the streams are opened")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "streams.json"))
    args = ap.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    if set(args.phases) - set(PHASES):
        ap.error(f"unknown phases: {sorted(set(args.phases) - set(PHASES))}")
    return args


def main() -> None:
    args = parse_args()
    on_sigterm()
    nofile = raise_nofile()  # the gateway inherits it: 1,000 streams need ~2,000 descriptors there
    tmp = Path(tempfile.mkdtemp(prefix="imagegate-streams-"))
    gw_cpus, gen_cpus = T.cpu_layout(not args.no_pin)
    procs: dict[str, T.Proc] = {}
    phases: dict[str, dict] = {}
    started = time.monotonic()
    try:
        stub = procs["stub"] = T.start_stub(tmp, gen_cpus)
        base = f"{stub.url}/stamp/{round(args.hold_s * 1000)}/v1"
        models = {"stub-stamp": base}
        for phase in args.phases:
            gateway = None
            if phase == "direct":
                url = f"{base}/images/generations"
            elif phase == "imagegate":
                gateway = procs["imagegate"] = T.start_imagegate(tmp, gw_cpus, models)
                url = f"{gateway.url}/v1/images/generations"
            else:
                gateway = procs["thin_proxy"] = T.start_thin_proxy(tmp, gw_cpus, models)
                url = f"{gateway.url}/v1/images/generations"
            if gateway is not None:  # one warm-up stream
                warm = run_phase(
                    phase, url, argparse.Namespace(**{**vars(args), "streams": 4, "ramp_s": 0.5}), gen_cpus, None
                )
                if warm["errors"]:
                    log(f"{phase}: warm-up streams failed: {warm['error_kinds']}")
            log(f"{phase}: {args.streams} streams ...")
            phases[phase] = run_phase(phase, url, args, gen_cpus, gateway)
            p = phases[phase]
            log(
                f"{phase}: ok={p['ok']} errors={p['errors']} peak_open={p['peak_open_streams']} "
                f"ttfe p50={p['first_event_from_send_ms'].get('p50')} "
                f"delay p50={p['event_delivery_delay_ms'].get('p50')} p99={p['event_delivery_delay_ms'].get('p99')} "
                f"rss peak={p.get('gateway_vmhwm_mb')} MB"
            )
            if gateway is not None:
                if phase == "imagegate":
                    T.stop_imagegate(gateway)
                else:
                    T.kill(gateway)
                procs.pop(phase)
    except BaseException:
        log(f"failed; the servers' logs are kept in {tmp}")
        raise
    finally:
        for name, p in procs.items():
            if name == "imagegate":
                T.stop_imagegate(p)
            else:
                T.kill(p)
    out: dict = {
        "benchmark": "streams",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "versions": versions(),
        "elapsed_s": round(time.monotonic() - started),
        "setup": {
            "streams": args.streams,
            "ramp_s": args.ramp_s,
            "hold_s": args.hold_s,
            "partial_images": PARTIALS,
            "events_per_stream": PARTIALS + 1,
            "event_schedule_s": [round(args.hold_s * (k + 1) / (PARTIALS + 1), 3) for k in range(PARTIALS + 1)],
            "pinning": {"gateway": gw_cpus, "stub_and_client": gen_cpus},
            "client_nofile_soft_limit": nofile,
            "delivery_delay_means": "client arrival time of an event minus the stub's emit time carried in its image",
            "ttfe_means": "time to the first complete SSE event, from the request's write (includes the stub's hold/4)",
        },
        "phases": phases,
    }
    ig = phases.get("imagegate")
    if ig:
        direct = phases.get("direct", {})
        out["goals"] = [
            {
                "goal": f"{args.streams} concurrent streams through imagegate with no errors",
                "errors": ig["errors"],
                "peak_open_streams": ig["peak_open_streams"],
                "met": ig["errors"] == 0 and ig["peak_open_streams"] >= args.streams,
            },
            {
                "goal": "imagegate RSS under 500 MB while holding them",
                "vmhwm_mb": ig.get("gateway_vmhwm_mb"),
                "met": (ig.get("gateway_vmhwm_mb") or 1e9) < 500,
            },
        ]
        thin = phases.get("thin_proxy")
        if thin and direct:
            # Against the thin proxy, what each gateway adds: time to first event beyond the stub's own (a 1 ms
            # floor, both being near zero), and memory beyond its own idle footprint (imagegate's code is larger).
            for q in ("p50", "p99"):
                added = {n: _minus(p, direct, "first_event_from_send_ms", q) for n, p in (("ig", ig), ("thin", thin))}
                if added["ig"] is not None and added["thin"] is not None:
                    out["goals"].append(
                        {
                            "goal": f"time to first event, added {q}: imagegate <= 1.25 x thin proxy's",
                            "imagegate_ms": added["ig"],
                            "thin_proxy_ms": added["thin"],
                            "met": max(added["ig"], 1.0) <= 1.25 * max(added["thin"], 1.0),
                        }
                    )
            pairs = (("ig", ig), ("thin", thin))
            grown = {n: round(p["gateway_vmhwm_mb"] - p["gateway_idle_rss_mb"], 1) for n, p in pairs}
            out["goals"].append(
                {
                    "goal": f"memory for {args.streams} streams (peak minus idle): imagegate <= 1.25 x thin proxy's",
                    "imagegate_mb": grown["ig"],
                    "thin_proxy_mb": grown["thin"],
                    "idle_mb": {"imagegate": ig["gateway_idle_rss_mb"], "thin_proxy": thin["gateway_idle_rss_mb"]},
                    "met": grown["ig"] <= 1.25 * grown["thin"],
                }
            )
        if direct:
            out["imagegate_minus_direct_ms"] = {
                "ttfe_p50": _minus(ig, direct, "first_event_from_send_ms", "p50"),
                "ttfe_p99": _minus(ig, direct, "first_event_from_send_ms", "p99"),
                "delivery_p50": _minus(ig, direct, "event_delivery_delay_ms", "p50"),
                "delivery_p99": _minus(ig, direct, "event_delivery_delay_ms", "p99"),
                "delivery_all_open_p50": _minus(ig, direct, "event_delivery_delay_all_open_ms", "p50"),
                "delivery_all_open_p99": _minus(ig, direct, "event_delivery_delay_all_open_ms", "p99"),
            }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    png = chart(path, phases, args)
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {path} and {png} ({out['elapsed_s']} s)")
    summary = {k: {kk: v for kk, v in p.items() if kk != "gateway_rss_series"} for k, p in phases.items()}
    print(json.dumps({"phases": summary, "goals": out.get("goals")}, indent=1))


def _minus(a: dict, b: dict, key: str, q: str) -> float | None:
    x, y = a.get(key, {}).get(q), b.get(key, {}).get(q)
    return None if x is None or y is None else round(x - y, 3)


if __name__ == "__main__":
    main()
