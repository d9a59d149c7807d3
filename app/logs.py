"""Logging: every ``logging`` record rendered by structlog, as plain lines (``log_format = "plain"``) or JSON lines.

The gateway and its workers log through the standard library (``logging.getLogger(...)``); one handler on the root
logger renders each record with :class:`structlog.stdlib.ProcessorFormatter`, adding the time (UTC, ISO 8601), the
level, the logger's name, fields passed as ``extra=``, and the fields bound to the running request with
:func:`structlog.contextvars.bind_contextvars` (its ``request_id``). structlog's own loggers go through the same
handler.

Secrets: no log line of imagegate carries a key, password, signature or header dict, at any level. Libraries that
would are kept quiet (SQLAlchemy logs statements with their parameters, key digests and webhook secrets among them,
once its logger is at INFO: it stays at WARNING, as SQLAlchemy sets it, whatever ``log_level`` says). Tracebacks are
rendered plain, without local variables.

This module imports nothing of the gateway or the worker: both use it.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Literal, TextIO

import msgspec
import structlog
from structlog.contextvars import bind_contextvars, reset_contextvars

LogFormat = Literal["plain", "json"]

QUIET = {
    "sqlalchemy": logging.WARNING,  # statements with their parameters (webhook secrets among them) from INFO
    "alembic": logging.WARNING,
    "PIL": logging.INFO,  # every PNG chunk at DEBUG
    "urllib3": logging.INFO,  # the OTLP exporter's connections at DEBUG
    "asyncio": logging.INFO,
    "multipart": logging.INFO,
}
"""Loggers kept at least at this level whatever ``log_level`` says."""

_json = msgspec.json.Encoder(enc_hook=str)


def _dumps(obj: Any, **_: Any) -> str:
    return _json.encode(obj).decode()


def _drop_color_message(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Uvicorn passes its message again with terminal colours (``extra={"color_message": ...}``): not a field."""
    event_dict.pop("color_message", None)
    return event_dict


def _shared() -> list[Any]:
    """What every line gets, whoever logged it."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


_BARE = re.compile(r"[^\s\"'=]+")
"""A field value written as it is in a plain line; others are quoted (JSON strings)."""


def _plain_value(value: Any) -> str:
    if isinstance(value, str):
        return value if _BARE.fullmatch(value) else _dumps(value)
    return str(value)


def render_plain(logger: Any, method: str, event_dict: dict[str, Any]) -> str:
    """``<time> <level> <logger>: <event> key=value ...``, then the traceback, if any, on the lines below.

    A line of its own rather than structlog's console renderer, which costs three times as much (it pads and styles
    every field): the access line is written once per request.
    """
    timestamp = event_dict.pop("timestamp", "")
    level = event_dict.pop("level", "")
    name = event_dict.pop("logger", "")
    event = event_dict.pop("event", "")
    trace = event_dict.pop("exception", None)
    line = f"{timestamp} {level:<7} {name}: {event}"
    if event_dict:
        line += " " + " ".join(f"{k}={_plain_value(v)}" for k, v in event_dict.items())
    return line if trace is None else f"{line}\n{trace}"


def formatter(fmt: LogFormat = "plain") -> structlog.stdlib.ProcessorFormatter:
    """The formatter of the root handler: ``logging`` records and structlog events alike, as ``fmt`` lines."""
    renderer = structlog.processors.JSONRenderer(serializer=_dumps) if fmt == "json" else render_plain
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared(), structlog.stdlib.ExtraAdder(), _drop_color_message],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,  # a plain traceback, without local variables
            renderer,
        ],
    )


def setup(level: str = "info", fmt: LogFormat = "plain", stream: TextIO | None = None) -> None:
    """Route every log record of the process to ``stream`` (default stderr) in ``fmt``, from ``level`` up."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric)
    for name, floor in QUIET.items():
        logging.getLogger(name).setLevel(max(floor, numeric))
    wrap = structlog.stdlib.ProcessorFormatter.wrap_for_formatter
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *_shared(), wrap],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def bind_request(request_id: str) -> dict[str, Any]:
    """Bind ``request_id`` to every line logged while the request runs; returns what :func:`unbind` takes."""
    return bind_contextvars(request_id=request_id)


def unbind(tokens: dict[str, Any]) -> None:
    reset_contextvars(**tokens)
