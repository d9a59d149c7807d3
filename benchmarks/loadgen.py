"""Open-loop HTTP/1.1 load generator: raw asyncio protocol + httptools on uvloop, one process per test.

Requests are sent at scheduled times, ``i / rate`` apart, whatever the answers do (open loop: a slow target gets
more requests in flight, not fewer), each on an idle keep-alive connection, else a new one, up to ``max_conns``;
past that cap the request is not sent and counts as a ``no_connection`` error (the target is not keeping up). The
first ``warmup`` seconds are sent but left out of the figures.

Per request it records the scheduled time, the time the request was written, the first body byte, the end of the
first SSE event (streamed requests), and the last byte. Latency is given both from the scheduled time (no
coordinated omission: a generator that falls behind its schedule shows it) and from the write; ``lag`` is write
minus schedule, the generator's own delay (event-loop timers have about 1 ms of granularity). Nothing of the body is
parsed or copied in the hot path (httptools reads the headers; a body with a Content-Length is then only counted, a
chunked stream is de-chunked by hand and only the bytes after newlines are looked at, which skips base64 images at
memchr speed): a non-streamed answer must be a 200 of at least ``min_len`` bytes; a streamed one a 200 that carries
an ``image_generation.completed`` event and no ``error`` event. Requests still unanswered ``timeout`` seconds after
their scheduled time are aborted (``timeout``).

``--collect-events`` keeps every SSE event with its arrival time (for the streams benchmark) and reports, for images
stamped by the stub (``stub.py``'s ``stamp`` payload), the delivery delay: arrival minus the stub's emit time (both
``time.monotonic``, which is system-wide on Linux).

Usage: ``python benchmarks/loadgen.py --url URL --body '{"model": ...}' --rate 100 --duration 10 [--stream]``;
prints one JSON object (the figures) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import resource
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stub import emit_time_ns, raise_nofile, run

now = time.monotonic

COMPLETED = b"image_generation.completed"
ERROR_EVENT = b"event: error"
# Lines that mark a stream's completed event or an error event. The scan looks only just after newlines (memchr:
# base64 images have none), so a 2 MB image costs next to nothing to skip.
_DONE_LINES = (b"event: image_generation.completed", b'data: {"type":"image_generation.completed"')
_ERROR_LINES = (b"event: error", b'data: {"type":"error"')
_MARK = 1 + max(map(len, _DONE_LINES + _ERROR_LINES))


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0-1) of ``xs`` by linear interpolation; nan if empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_ms(xs: list[float]) -> dict[str, float]:
    """Percentiles of durations given in seconds, in milliseconds."""
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    out = {"n": len(s), "mean": round(1000 * sum(s) / len(s), 4)}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
        out[name] = round(1000 * pct(s, q), 4)
    out["max"] = round(1000 * s[-1], 4)
    return out


class Rec:
    __slots__ = (
        "buf",
        "completed",
        "error",
        "events",
        "failed_event",
        "measured",
        "nbytes",
        "sched",
        "status",
        "t_done",
        "t_event",
        "t_first",
        "t_write",
        "tail",
    )

    def __init__(self, sched: float, measured: bool) -> None:
        self.sched = sched
        self.measured = measured
        self.t_write = self.t_first = self.t_event = self.t_done = 0.0
        self.status = 0
        self.nbytes = 0
        self.error = ""
        self.completed = False
        self.failed_event = False
        self.tail = b"\n"
        self.events: list[tuple[float, bytes]] | None = None
        self.buf: bytearray | None = None


def _scan(rec: Rec, data: bytes, t: float, start: int = 0, end: int | None = None) -> None:
    """Note an event boundary (blank line), a completed event or an error event starting after a newline."""
    end = len(data) if end is None else end
    i = data.find(b"\n", start, end)
    while i >= 0:
        if data.startswith(b"\n", i + 1, end) and not rec.t_event:
            rec.t_event = t
        elif data.startswith(_DONE_LINES, i + 1, end):
            rec.completed = True
        elif data.startswith(_ERROR_LINES, i + 1, end):
            rec.failed_event = True
        i = data.find(b"\n", i + 1, end)


def _content(rec: Rec, data: bytes, start: int, end: int, t: float) -> None:
    """A piece of a stream's content: scanned in place, plus the lines split between it and the previous piece."""
    rec.nbytes += end - start
    joint = rec.tail + data[start : min(end, start + _MARK)]
    _scan(rec, joint, t)
    _scan(rec, data, t, start, end)
    rec.tail = (rec.tail + data[max(start, end - _MARK) : end])[-_MARK:]


class Conn(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.rec: Rec | None = None
        self.keep = True
        self.length = -1  # Content-Length of the answer being read, less the body bytes seen
        self.counting = 0  # body bytes still to come, counted without the parser (non-streamed answers)
        self.head: bytearray | None = None  # a streamed answer's headers, until complete
        self.chunked = False
        self.chunks = False  # reading a chunked body with _walk
        self.chunk_left = self.crlf_left = 0
        self.last_chunk = False
        self.size_line = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, rec: Rec) -> None:
        self.rec = rec
        self.client.busy.add(self)
        # streamed answers: the headers go through httptools, a chunked body through _walk (no copies)
        self.head = bytearray() if self.client.stream and not self.client.collect else None
        rec.t_write = now()
        assert self.transport is not None
        self.transport.write(self.client.request)

    def data_received(self, data: bytes) -> None:
        if self.chunks:
            self._walk(data)
            return
        if self.head is not None and self.rec is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = bytes(self.head[: end + 4]), bytes(self.head[end + 4 :])
            self.head = None
            self.parser = httptools.HttpResponseParser(self)
            try:
                self.parser.feed_data(head)
            except httptools.HttpParserError:
                self._fail("bad_response")
                return
            if self.rec is not None and self.chunked:
                self.chunks = True
                self.rec.t_first = now()
                self._walk(rest)
            elif rest:
                self.data_received(rest)  # a plain body (an error answer): the parser reads it
            return
        if self.counting:  # the rest of a large body: count it, leave the parser out (no copies)
            rec = self.rec
            n = len(data)
            if rec is not None:
                rec.nbytes += min(n, self.counting)
            if n < self.counting:
                self.counting -= n
                return
            self.counting = 0  # (bytes past the body would be a server error: there is no pipelining)
            self.parser = httptools.HttpResponseParser(self)
            self.on_message_complete()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover
            pass
        except httptools.HttpParserError:
            self._fail("bad_response")
            return
        if self.rec is not None and self.length > 0 and not self.client.stream:
            self.counting = self.length  # headers read, body under way: count the rest ourselves
            if not self.rec.t_first:
                self.rec.t_first = now()

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self.length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True

    def on_message_begin(self) -> None:
        self.length = -1
        self.chunked = False

    def _walk(self, data: bytes) -> None:
        """A chunked body, decoded by hand: chunk sizes read, content scanned in place, never copied."""
        rec = self.rec
        if rec is None:
            return
        t = now()
        pos, n = 0, len(data)
        while pos < n:
            if self.chunk_left:
                end = min(n, pos + self.chunk_left)
                _content(rec, data, pos, end, t)
                self.chunk_left -= end - pos
                pos = end
                if not self.chunk_left:
                    self.crlf_left = 2
            elif self.crlf_left:
                k = min(self.crlf_left, n - pos)
                pos += k
                self.crlf_left -= k
                if not self.crlf_left and self.last_chunk:
                    self.chunks = self.last_chunk = False
                    self.parser = httptools.HttpResponseParser(self)
                    self.on_message_complete()
                    return
            else:
                j = data.find(b"\n", pos)
                if j < 0:
                    self.size_line += data[pos:]
                    return
                self.size_line += data[pos : j + 1]
                pos = j + 1
                try:
                    size = int(bytes(self.size_line).split(b";")[0].strip(), 16)
                except ValueError:
                    self._fail("bad_chunk")
                    return
                self.size_line = bytearray()
                if size:
                    self.chunk_left = size
                else:  # the last chunk; no trailers expected, just the final CRLF
                    self.last_chunk = True
                    self.crlf_left = 2

    def on_headers_complete(self) -> None:
        if self.rec is not None:
            self.rec.status = self.parser.get_status_code()
            self.keep = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        rec = self.rec
        if rec is None:
            return
        t = now()
        if not rec.t_first:
            rec.t_first = t
        rec.nbytes += len(body)
        if self.length > 0:
            self.length -= len(body)
        if not self.client.stream:
            return
        if rec.buf is not None:  # collect every event with its arrival time
            rec.buf += body
            while True:
                i = rec.buf.find(b"\n\n")
                if i < 0:
                    break
                event = bytes(rec.buf[:i])
                del rec.buf[: i + 2]
                if event.startswith(b":"):  # keep-alive comment
                    continue
                rec.events.append((t, event))
                if not rec.t_event:
                    rec.t_event = t
                if event.startswith(_DONE_LINES) or b"\n" + COMPLETED in event or b'"' + COMPLETED in event:
                    rec.completed = True
                if event.startswith(_ERROR_LINES):
                    rec.failed_event = True
            return
        _scan(rec, rec.tail + body[:_MARK], t)  # lines split between two reads
        _scan(rec, body, t)
        rec.tail = body[-_MARK:]

    def on_message_complete(self) -> None:
        rec = self.rec
        if rec is None:
            return
        rec.t_done = now()
        self.rec = None
        self.client.busy.discard(self)
        if rec.status != 200:
            rec.error = f"status_{rec.status}"
        elif self.client.stream:
            if rec.failed_event:
                rec.error = "error_event"
            elif not rec.completed:
                rec.error = "stream_incomplete"
        elif rec.nbytes < self.client.min_len:
            rec.error = "short_body"
        self.client.finish(rec)
        if self.keep and self.transport is not None and not self.transport.is_closing():
            self.client.idle.append(self)
        elif self.transport is not None:
            self.transport.close()

    def _fail(self, kind: str) -> None:
        rec, self.rec = self.rec, None
        self.client.busy.discard(self)
        if rec is not None:
            rec.error = rec.error or kind
            rec.t_done = now()
            self.client.finish(rec)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.client.nconns -= 1
        if self in self.client.idle:
            self.client.idle.remove(self)
        self.transport = None
        if self.rec is not None:
            self._fail("connection_lost")


class Client:
    def __init__(
        self,
        url: str,
        body: bytes,
        *,
        stream: bool,
        min_len: int,
        max_conns: int,
        timeout: float,
        collect: bool,
        headers: dict[str, str],
    ) -> None:
        u = urlsplit(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        head = [f"POST {u.path or '/'} HTTP/1.1", f"host: {u.netloc}", "content-type: application/json"]
        head += [f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        if stream:
            head.append("accept: text/event-stream")
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.stream = stream
        self.min_len = min_len
        self.max_conns = max_conns
        self.timeout = timeout
        self.collect = collect
        self.idle: list[Conn] = []
        self.busy: set[Conn] = set()
        self.nconns = 0
        self.max_open = 0
        self.records: list[Rec] = []
        self.pending = 0
        self.loop = asyncio.get_running_loop()
        self.all_done = asyncio.Event()
        self.all_done.set()

    def fire(self, rec: Rec) -> None:
        self.records.append(rec)
        self.pending += 1
        self.all_done.clear()
        if self.collect:
            rec.events = []
            rec.buf = bytearray()
        if self.idle:
            self.idle.pop().send(rec)
        elif self.nconns < self.max_conns:
            self.nconns += 1
            self.max_open = max(self.max_open, self.nconns)
            self.loop.create_task(self._connect(rec))
        else:
            rec.error = "no_connection"
            rec.t_done = now()
            self.finish(rec)

    async def _connect(self, rec: Rec) -> None:
        try:
            _, conn = await self.loop.create_connection(lambda: Conn(self), self.host, self.port)
        except OSError as e:
            self.nconns -= 1
            rec.error = f"connect_{type(e).__name__}"
            rec.t_done = now()
            self.finish(rec)
            return
        if now() - rec.sched > self.timeout:
            rec.error = "timeout"
            rec.t_done = now()
            self.finish(rec)
            conn.transport.close()
            return
        conn.send(rec)

    def finish(self, rec: Rec) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.all_done.set()

    async def reaper(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            t = now()
            for conn in list(self.busy):
                if conn.rec is not None and t - conn.rec.sched > self.timeout:
                    conn.rec.error = "timeout"
                    conn._fail("timeout")

    def close(self) -> None:
        for conn in list(self.idle):
            if conn.transport is not None:
                conn.transport.close()


async def open_loop(client: Client, rate: float, duration: float, warmup: float) -> tuple[float, float]:
    """Send at ``rate`` for ``warmup + duration`` seconds; returns the measured window (start, end) in now()."""
    n_warm = round(rate * warmup)
    n = n_warm + round(rate * duration)
    reaper = asyncio.create_task(client.reaper())
    t0 = now() + 0.05
    i = 0
    try:
        while i < n:
            t = now()
            due = t0 + i / rate
            if due > t:
                await asyncio.sleep(due - t)
                continue
            while i < n and t0 + i / rate <= t:
                client.fire(Rec(t0 + i / rate, i >= n_warm))
                i += 1
        await asyncio.wait_for(client.all_done.wait(), timeout=client.timeout + 5)
    finally:
        reaper.cancel()
        client.close()
    return t0 + n_warm / rate, t0 + n / rate


def figures(client: Client, window: tuple[float, float], rate: float, cpu_s: float, wall_s: float) -> dict:
    recs = [r for r in client.records if r.measured]
    ok = [r for r in recs if not r.error]
    errors: dict[str, int] = {}
    for r in recs:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    start, end = window
    span = end - start
    done_in_window = sum(1 for r in ok if r.t_done <= end + 1.0)
    out = {
        "offered_rps": rate,
        "duration_s": round(span, 3),
        "sent": len(recs),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "achieved_rps": round(len(ok) / span, 2) if span > 0 else 0.0,
        "completed_within_1s_of_end": done_in_window,
        "latency_from_schedule_ms": summary_ms([r.t_done - r.sched for r in ok]),
        "latency_from_send_ms": summary_ms([r.t_done - r.t_write for r in ok]),
        "first_byte_from_send_ms": summary_ms([r.t_first - r.t_write for r in ok if r.t_first]),
        "lag_ms": summary_ms([r.t_write - r.sched for r in recs if r.t_write]),
        "bytes_per_response": round(sum(r.nbytes for r in ok) / len(ok)) if ok else 0,
        "connections_opened": client.max_open,
        "generator_cpu_util": round(cpu_s / wall_s, 3) if wall_s > 0 else math.nan,
    }
    if client.stream:
        out["first_event_from_schedule_ms"] = summary_ms([r.t_event - r.sched for r in ok if r.t_event])
        out["first_event_from_send_ms"] = summary_ms([r.t_event - r.t_write for r in ok if r.t_event])
    if client.collect:
        out.update(_event_figures(client.records))
    return out


def _emit_ns(event: bytes) -> int | None:
    i = event.find(b'"b64_json":"')
    if i < 0:
        return None
    j = event.find(b'"', i + 12)
    return emit_time_ns(base64.b64decode(event[i + 12 : j]))


def _event_figures(recs: list[Rec]) -> dict:
    """Delivery delay of stamped events, concurrency of open streams, events per stream."""
    delays: list[float] = []
    steady: list[float] = []
    by_index: dict[int, list[float]] = {}
    unstamped = 0
    opened = max((r.t_write for r in recs), default=0.0) + 0.25  # every stream is open after this
    counts: dict[int, int] = {}
    for r in recs:
        assert r.events is not None
        counts[len(r.events)] = counts.get(len(r.events), 0) + 1
        for k, (t, event) in enumerate(r.events):
            emitted = _emit_ns(event)
            if emitted is None:
                unstamped += 1
                continue
            d = t - emitted / 1e9
            delays.append(d)
            if emitted / 1e9 >= opened:
                steady.append(d)
            by_index.setdefault(k, []).append(d)
    # streams open at once: +1 at write, -1 at done
    edges = sorted([(r.t_write, 1) for r in recs if r.t_write] + [(r.t_done, -1) for r in recs if r.t_done])
    open_now = peak = 0
    for _, step in edges:
        open_now += step
        peak = max(peak, open_now)
    return {
        "event_delivery_delay_ms": summary_ms(delays),
        "event_delivery_delay_all_open_ms": summary_ms(steady),
        "event_delivery_delay_by_event_ms": {str(k): summary_ms(v) for k, v in sorted(by_index.items())},
        "unstamped_events": unstamped,
        "events_per_stream": {str(k): v for k, v in sorted(counts.items())},
        "peak_open_streams": peak,
        "stream_duration_from_send_ms": summary_ms([r.t_done - r.t_write for r in recs if r.t_done and not r.error]),
    }


async def main_async(args: argparse.Namespace) -> dict:
    body = args.body.encode() if args.body else Path(args.body_file).read_bytes()
    headers = dict(h.split(":", 1) for h in args.header)
    client = Client(
        args.url,
        body,
        stream=args.stream,
        min_len=args.min_len,
        max_conns=args.max_conns,
        timeout=args.timeout,
        collect=args.collect_events,
        headers={k.strip(): v.strip() for k, v in headers.items()},
    )
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = now()
    window = await open_loop(client, args.rate, args.duration, args.warmup)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return figures(client, window, args.rate, cpu, now() - w0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--body", default="", help="the JSON request body")
    ap.add_argument("--body-file", default="")
    ap.add_argument("--header", action="append", default=[], help="extra header, 'name: value'")
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds sent first and not measured")
    ap.add_argument("--stream", action="store_true", help="the answers are SSE streams")
    ap.add_argument("--min-len", type=int, default=1, help="shortest acceptable non-streamed body")
    ap.add_argument("--max-conns", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--collect-events", action="store_true")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    raise_nofile()
    result = run(main_async(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
