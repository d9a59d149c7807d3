"""OpenTelemetry traces: off unless the standard ``OTEL_*`` environment variables turn them on.

On when ``OTEL_TRACES_EXPORTER`` names an exporter other than ``none`` (``otlp``, OTLP over HTTP with protobuf, or
``console``), or when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set;
``OTEL_SDK_DISABLED=true`` turns them off whatever else is set. The SDK reads the rest from the environment as usual:
``OTEL_SERVICE_NAME`` (default ``imagegate`` for the gateway, ``imagegate-worker`` for workers), ``OTEL_TRACES_SAMPLER``
and ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_*`` (headers, timeout,
compression), ``OTEL_BSP_*`` (the batch span processor) and ``OTEL_PROPAGATORS`` (default W3C ``traceparent`` and
``tracestate``, and baggage).

When off, nothing of the SDK is imported or built: call sites guard span creation with the module-level
:data:`ENABLED`, so the hot path pays one attribute read. Spans start explicitly (:func:`start_span`) where their
start and end are in different places (the queue of a worker, an admitted request), and as context managers
(:func:`span`) where they wrap a block.

This module imports nothing of the gateway or the worker: both use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("imagegate.telemetry")

GATEWAY = "imagegate"
WORKER = "imagegate-worker"
"""Default service names (``OTEL_SERVICE_NAME`` overrides them)."""

EXPORT_BATCH = 32
"""Spans per export when ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` is unset (the SDK's default is 512). Encoding a batch
holds the GIL: 512 spans at once stalled the event loop for tens of milliseconds (+50 to +80 ms of p99 latency at
200 req/s in ``benchmarks/telemetry.py``, 128 as much); with batches of 32 the p99 stayed that of tracing off, for
the same CPU."""

ENABLED = False
"""Whether traces are on in this process: the one check every call site makes before touching a span."""

_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_global = False
"""Whether the global tracer provider was set (the API allows it once per process)."""
_NOOP = contextlib.nullcontext()


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables of ``environ`` (default: the process's) ask for traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporter_names(env)
    if exporters is not None:
        return bool(exporters)
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter_names(env: Mapping[str, str]) -> list[str] | None:
    """``OTEL_TRACES_EXPORTER`` as a list without ``none`` (None when unset: then an endpoint means otlp)."""
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        return None
    return [name for name in (n.strip() for n in raw.split(",")) if name and name != "none"]


def setup(service: str, *, environ: Mapping[str, str] | None = None, exporter: SpanExporter | None = None) -> bool:
    """Build this process's tracer provider if the environment asks for traces (or ``exporter`` is given).

    Args:
        service: the service name used unless ``OTEL_SERVICE_NAME`` (or ``service.name`` in
            ``OTEL_RESOURCE_ATTRIBUTES``) names one: :data:`GATEWAY` or :data:`WORKER`.
        environ: the variables to read (default: the process's environment; tests pass their own).
        exporter: export to this instead of what the environment names, through a processor that exports each span
            as it ends (tests use an in-memory exporter).

    Returns:
        Whether traces are on.
    """
    global ENABLED, _global, _provider, _tracer
    env = os.environ if environ is None else environ
    if exporter is None and not wanted(env):
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER(_ARG)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        batch = None if env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") else EXPORT_BATCH
        for made in _exporters(env):
            provider.add_span_processor(BatchSpanProcessor(made, max_export_batch_size=batch))
    if _provider is not None:
        _provider.shutdown()
    if not _global:
        trace.set_tracer_provider(provider)  # for libraries that trace through the global provider (once only)
        _global = True
    _provider, _tracer = provider, provider.get_tracer("imagegate")
    ENABLED = True
    log.info("tracing on: service %s, exporting to %s", resource.attributes.get(SERVICE_NAME), _where(env, exporter))
    return True


def _exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    names = _exporter_names(env)
    out: list[SpanExporter] = []
    for name in ["otlp"] if names is None else names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol and protocol != "http/protobuf":
                log.warning("OTLP protocol %s is not supported here; exporting with http/protobuf", protocol)
            out.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        else:
            log.warning("unknown traces exporter %r (otlp, console or none): ignored", name)
    return out


def _where(env: Mapping[str, str], exporter: SpanExporter | None) -> str:
    if exporter is not None:
        return type(exporter).__name__
    names = _exporter_names(env) or ["otlp"]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "default"
    # An endpoint's user info or query could hold a credential: only its scheme, host and port are logged.
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    host = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}" if parts.hostname else endpoint
    return ", ".join(f"{n} ({host})" if n == "otlp" else n for n in names)


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is still buffered (for at most ``timeout_s``) and stop; tracing is off afterwards."""
    global ENABLED, _provider, _tracer
    provider, _provider, _tracer, ENABLED = _provider, None, None, False
    if provider is not None:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()


def tracer() -> Tracer:
    assert _tracer is not None, "tracing is off: check ENABLED first"
    return _tracer


# -- spans ---------------------------------------------------------------------------------------------------------


def start_span(
    name: str,
    *,
    context: Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    start_time: int | None = None,
    server: bool = False,
) -> Span:
    """A started span, child of ``context``'s span (default: the current one); the caller ends it."""
    from opentelemetry.trace import SpanKind

    kind = SpanKind.SERVER if server else SpanKind.INTERNAL
    return tracer().start_span(name, context=context, kind=kind, attributes=attributes, start_time=start_time)


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Span | None]:
    """A span around a block, current inside it; a shared no-op when tracing is off (nothing is built)."""
    if not ENABLED:
        return _NOOP
    return tracer().start_as_current_span(name, attributes=attributes or None, record_exception=False)


def server_span(
    method: str, route: str, headers: Iterable[tuple[bytes, bytes]], request_id: str
) -> tuple[Span, object]:
    """Start an HTTP request's server span, child of the client's ``traceparent`` if it sent one, and make it current.

    Returns the span and the token :func:`end_server_span` takes back.
    """
    parent = extract_asgi(headers)
    attributes = {"http.request.method": method, "http.route": route, "imagegate.request_id": request_id}
    started = start_span(f"{method} {route}", context=parent, attributes=attributes, server=True)
    return started, attach(started, parent)


def end_server_span(
    traced: tuple[Span, object], status: int, principal: str | None, model: str | None, backend: str | None
) -> str:
    """End what :func:`server_span` started with the request's outcome; returns the trace id."""
    span, token = traced
    detach(token)
    span.set_attribute("http.response.status_code", status)
    for key, value in (("imagegate.principal", principal), ("imagegate.model", model), ("imagegate.backend", backend)):
        if value is not None:
            span.set_attribute(key, value)
    if status >= 500:
        fail(span, f"HTTP {status}")
    span.end()
    return trace_id(span)


def in_trace() -> bool:
    """Whether a recording span is current (a traced request runs), so that new spans join its trace."""
    from opentelemetry import trace

    return trace.get_current_span().is_recording()


def fail(span: Span, error: BaseException | str, *, record: bool = True) -> None:
    """Mark ``span`` failed: error status with the message, and an exception event if ``record``."""
    from opentelemetry.trace import Status, StatusCode

    message = error if isinstance(error, str) else str(getattr(error, "message", "") or error)
    if record and isinstance(error, BaseException):
        span.record_exception(error, escaped=True)
    span.set_status(Status(StatusCode.ERROR, message))


def trace_id(span: Span) -> str:
    """The span's trace id as 32 hex digits (as logs and backends show it)."""
    return format(span.get_span_context().trace_id, "032x")


def attach(span: Span, context: Context | None = None) -> object:
    """Make ``span`` the current span (in ``context``, default the current one); returns the token for detach."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    return otel_context.attach(trace.set_span_in_context(span, context))


def detach(token: object) -> None:
    from opentelemetry import context as otel_context

    otel_context.detach(token)  # type: ignore[arg-type]


def context_with(span: Span, context: Context | None = None) -> Context:
    """A context whose current span is ``span`` (for children made elsewhere: another thread, later)."""
    from opentelemetry import trace

    return trace.set_span_in_context(span, context)


# -- propagation (W3C trace context by default: OTEL_PROPAGATORS) ----------------------------------------------------


class _AsgiHeaders:
    """Reads propagation headers from an ASGI scope's ``[(name, value), ...]`` (names lower-case bytes)."""

    def get(self, carrier: Iterable[tuple[bytes, bytes]], key: str) -> list[str] | None:
        wanted = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k == wanted]
        return values or None

    def keys(self, carrier: Iterable[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_ASGI = _AsgiHeaders()


def extract_asgi(headers: Iterable[tuple[bytes, bytes]]) -> Context:
    """The trace context a client sent (``traceparent``, ``tracestate``), from ASGI headers."""
    from opentelemetry import propagate

    return propagate.extract(headers, getter=_ASGI)  # type: ignore[arg-type]


def extract(headers: Mapping[str, str]) -> Context:
    """The trace context in ``headers`` (a case-insensitive mapping, as aiohttp's)."""
    from opentelemetry import propagate

    return propagate.extract(headers)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current trace context to outgoing ``headers`` (``traceparent``, ``tracestate``)."""
    from opentelemetry import propagate

    propagate.inject(headers)


@contextlib.contextmanager
def current(span: Span) -> Iterator[None]:
    """Make ``span`` current for a block."""
    token = attach(span)
    try:
        yield
    finally:
        detach(token)
