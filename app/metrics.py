"""Every Prometheus metric of the gateway, declared once.

Labels stay bounded: model and backend names come from the configuration, outcomes from a fixed set; prompts, users
and keys never become labels.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram

M = TypeVar("M", Counter, Gauge, Histogram)

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

_HTTP = ["method", "path", "status_code", "app_name"]
HTTP_REQUESTS = Counter("imagegate_http_requests_total", "Total requests", _HTTP)
HTTP_DURATION = Histogram(
    "imagegate_http_request_duration_seconds",
    "Request duration, in seconds",
    _HTTP,
    buckets=(0.005, 0.01, 0.025, *_SECONDS),  # from API calls of milliseconds to generations of minutes
)
HTTP_IN_PROGRESS = Gauge(
    "imagegate_http_requests_in_progress", "Total requests currently in progress", _HTTP, multiprocess_mode="livesum"
)
HTTP_ERRORS = Counter("imagegate_http_requests_error_total", "Total errors in requests", _HTTP)
"""HTTP metrics per method, route template (``path``) and status; OPTIONS requests and /metrics are not counted."""
DIALECT_REQUESTS = Counter(
    "imagegate_dialect_requests_total",
    "Requests of each client API dialect (openai, huggingface, automatic1111, infer_api, custom_models), by status.",
    ["dialect", "status_code"],
)

IMAGES = Counter(
    "imagegate_images_total",
    "Images asked for, by model and outcome (success, error, cancelled, rejected).",
    ["model", "outcome"],
)
GENERATION_SECONDS = Histogram(
    "imagegate_generation_duration_seconds",
    "Time a worker spent running a request, from leaving its queue to the last image.",
    ["model"],
    buckets=_SECONDS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "imagegate_queue_wait_seconds",
    "Time from admission until a worker started the request.",
    ["model"],
    buckets=_SECONDS,
)
FIRST_PARTIAL_SECONDS = Histogram(
    "imagegate_time_to_first_partial_image_seconds",
    "Time from admission to the first partial image of a streamed request.",
    ["model"],
    buckets=_SECONDS,
)
QUEUE_DEPTH = Gauge("imagegate_queue_depth", "Admitted requests not yet started by a worker.", ["model"])
WORKERS_UP = Gauge("imagegate_workers_up", "Ready workers serving the model.", ["model"])
BACKEND_UP = Gauge("imagegate_backend_up", "1 when the backend is ready, else 0.", ["backend"])
BACKEND_STATE = Gauge(
    "imagegate_backend_state",
    "1 for the backend's current state (starting, ready, cooling_down, down), 0 for the others.",
    ["backend", "state"],
)
BACKEND_REQUESTS = Counter(
    "imagegate_backend_requests_total", "Requests the gateway sent to the backend (each attempt counts).", ["backend"]
)
BACKEND_IN_FLIGHT = Gauge("imagegate_backend_in_flight", "Requests the gateway has on the backend.", ["backend"])
BACKEND_QUEUE_DEPTH = Gauge(
    "imagegate_backend_queue_depth", "Requests sent to the backend that it has not started yet.", ["backend"]
)
BACKEND_FAILURES = Counter(
    "imagegate_backend_failures_total",
    "Requests the backend failed for reasons of its own (unreachable, broke off, hung while running).",
    ["backend"],
)
BACKEND_COOLDOWNS = Counter(
    "imagegate_backend_cooldowns_total", "Times the backend was taken out of the pool for failing.", ["backend"]
)
RETRIES = Counter("imagegate_retries_total", "Requests tried again on another backend of the same model.", ["model"])
FALLBACKS = Counter("imagegate_fallbacks_total", "Requests passed on to a fallback model.", ["model", "fallback"])
BATCH_SIZE = Histogram(
    "imagegate_batch_size",
    "Requests sharing one pipeline call, as each request saw it.",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
STEP_SECONDS = Histogram(
    "imagegate_denoising_step_seconds",
    "Time between a request's denoising steps.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
OVERHEAD_SECONDS = Histogram(
    "imagegate_gateway_overhead_seconds",
    "Time an image request spent in the gateway outside its backends (also the x-imagegate-overhead-ms header).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
WORKER_RESTARTS = Counter("imagegate_worker_restarts_total", "Local worker processes restarted.", ["backend"])
AUTH_FAILURES = Counter(
    "imagegate_auth_failures_total",
    "Requests refused for their credential, by reason (missing, malformed, unknown, expired, revoked, bad_password).",
    ["reason"],
)
LIMIT_REJECTIONS = Counter(
    "imagegate_limit_rejections_total",
    "Requests refused by a principal's limits, by kind (model, rpm, concurrency, quota, admin).",
    ["kind"],
)
KEY_IMAGES = Counter(
    "imagegate_key_images_total",
    "Images delivered per key alias (the first 100 aliases seen; the rest count as 'other').",
    ["key"],
)

JOBS_SUBMITTED = Counter("imagegate_jobs_submitted_total", "Asynchronous jobs accepted, by kind.", ["kind"])
JOBS_FINISHED = Counter(
    "imagegate_jobs_finished_total",
    "Jobs that ended here, by kind and status (succeeded, failed, cancelled, expired).",
    ["kind", "status"],
)
JOBS = Gauge(
    "imagegate_jobs", "Jobs in the store, by kind and status (refreshed every few seconds).", ["kind", "status"]
)
JOB_QUEUE_AGE = Gauge("imagegate_job_queue_oldest_age_seconds", "Age of the oldest queued job (0 when none waits).")
JOB_SECONDS = Histogram(
    "imagegate_job_duration_seconds",
    "Time from a job's submission to its end, by kind and status.",
    ["kind", "status"],
    buckets=_SECONDS,
)
WEBHOOK_DELIVERIES = Counter(
    "imagegate_webhook_deliveries_total",
    "Webhook delivery attempts, by outcome (delivered, retry, failed, gone, refused).",
    ["outcome"],
)
WEBHOOK_SECONDS = Histogram(
    "imagegate_webhook_delivery_seconds",
    "Time a webhook receiver took to answer one delivery attempt.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WEBHOOK_OUTBOX = Gauge("imagegate_webhook_outbox_depth", "Webhook deliveries waiting to be sent or retried.")


@dataclass(slots=True)
class RequestTiming:
    """Where one request's time went, for :data:`OVERHEAD_SECONDS`, and what its access log line names.

    Seconds spent waiting on backends and on the client (sending a stream); the rest is the gateway's own. The pool
    notes the request's model and the backend of its last attempt (``backend_name``).
    """

    backend: float = 0.0
    client: float = 0.0
    used_backend: bool = False
    model: str | None = None
    backend_name: str | None = None


current_timing: ContextVar[RequestTiming | None] = ContextVar("imagegate_request_timing", default=None)


def request_timing() -> RequestTiming | None:
    """The running request's timing (None outside a request); a service marks it as using a backend."""
    timing = current_timing.get()
    if timing is not None:
        timing.used_backend = True
    return timing


@functools.cache
def child(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, made once: ``labels`` takes a lock and checks its arguments on every call.

    Label values are bounded (configured names, fixed outcomes), so the cache is too.
    """
    return metric.labels(*values)
