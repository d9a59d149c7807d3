"""The ``imagegate`` command line. Flags of ``serve`` mirror the scalar fields of Settings.

- ``serve``: the gateway and its local workers; ``worker``: one worker; ``demo-model PATH``: the demo pipeline.
- ``keys create | list | show | update | revoke | delete``: virtual keys, straight on the data dir's SQLite store
  (with or without a running gateway, which sees a change on its next request); JSON on stdout.
- ``hash-password``: an argon2 hash for ``users[].password_hash``; ``hash-key``: the SHA-256 hex of a key for
  ``api_keys[].key_sha256``; ``new-key``: a fresh ``sk-ig-`` key (admin key, static key).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click

from app.config import ConfigError, Settings, field_docs, list_fields, load_settings, scalar_fields


def _setup_logging(settings: Settings) -> None:
    from app import logs

    logs.setup(settings.log_level, settings.log_format)


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
        flag = f"--{name.replace('_', '-')}"
        if typ is bool:
            func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=docs.get(name))(func)
        else:
            func = click.option(flag, name, type=typ, default=None, help=docs.get(name))(func)
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

    from app import telemetry
    from app.asgi import DrainingServer, create_app
    from app.auth import startup

    settings = _settings(config, overrides)
    _setup_logging(settings)
    try:
        warning = startup.check(settings)
    except startup.InsecureBind as e:
        raise click.UsageError(str(e)) from None
    unset = [
        f"{u.api_key_env} (upstream {u.name})"
        for u in settings.upstreams
        if u.api_key_env and not os.getenv(u.api_key_env)
    ]
    if unset:
        raise click.UsageError(f"environment variables not set: {', '.join(unset)}")
    if warning:
        logging.getLogger("imagegate").warning(warning)
    logging.getLogger("imagegate").info(
        "serving %s on http://%s:%d (data dir %s)",
        ", ".join(m.name for m in settings.resolved_models()),
        settings.host,
        settings.port,
        settings.data_dir,
    )
    _raise_open_files_limit()
    telemetry.setup(telemetry.GATEWAY)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        log_config=None,  # uvicorn's lines go through imagegate's handler, in its format
        log_level=settings.log_level,
        access_log=False,  # imagegate.access logs each request instead
        timeout_keep_alive=75,
        timeout_graceful_shutdown=15,
    )
    try:
        DrainingServer(config, app, settings.drain_timeout).run()
    finally:
        telemetry.shutdown()


def _raise_open_files_limit() -> None:
    """Every open stream holds two descriptors (client and backend): lift the soft limit (often 1024) to the hard."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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

    from app import telemetry
    from app.worker.pipelines import quiet_libraries
    from app.worker.server import serve as serve_worker

    settings = _settings(config, {"data_dir": data_dir})
    _setup_logging(settings)
    quiet_libraries()
    telemetry.setup(telemetry.WORKER)
    chosen = [m for m in settings.resolved_models() if (m.name in models if models else device in m.devices)]
    if not chosen:
        raise click.UsageError(f"no model to serve on {device}")
    if not listen.startswith("unix:") and not (token or settings.worker_token):
        logging.getLogger("imagegate.worker").warning("listening on TCP without a worker token")
    try:
        code = asyncio.run(
            serve_worker(
                device,
                listen,
                chosen,
                token=token or settings.worker_token,
                parent_pid=kw["parent_pid"],
                batch_window_ms=settings.batch_window_ms,
            )
        )
    finally:
        telemetry.shutdown()  # before os._exit, which runs no exit handlers: the last spans are exported
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


# -- virtual keys -------------------------------------------------------------------------------------------------

CLEARABLE = ("rpm", "max_concurrent", "image_quota", "expires_at")


def _store_options(func):
    help_dir = "Data directory holding imagegate.db (or IMAGEGATE_DATA_DIR)."
    func = click.option("--data-dir", default=None, help=help_dir)(func)
    return click.option(
        "--config", type=click.Path(dir_okay=False), default=None, help="TOML settings file (or IMAGEGATE_CONFIG)."
    )(func)


def _limit_options(func, alias_required: bool = False):
    limit = click.IntRange(min=0)
    for flag, name, kw in reversed(
        [
            ("--alias", "alias", {"required": alias_required, "help": "A name for the key."}),
            ("--model", "models", {"multiple": True, "help": "fnmatch pattern of an allowed model. Repeat for more."}),
            ("--rpm", "rpm", {"type": limit, "help": "Requests per minute."}),
            ("--max-concurrent", "max_concurrent", {"type": limit, "help": "Image requests in flight at once."}),
            ("--image-quota", "image_quota", {"type": limit, "help": "Images per quota period."}),
            ("--quota-period", "quota_period", {"type": click.Choice(["hour", "day", "month"])}),
            ("--expires-at", "expires_at", {"help": "ISO 8601 time after which the key stops working."}),
        ]
    ):
        func = click.option(flag, name, **kw)(func)
    return func


def _print(obj: Any) -> None:
    import msgspec

    click.echo(msgspec.json.format(msgspec.json.encode(obj), indent=2).decode())


def _keys_call(config: str | None, data_dir: str | None, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``call(KeyService)`` on the data dir's store; an API error becomes a click error."""
    import asyncio

    from app.errors import ApiError, InvalidRequest
    from app.services.keys import KeyService
    from app.store.keys import SqlKeyStore

    settings = _settings(config, {"data_dir": data_dir})
    store = SqlKeyStore(settings.database())
    try:
        return asyncio.run(call(KeyService(store)))
    except InvalidRequest as e:
        raise click.UsageError(e.message) from None
    except ApiError as e:
        raise click.ClickException(e.message) from None
    finally:
        store.close()


def _convert(data: dict[str, Any], typ: type) -> Any:
    import msgspec

    try:
        return msgspec.convert(data, typ)
    except msgspec.ValidationError as e:
        raise click.UsageError(str(e)) from None


@main.group()
def keys() -> None:
    """Manage virtual keys in the data dir's store (works with or without a running gateway)."""


@keys.command("create")
@_store_options
@functools.partial(_limit_options, alias_required=True)
@click.option("--inactive", is_flag=True, help="Create the key disabled.")
def keys_create(config: str | None, data_dir: str | None, inactive: bool, **fields: Any) -> None:
    """Create a key; prints it as JSON with its secret `key`, which is shown this once."""
    from app.protocol.admin import KeyCreate

    data = _given(fields)
    create = _convert({**data, "active": not inactive}, KeyCreate)
    _print(_keys_call(config, data_dir, lambda service: service.create(create)))


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    """The limit options the user actually gave (repeatable ones as lists)."""
    return {k: list(v) if k == "models" else v for k, v in fields.items() if v is not None and v != ()}


@keys.command("list")
@_store_options
def keys_list(config: str | None, data_dir: str | None) -> None:
    """List the keys (never their secrets) with their usage."""
    _print(_keys_call(config, data_dir, lambda service: service.list()))


@keys.command("show")
@click.argument("key_id")
@_store_options
def keys_show(key_id: str, config: str | None, data_dir: str | None) -> None:
    """Show one key and its usage."""
    _print(_keys_call(config, data_dir, lambda service: service.show(key_id)))


@keys.command("update")
@click.argument("key_id")
@_store_options
@_limit_options
@click.option("--active/--inactive", "active", default=None, help="Enable or disable the key.")
@click.option(
    "--clear",
    "clear",
    multiple=True,
    type=click.Choice([*CLEARABLE, *(f.replace("_", "-") for f in CLEARABLE)]),
    metavar="FIELD",
    help="Remove a limit, setting it to null: rpm, max-concurrent, image-quota or expires-at. Repeat for more.",
)
def keys_update(key_id: str, config: str | None, data_dir: str | None, clear: tuple[str, ...], **fields: Any) -> None:
    """Change the options given (the others keep their values); prints the key."""
    from app.protocol.admin import KeyUpdate

    data = _given(fields)
    for name in (c.replace("-", "_") for c in clear):
        if name in data:
            raise click.UsageError(f"--clear {name} conflicts with --{name.replace('_', '-')}.")
        data[name] = None
    update = _convert(data, KeyUpdate)
    _print(_keys_call(config, data_dir, lambda service: service.update(key_id, update)))


@keys.command("revoke")
@click.argument("key_id")
@_store_options
def keys_revoke(key_id: str, config: str | None, data_dir: str | None) -> None:
    """Disable a key at once (a running gateway refuses it from its next request); prints the key."""
    _print(_keys_call(config, data_dir, lambda service: service.revoke(key_id)))


@keys.command("delete")
@click.argument("key_id")
@_store_options
def keys_delete(key_id: str, config: str | None, data_dir: str | None) -> None:
    """Delete a key for good (its usage rows stay)."""
    _keys_call(config, data_dir, lambda service: service.delete(key_id))
    _print({"id": key_id, "object": "key", "deleted": True})


# -- secrets for the configuration file ---------------------------------------------------------------------------


def _read_secret(what: str, confirm: bool) -> str:
    """From a hidden prompt on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        value = click.prompt(what, hide_input=True, confirmation_prompt=confirm)
    else:
        value = sys.stdin.readline().rstrip("\r\n")
    if not value:
        raise click.UsageError(f"empty {what.lower()}")
    return value


@main.command("hash-password")
def hash_password() -> None:
    """Print an argon2 hash of a password for users[].password_hash (prompted, or the first line of stdin)."""
    from app.auth.principals import hash_password as argon2_hash

    click.echo(argon2_hash(_read_secret("Password", confirm=True)))


@main.command("hash-key")
def hash_key() -> None:
    """Print the SHA-256 hex of a key for api_keys[].key_sha256 (prompted, or the first line of stdin)."""
    from app.auth.principals import digest

    click.echo(digest(_read_secret("Key", confirm=False)))


@main.command("new-key")
def new_key() -> None:
    """Print a fresh random key (sk-ig-...), for admin_key / IMAGEGATE_ADMIN_KEY or a static API key."""
    from app.auth.principals import new_key as make_key

    click.echo(make_key())


if __name__ == "__main__":
    main()
