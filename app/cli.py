"""``imagegate serve | worker | demo-model``. Flags of ``serve`` mirror the scalar fields of Settings."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from app.config import ConfigError, Settings, field_docs, list_fields, load_settings, scalar_fields

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


def _settings(config: str | None, overrides: dict[str, Any]) -> Settings:
    overrides = {k: (list(v) or None) if isinstance(v, tuple) else v for k, v in overrides.items()}
    try:
        return load_settings(config, overrides=overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


def settings_options(func):
    """One option per Settings field but ``models``: ``data_dir`` -> ``--data-dir``, documented from the field.

    List fields take the flag once per item.
    """
    docs = field_docs(Settings)
    for name in reversed(list_fields()):
        flag = f"--{name.replace('_', '-')}"
        func = click.option(flag, name, multiple=True, help=f"{docs.get(name)} Repeat for more.")(func)
    for name, typ in reversed(scalar_fields().items()):
        func = click.option(f"--{name.replace('_', '-')}", name, type=typ, default=None, help=docs.get(name))(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="imagegate")
def main() -> None:
    """imagegate: an OpenAI-compatible image generation gateway for self-hosted diffusion models."""


@main.command()
@click.option(
    "--config", type=click.Path(dir_okay=False), default=None, help="TOML settings file (or IMAGEGATE_CONFIG)."
)
@settings_options
def serve(config: str | None, **overrides: Any) -> None:
    """Run the gateway and the local workers the configuration names."""
    import uvicorn

    from app.asgi import create_app

    settings = _settings(config, overrides)
    _setup_logging(settings.log_level)
    logging.getLogger("imagegate").info(
        "serving %s on http://%s:%d (data dir %s)",
        ", ".join(m.name for m in settings.resolved_models()),
        settings.host,
        settings.port,
        settings.data_dir,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=15,
    )


@main.command()
@click.option("--device", required=True, help="cpu, cuda:N, mps ...")
@click.option("--listen", required=True, help="unix:/path.sock, or host:port for TCP.")
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="Settings file (TOML or JSON).")
@click.option("--model", "models", multiple=True, help="Serve only these models (default: all on --device).")
@click.option("--data-dir", default=None, help="Data directory (the demo model is created under it).")
@click.option("--token", envvar="IMAGEGATE_WORKER_TOKEN", default="", help="Shared secret the gateway must send.")
@click.option("--parent-pid", type=int, default=None, hidden=True)
def worker(
    device: str, listen: str, config: str | None, models: tuple[str, ...], data_dir: str | None, token: str, **kw: Any
) -> None:
    """Run one worker: the diffusers pipelines of one device."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import asyncio

    from app.worker.pipelines import quiet_libraries
    from app.worker.server import serve as serve_worker

    settings = _settings(config, {"data_dir": data_dir})
    _setup_logging(settings.log_level)
    quiet_libraries()
    chosen = [m for m in settings.resolved_models() if (m.name in models if models else device in m.devices)]
    if not chosen:
        raise click.UsageError(f"no model to serve on {device}")
    if not listen.startswith("unix:") and not (token or settings.worker_token):
        logging.getLogger("imagegate.worker").warning("listening on TCP without a worker token")
    code = asyncio.run(
        serve_worker(device, listen, chosen, token=token or settings.worker_token, parent_pid=kw["parent_pid"])
    )
    logging.shutdown()
    os._exit(code)  # a model still loading on the engine thread must not hold the process


@main.command("demo-model")
@click.argument("path", type=click.Path(file_okay=False))
def demo_model(path: str) -> None:
    """Create the tiny random-weight demo pipeline at PATH (loadable with from_pretrained)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from app.worker.pipelines import create_demo_model, quiet_libraries

    quiet_libraries()
    click.echo(str(create_demo_model(path)))


if __name__ == "__main__":
    main()
