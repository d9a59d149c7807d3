"""The log handler: plain and JSON lines from stdlib logging, bound request ids, quiet libraries."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from app import logs
from tests.helpers import restored_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    with restored_logging():
        yield


def lines(fmt: str, level: str = "info") -> tuple[io.StringIO, logging.Logger]:
    buf = io.StringIO()
    logs.setup(level, fmt, stream=buf)  # type: ignore[arg-type]
    return buf, logging.getLogger("imagegate.test")


def test_plain_lines(restore_root):
    buf, log = lines("plain")
    bound = logs.bind_request("req-1")
    log.warning("request %s moves to %s", "img_1", "local-cpu", extra={"why": 'said "no"', "n": 2, "none": None})
    logs.unbind(bound)
    log.info("after", extra={"color_message": "\x1b[1mafter\x1b[0m"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second, third, *trace = buf.getvalue().splitlines()
    stamp, level, rest = first.split(" ", 2)
    assert stamp.endswith("Z") and "T" in stamp and level == "warning"
    assert rest == 'imagegate.test: request img_1 moves to local-cpu request_id=req-1 why="said \\"no\\"" n=2 none=None'
    assert second.endswith(" info    imagegate.test: after"), "unbound after the request; uvicorn's colours dropped"
    assert third.endswith("imagegate.test: failed")
    assert trace[0] == "Traceback (most recent call last):" and trace[-1] == "ValueError: boom"


def test_json_lines(restore_root):
    buf, log = lines("json")
    bound = logs.bind_request("req-2")
    log.info("hello %s", "world", extra={"status": 200})
    logs.unbind(bound)
    [line] = [json.loads(text) for text in buf.getvalue().splitlines()]
    assert line["event"] == "hello world" and line["status"] == 200 and line["request_id"] == "req-2"
    assert line["level"] == "info" and line["logger"] == "imagegate.test" and line["timestamp"].endswith("Z")
    structlog.get_logger("native").info("from structlog", k=1)
    native = json.loads(buf.getvalue().splitlines()[-1])
    assert native["event"] == "from structlog" and native["k"] == 1 and native["logger"] == "native"


def test_levels_and_quiet_libraries(restore_root):
    buf, log = lines("plain", "warning")
    log.info("not shown")
    assert buf.getvalue() == ""
    lines("plain", "debug")
    assert logging.getLogger("sqlalchemy").getEffectiveLevel() == logging.WARNING, "its statements carry parameters"
    assert logging.getLogger("imagegate.access").isEnabledFor(logging.DEBUG)
