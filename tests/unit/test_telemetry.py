"""Telemetry switches: off without OTEL_* variables (nothing of the SDK built or imported), on when they ask."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from app import telemetry


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "gw", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ],
)
def test_which_variables_turn_tracing_on(environ, on):
    assert telemetry.wanted(environ) is on


def test_without_otel_variables_tracing_is_off():
    assert telemetry.setup(telemetry.GATEWAY, environ={}) is False
    assert telemetry.ENABLED is False
    assert telemetry._provider is None and telemetry._tracer is None
    with telemetry.span("auth") as span:
        assert span is None  # the shared no-op: nothing built
    assert telemetry.span("x") is telemetry.span("y")


def test_a_gateway_without_otel_variables_never_imports_the_sdk(tmp_path):
    """The whole request path with tracing off: no SDK module is imported, no provider is made, no span exists."""
    script = textwrap.dedent(
        f"""
        import os, sys
        for k in [k for k in os.environ if k.startswith("OTEL_")]:
            del os.environ[k]
        from litestar.testing import TestClient
        from opentelemetry import trace
        from app import telemetry
        from app.asgi import create_app
        from app.backends.fake import FakeBackend
        from app.config import DEMO_MODEL, load_settings

        assert telemetry.setup(telemetry.GATEWAY) is False
        settings = load_settings(environ={{}}, overrides={{"data_dir": {str(tmp_path)!r}}})
        app = create_app(settings, backends=[(FakeBackend(models=[DEMO_MODEL]), [DEMO_MODEL])])
        with TestClient(app) as tc:
            headers = {{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}
            body = {{"prompt": "p", "size": "64x64", "stream": True, "partial_images": 1}}
            r = tc.post("/v1/images/generations", json=body, headers=headers)
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"]
        sdk = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter")))
        assert not sdk, sdk
        assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_an_endpoint_with_credentials_is_logged_without_them():
    where = telemetry._where({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:s3cr3t@collector:4318/x?token=t0k"}, None)
    assert where == "otlp (https://collector:4318)"
