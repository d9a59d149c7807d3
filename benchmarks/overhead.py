"""Gateway overhead: imagegate vs a direct call, vs the thinnest Litestar+aiohttp proxy, vs the LiteLLM proxy.

One run, same machine, same load generator, same stub backend:

- the stub (``stub.py``): a fixed delay (``--delay-ms``, default 50 ms) and a fixed answer, small (a 4x4 PNG) or
  large (a ~1.5 MB PNG: 2,000,000 characters of ``b64_json``); streamed requests get ``--partials`` partial-image
  events spread over the delay, then the completed event;
- four targets: ``direct`` (the stub itself), ``imagegate`` (``python -m app serve``, the stub as an ``upstreams``
  backend), ``thin_proxy`` (``thin_proxy.py``: decode, forward with aiohttp, return; the yardstick of what any
  Python gateway on this stack costs) and ``litellm`` (the LiteLLM proxy, one worker, the stub as an ``openai/``
  image model with ``api_base``; installed by this script into ``benchmarks/.venv-litellm``);
- variants: small and large answers, non-streamed and streamed (``stream: true, partial_images: N``);
- open-loop load (``loadgen.py``, its own process) at stepped rates; within a rate the targets run one after the
  other, so every rate's figures share the same minute of machine noise. A target that fails a rate is not run at
  higher rates of that variant (a failed rate is run once more first, ``--retries``: this machine is noisy); a
  variant stops where ``direct`` fails (the generator's and stub's own limit).

Added latency = the target's latency minus ``direct``'s at the same rate, in the same run, for p50 and p99.
Latency is measured from each request's scheduled send time to its last byte (streams: to the end of the stream;
the time to the first event is reported too). A rate is *sustained* when: no errors (non-200, wrong body,
stream without its completed event, 10 s timeout, more than ``--max-conns`` requests in flight), and p99 from the
schedule within ``--slo-ms`` of the stub's delay. The highest sustained rate is the *sustainable rate*.

Pinning (2+ CPUs): the gateways on the first half of the CPUs, the stub and the load generator on the other half;
the generator therefore competes with the stub (not with the gateways), and its own limit shows as ``direct``
failing. Only one gateway is loaded at a time; the others sit idle on the same CPUs.

Usage: ``python benchmarks/overhead.py`` (about 15 min); ``--quick`` (about 3 min) for a smoke run; see ``--help``.
Writes ``benchmarks/results/overhead.json`` and ``overhead.png``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import importlib.metadata as md
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets as T
from common import RESULTS, ROOT

TARGETS = ("direct", "imagegate", "thin_proxy", "litellm")
VARIANTS = ("small", "large", "small-stream", "large-stream")
DEFAULT_RATES = (10, 25, 50, 100, 200, 300, 500, 800, 1200, 1800, 2500)
MIN_LEN = {"small": 300, "large": 1_990_000}
TARGET_RATES = (100, 300)


def payload_sizes() -> dict:
    from stub import large_png, small_png

    small, large = len(base64.b64encode(small_png())), len(base64.b64encode(large_png()))
    return {
        "small": f"b64 of a 4x4 PNG: {small}-character b64_json (a ~400-byte JSON answer)",
        "large": f"b64 of a 1024-wide noise PNG: {large:,}-character b64_json",
    }


def on_sigterm() -> None:
    """SIGTERM (or SIGHUP) ends the run like Ctrl-C: every started process is stopped on the way out."""

    def handler(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def payload_of(variant: str) -> str:
    return variant.split("-")[0]


def body(variant: str, partials: int) -> dict:
    b: dict = {"model": f"stub-{payload_of(variant)}", "prompt": "a lighthouse at dusk", "size": "1024x1024", "n": 1}
    if variant.endswith("stream"):
        b.update(stream=True, partial_images=partials)
    return b


def duration_for(rate: float, args: argparse.Namespace) -> float:
    """Enough seconds for ~1500 samples, within [min, max]."""
    return max(args.min_duration, min(args.max_duration, 1500 / rate))


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.gw_cpus, self.gen_cpus = T.cpu_layout(not args.no_pin)
        self.procs: dict[str, T.Proc] = {}
        self.urls: dict[str, str] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.notes: list[str] = []
        self.litellm_info: dict = {}

    # -- set-up ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        a = self.args
        stub = self.procs["stub"] = T.start_stub(self.tmp, self.gen_cpus)
        models = {f"stub-{p}": f"{stub.url}/{p}/{a.delay_ms}/v1" for p in ("small", "large")}
        self.urls["direct"] = ""  # per model, see url()
        self.models = models
        if "thin_proxy" in a.targets:
            self.procs["thin_proxy"] = T.start_thin_proxy(self.tmp, self.gw_cpus, models)
        if "imagegate" in a.targets:
            log("starting imagegate ...")
            self.procs["imagegate"] = T.start_imagegate(self.tmp, self.gw_cpus, models)
        if "litellm" in a.targets:
            try:
                version = T.ensure_litellm(log)
                log(f"starting LiteLLM {version} ...")
                p = self.procs["litellm"] = T.start_litellm(self.tmp, self.gw_cpus, models)
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:  # no index, no start: run without it
                log(f"LiteLLM left out: {e}")
                self.litellm_info = {"error": f"could not install or start LiteLLM: {e}"}
                self.notes.append("LiteLLM could not be installed or started; it is missing from this run.")
                a.targets.remove("litellm")
                return
            self.headers["litellm"] = p.extra["headers"]
            self.litellm_info = {
                "version": version,
                "command": ["litellm", *p.extra["command"]],
                "environment": {**T.LITELLM_ENV, "LITELLM_MASTER_KEY": "sk-bench-<random>"},
                "config": {**T.LITELLM_SETTINGS, "model_list": "one openai/<model> per stub variant, api_base = stub"},
                "ready_seconds": p.extra["ready_s"],
                "notes": [
                    "One worker (the CLI default), uvicorn as the CLI starts it (uvloop; h11, httptools not being a "
                    "LiteLLM dependency; its access log left on, there is no documented switch for it).",
                    "No database, so spend/error logs are not written anyway; no callbacks.",
                    "Requests carry the master key as a Bearer token (LiteLLM refuses to start without one).",
                ],
            }

    def url(self, target: str, variant: str) -> str:
        if target == "direct":
            return f"{self.models['stub-' + payload_of(variant)]}/images/generations"
        return f"{self.procs[target].url}/v1/images/generations"

    def check(self) -> dict:
        """One request per target and variant (lazy imports done, answers checked); LiteLLM streaming probed."""
        out: dict = {}
        for variant in self.args.variants:
            for target in self.args.targets:
                b = body(variant, self.args.partials)
                t = time.perf_counter()
                try:
                    with httpx.stream(
                        "POST", self.url(target, variant), json=b, headers=self.headers.get(target), timeout=60
                    ) as r:
                        content = r.read()
                    status, ctype = r.status_code, r.headers.get("content-type", "")
                except httpx.HTTPError as e:
                    status, ctype, content = 0, "", str(e).encode()
                first = time.perf_counter() - t
                ok = status == 200 and (
                    b"image_generation.completed" in content
                    if variant.endswith("stream")
                    else len(content) >= MIN_LEN[payload_of(variant)]
                )
                if variant.endswith("stream") and ok and not ctype.startswith("text/event-stream"):
                    ok = False
                entry = {"status": status, "content_type": ctype, "bytes": len(content), "first_request_s": first}
                if not ok:
                    entry["answer"] = content[:600].decode("utf-8", "replace")
                entry["ok"] = ok
                out.setdefault(variant, {})[target] = entry
                if ok:  # warm the path a little more
                    for _ in range(5):
                        with contextlib.suppress(httpx.HTTPError):
                            httpx.post(self.url(target, variant), json=b, headers=self.headers.get(target), timeout=60)
                else:
                    log(f"check: {target} {variant}: HTTP {status}: {entry.get('answer', '')[:200]}")
        return out

    # -- one test -------------------------------------------------------------------------------------------------

    def loadgen(self, target: str, variant: str, rate: float) -> dict:
        a = self.args
        cmd = [
            sys.executable,
            str(T.BENCH / "loadgen.py"),
            "--url",
            self.url(target, variant),
            "--body",
            json.dumps(body(variant, a.partials)),
            "--rate",
            str(rate),
            "--duration",
            str(duration_for(rate, a)),
            "--warmup",
            str(a.warmup),
            "--min-len",
            str(MIN_LEN[payload_of(variant)]),
            "--max-conns",
            str(a.max_conns),
            "--timeout",
            str(a.timeout),
        ]
        if variant.endswith("stream"):
            cmd.append("--stream")
        for k, v in self.headers.get(target, {}).items():
            cmd += ["--header", f"{k}: {v}"]
        watched = [self.procs["stub"]] + ([self.procs[target]] if target != "direct" else [])
        cpu0 = {p.name: p.cpu_seconds() for p in watched}
        t0 = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_affinity(self.gen_cpus))
        wall = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"loadgen failed: {done.stderr[-2000:]}")
        res = json.loads(done.stdout)
        total = res["sent"] + round(rate * a.warmup)
        for p in watched:
            used = p.cpu_seconds() - cpu0[p.name]
            key = "stub" if p.name == "stub" else "target"
            res[f"{key}_cpu_us_per_request"] = round(1e6 * used / max(1, total), 1)
            res[f"{key}_cpu_util"] = round(used / wall, 3)
        if target != "direct":
            res["target_rss_mb"] = round(self.procs[target].rss_mb(), 1)
        return res

    def sustained(self, res: dict) -> tuple[bool, str]:
        if res["errors"]:
            kinds = ", ".join(f"{k}={v}" for k, v in res["error_kinds"].items())
            return False, f"errors: {kinds}"
        p99 = res["latency_from_schedule_ms"]["p99"]
        if p99 > self.args.delay_ms + self.args.slo_ms:
            return False, f"p99 {p99:.0f} ms > delay + {self.args.slo_ms} ms"
        return True, ""

    # -- the matrix -----------------------------------------------------------------------------------------------

    def matrix(self, checks: dict) -> list[dict]:
        a = self.args
        runs: list[dict] = []
        for variant in a.variants:
            active = [t for t in a.targets if checks[variant][t]["ok"]]
            if "direct" not in active:
                log(f"{variant}: the stub itself fails; skipped")
                continue
            for rate in a.rates:
                if "direct" not in active or active == ["direct"]:
                    break  # the generator's limit, or no gateway left to measure: the variant is done
                for target in list(active):
                    res = self.test(target, variant, rate)
                    for _ in range(a.retries):
                        if res["sustained"]:
                            break
                        log("  once more (a failed rate is retried before it counts)")
                        first = {k: res[k] for k in ("ok", "errors", "error_kinds", "failure")}
                        first["latency_from_schedule_ms"] = res["latency_from_schedule_ms"]
                        res = self.test(target, variant, rate)
                        res["earlier_failed_attempt"] = first
                    runs.append(res)
                    if not res["sustained"]:
                        active.remove(target)
                        if target == "direct":  # the generator's or the stub's own limit: nothing more to learn
                            break
        return runs

    def test(self, target: str, variant: str, rate: float) -> dict:
        a = self.args
        res = self.loadgen(target, variant, rate)
        ok, why = self.sustained(res)
        gen_ok = res["lag_ms"].get("p99", 0) <= a.max_lag_ms and res["generator_cpu_util"] < 0.95
        res.update(variant=variant, target=target, rate=rate, sustained=ok, failure=why)
        res["generator_kept_schedule"] = gen_ok
        lat = res["latency_from_schedule_ms"]
        log(
            f"{variant:13s} {rate:6.0f} rps {target:10s} ok={res['ok']:6d} err={res['errors']:5d} "
            f"p50={lat.get('p50', math.nan):8.2f} p99={lat.get('p99', math.nan):8.2f} ms "
            f"cpu/req={res.get('target_cpu_us_per_request', res.get('stub_cpu_us_per_request'))} us "
            f"lag99={res['lag_ms'].get('p99', math.nan):.2f} gen={res['generator_cpu_util']:.2f} "
            f"{'' if ok else 'FAIL ' + why}"
        )
        waited = T.quiesce([self.procs[target]] if target != "direct" else [self.procs["stub"]])
        if waited > 5:
            log(f"  {target} took {waited:.0f} s to go idle")
        return res

    def stop(self) -> None:
        for name, p in self.procs.items():
            if name == "imagegate":
                T.stop_imagegate(p)
            else:
                T.kill(p)


def _affinity(cpus):
    def run() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run


# -- summary --------------------------------------------------------------------------------------------------------


def summarize(runs: list[dict], args: argparse.Namespace, checks: dict) -> dict:
    out: dict = {}
    for variant in args.variants:
        vr = [r for r in runs if r["variant"] == variant]
        if not vr:
            continue
        by = {(r["target"], r["rate"]): r for r in vr}
        sustainable: dict[str, float | None] = {}
        lower_bound: dict[str, bool] = {}
        direct_rates = [r["rate"] for r in vr if r["target"] == "direct" and r["sustained"]]
        direct_max = max(direct_rates, default=None)
        tested_max = max(r["rate"] for r in vr)
        for t in args.targets:
            if not checks[variant][t]["ok"]:
                sustainable[t] = None
                continue
            ok_rates = [r["rate"] for r in vr if r["target"] == t and r["sustained"]]
            failed = any(r["target"] == t and not r["sustained"] for r in vr)
            sustainable[t] = max(ok_rates, default=0)
            # never failed: it kept up as far as the stub and generator could go
            lower_bound[t] = not failed and sustainable[t] in (direct_max, tested_max)
        added: dict = {}
        for (t, rate), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            d = by.get(("direct", rate))
            if t == "direct" or d is None or not r["sustained"] or not d["sustained"]:
                continue
            entry = {}
            for key, name in (("latency_from_schedule_ms", ""), ("latency_from_send_ms", "from_send_")):
                for q in ("p50", "p99"):
                    entry[f"{name}{q}"] = round(r[key][q] - d[key][q], 3)
            if variant.endswith("stream"):
                for q in ("p50", "p99"):
                    entry[f"first_event_{q}"] = round(
                        r["first_event_from_schedule_ms"][q] - d["first_event_from_schedule_ms"][q], 3
                    )
            entry["cpu_us_per_request"] = r.get("target_cpu_us_per_request")
            added.setdefault(str(rate), {})[t] = entry
        ratios: dict = {}
        for rate, targets_ in added.items():
            ig = targets_.get("imagegate")
            for other in ("thin_proxy", "litellm"):
                o = targets_.get(other)
                if ig and o:
                    ratios.setdefault(rate, {})[f"imagegate/{other}"] = {
                        q: _ratio(ig[q], o[q]) for q in ("p50", "p99", "cpu_us_per_request")
                    }
        sust_ratio = {}
        for other in ("thin_proxy", "litellm"):
            if sustainable.get("imagegate") is not None and sustainable.get(other):
                sust_ratio[f"imagegate/{other}"] = _ratio(sustainable["imagegate"], sustainable[other])
        tested: dict[str, dict[str, bool]] = {}
        for r in vr:
            tested.setdefault(str(r["rate"]), {})[r["target"]] = r["sustained"]
        out[variant] = {
            "sustained_by_rate": tested,
            "sustainable_rps": sustainable,
            "sustainable_is_lower_bound": lower_bound,
            "direct_sustainable_rps": direct_max,
            "added_latency_ms": added,
            "ratios": ratios,
            "sustainable_ratios": sust_ratio,
        }
    return out


def _positive(v: float) -> float:
    return v if v > 0 else math.nan


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def goals(summary: dict) -> list[dict]:
    """The issue's targets, each with what this run measured."""
    out: list[dict] = []
    for variant, s in summary.items():
        for rate in TARGET_RATES:
            ig = s["added_latency_ms"].get(str(rate), {}).get("imagegate")
            thin = s["added_latency_ms"].get(str(rate), {}).get("thin_proxy")
            held = s["sustained_by_rate"].get(str(rate), {})
            for q in ("p50", "p99"):
                item = {
                    "goal": f"{variant}, {rate} req/s: imagegate added {q} <= 1.25 x thin proxy's",
                    "imagegate_ms": ig and ig[q],
                    "thin_proxy_ms": thin and thin[q],
                }
                if ig and thin:
                    # both can be ~0 or negative (within noise of direct): compare with a 0.1 ms floor
                    item["ratio"] = _ratio(max(ig[q], 0.1), max(thin[q], 0.1))
                    item["met"] = max(ig[q], 0.1) <= 1.25 * max(thin[q], 0.1)
                elif thin and not ig:
                    item["met"] = False
                    item["why"] = "imagegate did not sustain this rate (or was not run at it); the thin proxy did"
                elif ig and not thin:
                    item["met"] = True
                    item["why"] = "the thin proxy did not sustain this rate; imagegate did"
                else:
                    item["met"] = None
                    item["why_not_measured"] = (
                        "neither gateway sustained this rate" if held else "this rate was not run (a lower one failed)"
                    )
                out.append(item)
            if ig and thin:
                out.append(
                    {
                        "goal": f"{variant}, {rate} req/s: imagegate CPU per request <= 1.25 x thin proxy's",
                        "imagegate_us": ig["cpu_us_per_request"],
                        "thin_proxy_us": thin["cpu_us_per_request"],
                        "ratio": _ratio(ig["cpu_us_per_request"], thin["cpu_us_per_request"]),
                        "met": ig["cpu_us_per_request"] <= 1.25 * thin["cpu_us_per_request"],
                    }
                )
        sr = s["sustainable_rps"]
        if sr.get("imagegate") is not None and sr.get("thin_proxy"):
            out.append(
                {
                    "goal": f"{variant}: imagegate sustainable rate >= 0.8 x thin proxy's",
                    "imagegate_rps": sr["imagegate"],
                    "thin_proxy_rps": sr["thin_proxy"],
                    "lower_bounds": s["sustainable_is_lower_bound"],
                    "ratio": _ratio(sr["imagegate"], sr["thin_proxy"]),
                    "met": sr["imagegate"] >= 0.8 * sr["thin_proxy"],
                }
            )
        if sr.get("litellm") is None:
            out.append({"goal": f"{variant}: vs LiteLLM", "met": None, "why_not_measured": "LiteLLM fails this"})
            continue
        if sr.get("imagegate") is not None:
            ll = sr["litellm"]
            out.append(
                {
                    "goal": f"{variant}: imagegate sustainable rate >= 10 x LiteLLM's",
                    "imagegate_rps": sr["imagegate"],
                    "litellm_rps": ll,
                    "lower_bounds": s["sustainable_is_lower_bound"],
                    "ratio": _ratio(sr["imagegate"], ll) if ll else None,
                    "met": (sr["imagegate"] >= 10 * ll) if ll else None,
                    **({} if ll else {"why_not_measured": "LiteLLM sustained none of the tested rates"}),
                }
            )
        for rate, targets_ in s["added_latency_ms"].items():
            if "litellm" in targets_ and "imagegate" in targets_:
                for q in ("p50", "p99"):
                    ig, ll = targets_["imagegate"][q], targets_["litellm"][q]
                    out.append(
                        {
                            "goal": f"{variant}, {rate} req/s: imagegate added {q} <= 0.1 x LiteLLM's",
                            "imagegate_ms": ig,
                            "litellm_ms": ll,
                            "ratio": _ratio(max(ig, 0.1), max(ll, 0.1)),
                            "met": max(ig, 0.1) <= 0.1 * max(ll, 0.1),
                        }
                    )
    return out


# -- chart ----------------------------------------------------------------------------------------------------------


def chart(path: Path, runs: list[dict], summary: dict, args: argparse.Namespace) -> Path:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    from plot import plt  # pyplot on the Agg backend

    variants = [v for v in args.variants if v in summary]
    cols = 2
    rows = max(1, math.ceil(len(variants) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(12, 4.2 * rows), dpi=110, squeeze=False)
    colors = {"imagegate": "#c44e52", "thin_proxy": "#4c72b0", "litellm": "#55a868"}
    for ax, variant in zip(axes.flat, variants, strict=False):
        added = summary[variant]["added_latency_ms"]
        for t in ("imagegate", "thin_proxy", "litellm"):
            pts = sorted((float(r), v[t]) for r, v in added.items() if t in v)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            sust = summary[variant]["sustainable_rps"].get(t)
            label = f"{t} (sustains {sust:g} req/s)" if sust else t
            # an added latency <= 0 (within the noise of direct) cannot go on a log scale: left out
            ax.plot(xs, [_positive(p[1]["p50"]) for p in pts], "o-", color=colors[t], label=f"{label} p50")
            ax.plot(xs, [_positive(p[1]["p99"]) for p in pts], "s--", color=colors[t], alpha=0.7, label=f"{t} p99")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        rates = sorted({float(r) for r in added})
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        sust = summary[variant]["sustainable_rps"]
        notes = [
            f"{t}: does not work (see checks)"
            for t in ("imagegate", "thin_proxy", "litellm")
            if sust.get(t) is None and t in args.targets
        ]
        notes += [f"{t}: sustained no tested rate" for t in ("imagegate", "thin_proxy", "litellm") if sust.get(t) == 0]
        if notes:
            ax.text(0.01, 0.01, "\n".join(notes), transform=ax.transAxes, fontsize=7)
        ax.set_title(f"{variant}: added latency vs direct (stub {args.delay_ms} ms)")
        ax.set_xlabel("offered load, req/s (open loop)")
        ax.set_ylabel("added latency, ms (log; values <= 0 left out)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(variants) :]:
        ax.axis("off")
    fig.suptitle("imagegate vs thin Litestar+aiohttp proxy vs LiteLLM: latency added to a stub image API")
    fig.tight_layout()
    path = path.with_suffix(".png")
    fig.savefig(path)
    plt.close(fig)
    return path


# -- main -----------------------------------------------------------------------------------------------------------


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("litestar", "uvicorn", "uvloop", "httptools", "aiohttp", "msgspec"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "app"], cwd=ROOT, capture_output=True, text=True)
        out["imagegate_git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return out


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(), "loadavg": os.getloadavg()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)), help="req/s, stepped up in this order")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--delay-ms", type=int, default=50, help="the stub's fixed delay")
    ap.add_argument("--partials", type=int, default=2, help="partial images per streamed request")
    ap.add_argument("--min-duration", type=float, default=5.0, help="measured seconds per test, at least")
    ap.add_argument("--max-duration", type=float, default=10.0, help="measured seconds per test, at most")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement")
    ap.add_argument("--slo-ms", type=float, default=200.0, help="p99 may exceed the stub's delay by this much")
    ap.add_argument("--max-conns", type=int, default=512, help="requests in flight at most (else an error)")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--retries", type=int, default=1, help="runs of a failed rate before it counts as failed")
    ap.add_argument("--max-lag-ms", type=float, default=10.0, help="generator lag p99 that flags a test")
    ap.add_argument("--no-pin", action="store_true", help="do not pin gateways and generator to separate CPUs")
    ap.add_argument("--quick", action="store_true", help="smoke run: rates 50,300,1200, 3 s tests")
    ap.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rates, args.min_duration, args.max_duration, args.warmup = "50,300,1200", 3.0, 3.0, 1.0
    args.rates = [int(float(r)) if float(r).is_integer() else float(r) for r in args.rates.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    args.targets = [t for t in args.targets.split(",") if t]
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")
    unknown = set(args.variants) - set(VARIANTS) | set(args.targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown: {sorted(unknown)}")
    return args


def main() -> None:
    args = parse_args()
    from stub import raise_nofile

    on_sigterm()
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="imagegate-overhead-"))
    bench = Bench(args, tmp)
    started = time.monotonic()
    out: dict = {
        "benchmark": "overhead",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "versions": versions(),
    }
    try:
        bench.start()
        out["pinning"] = {"gateways": bench.gw_cpus, "stub_and_loadgen": bench.gen_cpus}
        log("checking every target ...")
        checks = bench.check()
        runs = bench.matrix(checks)
    except BaseException:
        log(f"failed; the servers' logs are kept in {tmp}")
        raise
    finally:
        rss = {n: round(p.rss_mb("VmHWM"), 1) for n, p in bench.procs.items() if p.proc.poll() is None}
        bench.stop()
    summary = summarize(runs, args, checks)
    out.update(
        {
            "elapsed_s": round(time.monotonic() - started),
            "setup": {
                "stub_delay_ms": args.delay_ms,
                "partial_images": args.partials,
                "payloads": payload_sizes(),
                "request": body("small-stream", args.partials),
                "rates": args.rates,
                "durations": {str(r): duration_for(r, args) for r in args.rates},
                "warmup_s": args.warmup,
                "max_conns": args.max_conns,
                "timeout_s": args.timeout,
                "imagegate_config": bench.procs["imagegate"].extra["config"] if "imagegate" in bench.procs else None,
                "sustained_means": (
                    f"zero errors (non-200, short body, stream without completed event, {args.timeout:g} s timeout, "
                    f"> {args.max_conns} in flight) and p99 from the scheduled send <= stub delay + {args.slo_ms:g} "
                    "ms; "
                    f"a failed rate is run up to {args.retries} more time(s) and counts if any run passes; the "
                    "sustainable rate is the highest tested rate sustained (a lower bound when the target never "
                    "failed up to where direct, i.e. the generator and stub, stopped)"
                ),
                "added_latency_means": (
                    "target minus direct at the same rate in the same run; p50 and p99 of the latency from the "
                    "scheduled send time to the last byte (from_send_*: from the write, without generator lag)"
                ),
                "generator": (
                    "loadgen.py: open loop, raw asyncio protocol + httptools on uvloop, one process per test, "
                    "keep-alive connections (LIFO pool), pinned with the stub"
                ),
            },
            "litellm": bench.litellm_info,
            "checks": checks,
            "peak_rss_mb": rss,
            "summary": summary,
            "goals": goals(summary),
            "runs": runs,
            "notes": [
                *bench.notes,
                "Noisy 2-core VM: compare targets within one rate (they ran back to back), not across runs.",
                "direct shares its CPU with the load generator, the gateways have the other CPU to themselves.",
            ],
        }
    )
    if "litellm" in args.targets:
        streamed = [v for v in args.variants if v.endswith("stream")]
        for v in streamed:
            c = checks.get(v, {}).get("litellm")
            if c and not c["ok"]:
                out["litellm"].setdefault("streaming", {})[v] = {
                    "supported": False,
                    "status": c["status"],
                    "answer": c.get("answer", ""),
                }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    png = chart(path, runs, summary, args)
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {path} and {png} ({out['elapsed_s']} s)")
    print(json.dumps({"summary": summary, "goals": out["goals"]}, indent=1))


if __name__ == "__main__":
    main()
