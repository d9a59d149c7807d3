"""Settings: a TOML file < ``IMAGEGATE_*`` environment variables < command-line flags.

Every field is documented where it is declared (the ``Meta(description=...)``); the CLI turns each scalar field of
:class:`Settings` into a flag (``data_dir`` -> ``--data-dir``) and each field into an environment variable
(``data_dir`` -> ``IMAGEGATE_DATA_DIR``; list and table fields take JSON there).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from app.worker.protocol import SCHEDULERS, TORCHAO_CONFIGS, parse_size

ENV_PREFIX = "IMAGEGATE_"
_DEVICE = re.compile(r"cpu|mps|(cuda|xpu)(:\d+)?")
DEMO_MODEL = "imagegate-demo"


WEBHOOK_RETRY_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
"""Standard Webhooks' example schedule: the delay after each failed attempt (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h,
20 h, 24 h), so an endpoint that is down for about three days gets ten attempts in all."""

QUANTIZATION = {
    "torchao": tuple(TORCHAO_CONFIGS),
    "bitsandbytes": ("4bit", "8bit"),
}
"""Quantization backends and the kinds each offers (``backend:kind``)."""


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


class ConfigError(Exception):
    """The configuration cannot be used; the message says which field and why."""


def _doc(text: str) -> Meta:
    return Meta(description=text)


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One served model: where it comes from, where it runs, and what requests it accepts."""

    name: Annotated[str, _doc("Name clients pass as `model`.")]
    path: Annotated[str, _doc("Directory of a diffusers pipeline (or a hub id on hosts with internet).")] = ""
    demo: Annotated[bool, _doc("Create a tiny random-weight demo pipeline at `path` when nothing is there yet.")] = (
        False
    )
    devices: Annotated[list[str], _doc("Devices that run this model, one local worker each: cpu, cuda:0, ...")] = (
        msgspec.field(default_factory=lambda: ["cpu"])
    )
    remote_workers: Annotated[
        list[str],
        _doc("Addresses (host:port) of `imagegate worker` processes on other hosts that serve this model."),
    ] = msgspec.field(default_factory=list)
    dtype: Annotated[Literal["float32", "float16", "bfloat16"], _doc("Weights dtype on the device.")] = "float32"
    default_size: Annotated[str, _doc("Size used for `size: auto` or no size, as WxH.")] = "512x512"
    min_side: Annotated[int, _doc("Smallest accepted width or height, in pixels.")] = 64
    max_side: Annotated[int, _doc("Largest accepted width or height, in pixels.")] = 1024
    size_multiple: Annotated[int, _doc("Width and height must be multiples of this.")] = 8
    default_steps: Annotated[
        int | None, _doc("Denoising steps when the request names none. Omitted: the model family's (else 30).")
    ] = None
    max_steps: Annotated[int, _doc("Most denoising steps a request may ask for.")] = 100
    default_guidance: Annotated[
        float | None, _doc("Guidance scale when the request names none. Omitted: the model family's (else 7.5).")
    ] = None
    max_guidance: Annotated[float, _doc("Largest accepted guidance_scale.")] = 30.0
    max_n: Annotated[int, _doc("Most images one request may ask for (OpenAI allows 1-10).")] = 10
    quality_steps: Annotated[
        dict[str, float],
        _doc("`quality` -> fraction of default_steps, used when num_inference_steps is not given."),
    ] = msgspec.field(default_factory=lambda: {"low": 0.5, "medium": 0.75, "high": 1.0})
    schedulers: Annotated[
        list[str] | None,
        _doc(
            "Scheduler names requests may choose, each run once when the worker starts (a name that fails there "
            "stops the start). Omitted: the model family's samplers that work with the model."
        ),
    ] = None
    default_scheduler: Annotated[str, _doc("Scheduler used when the request names none; empty: the pipeline's.")] = ""
    preview: Annotated[
        Literal["auto", "vae", "linear", "taesd"],
        _doc("How partial images are decoded: auto picks linear for known SD latent spaces, else vae."),
    ] = "auto"
    preview_downscale: Annotated[
        int, _doc("vae previews decode latents pooled by this factor (1: full size), then resize up.")
    ] = 2
    taesd_path: Annotated[str, _doc("Directory of an AutoencoderTiny (TAESD) for preview = taesd.")] = ""
    max_queue: Annotated[int, _doc("Requests that may wait for a worker; past this the answer is 429.")] = 64
    edit_strength: Annotated[
        float, _doc("How much an edit without a mask redraws the image (0-1), when the request names no strength.")
    ] = 0.75
    edit_strength_high_fidelity: Annotated[
        float, _doc("The same, for requests with input_fidelity = high: stay closer to the input.")
    ] = 0.5
    variation_strength: Annotated[float, _doc("How much a variation redraws its image (0-1).")] = 0.6
    segmentation_model: Annotated[
        str,
        _doc("Directory of a transformers image-segmentation model; enables edits with type = background_removal."),
    ] = ""
    background_labels: Annotated[
        list[str], _doc("Segmentation labels that count as background for background_removal.")
    ] = msgspec.field(default_factory=lambda: ["background"])
    fallbacks: Annotated[
        list[str], _doc("Models tried in order when no backend of this one could take or finish a request.")
    ] = msgspec.field(default_factory=list)
    max_batch_pixels: Annotated[
        int,
        _doc("Most output pixels (width x height x images) one batched pipeline call may hold; 0 turns batching off."),
    ] = 2_097_152
    # GPU features: each trades something (start-up time, speed, memory or fidelity) for another, so each is opt-in.
    compile: Annotated[
        bool,
        _doc(
            "torch.compile the denoiser (its repeated blocks where diffusers declares them); compiled at start-up by "
            "warm-up runs at the smallest and the default size, so no request pays for it (a new size compiles once)."
        ),
    ] = False
    offload: Annotated[
        Literal["none", "model", "sequential"],
        _doc(
            "Keep the weights in CPU memory for GPUs too small for the model: `model` moves each component to the "
            "GPU while it runs, `sequential` each layer (least memory, slowest). Needs a GPU device."
        ),
    ] = "none"
    vae_tiling: Annotated[bool, _doc("Decode and encode images tile by tile: far less memory for large sizes.")] = False
    vae_slicing: Annotated[bool, _doc("Decode a batch one image at a time: less memory for large batches.")] = False
    attention_backend: Annotated[
        str,
        _doc(
            "The denoiser's diffusers attention backend (`native`, `flash`, `sage`, `xformers`, ...); empty: default."
        ),
    ] = ""
    quantization: Annotated[
        str,
        _doc(
            "Quantize the denoiser as it loads, through diffusers: `torchao:int8wo|int8dq|int4wo|float8wo|float8dq` "
            "or `bitsandbytes:4bit|8bit` (needs that package); empty: off."
        ),
    ] = ""
    step_cache: Annotated[
        str,
        _doc(
            "Reuse the denoiser's work between steps where diffusers can (transformer models), trading a little "
            "fidelity for speed: `first_block:<threshold>` (e.g. `first_block:0.12`); empty: off."
        ),
    ] = ""

    safety_checker: Annotated[
        str,
        _doc(
            "Directory of a diffusers StableDiffusionSafetyChecker and its CLIP image processor, for a model that "
            "ships none; empty: the pipeline's own, if any."
        ),
    ] = ""
    adapters_dir: Annotated[
        str, _doc("Directory of LoRA adapter files (*.safetensors) for this model; a file's name is its adapter id.")
    ] = ""
    max_loaded_adapters: Annotated[
        int, _doc("LoRA adapters a worker keeps loaded for this model; the least recently used go first.")
    ] = 8
    max_adapter_mb: Annotated[
        int, _doc("Megabytes of LoRA adapter weights a worker keeps loaded for this model (least recently used first).")
    ] = 2048
    project: Annotated[
        str, _doc("Project the model belongs to in the custom-models inference API (/infer_api/v1/projects).")
    ] = "default"
    sample_images: Annotated[
        list[str],
        _doc(
            "Image files that show what the model makes (/infer_api/v1/.../models/{name}/images); relative paths are "
            "read from the working directory."
        ),
    ] = msgspec.field(default_factory=list)
    trigger_words: Annotated[
        list[str], _doc("Words the model was trained to respond to; the prompt enhancer keeps them in the prompt.")
    ] = msgspec.field(default_factory=list)
    style: Annotated[str, _doc("Style words the prompt enhancer adds for this model.")] = ""
    enhance_template: Annotated[
        str,
        _doc("Prompt enhancer template with {prompt} (and optionally {style}, {trigger}); empty: the built-in one."),
    ] = ""

    def size_limits_text(self) -> str:
        return f"{self.min_side}-{self.max_side} px, multiples of {self.size_multiple}"


class UpstreamConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An image API that serves some of the models: OpenAI-compatible, a Hugging Face endpoint, or ModelsLab."""

    name: Annotated[str, _doc("Backend name in /ready and metrics.")]
    base_url: Annotated[
        str,
        _doc(
            "openai: the base URL up to and including /v1; hf_endpoint: the endpoint's URL; modelslab: the API's "
            "base up to the version, e.g. https://modelslab.com/api/v6."
        ),
    ]
    type: Annotated[
        Literal["openai", "hf_endpoint", "modelslab"], _doc("The API it speaks (see Upstreams in the README).")
    ] = "openai"
    mode: Annotated[
        Literal["task", "handler"],
        _doc("hf_endpoint only: the text-to-image task contract, or a custom handler's flat keys and {image: base64}."),
    ] = "task"
    poll_interval: Annotated[
        float, _doc("modelslab only: fewest seconds between two fetches of a processing generation.")
    ] = 2.0
    api_key_env: Annotated[str, _doc("Environment variable holding the upstream's key; empty: no key sent.")] = ""
    models: Annotated[
        dict[str, str], _doc("Served model name -> the upstream's model name (each must be a configured model).")
    ] = msgspec.field(default_factory=dict)
    timeout: Annotated[float, _doc("Seconds to connect and to wait for each chunk of the upstream's answer.")] = 300.0
    concurrency: Annotated[int, _doc("Requests sent to it at once; more count as queued for admission.")] = 64
    extensions: Annotated[
        bool,
        _doc("Send imagegate's fields (seed, negative_prompt, num_inference_steps, guidance_scale, scheduler) too."),
    ] = False


QuotaPeriod = Literal["hour", "day", "month"]


class TrainingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """LoRA training of custom models (``/custom-models/v1``)."""

    base_model: Annotated[
        str, _doc("Served model that custom models are trained on; empty: the first configured model.")
    ] = ""
    devices: Annotated[
        list[str],
        _doc(
            "Devices (cpu, cuda:N) or remote worker addresses of the base model's workers that train; empty: every "
            "worker of it. Inference on a training worker runs between training slices, and goes elsewhere if it can."
        ),
    ] = msgspec.field(default_factory=list)
    min_images: Annotated[int, _doc("Fewest training images a training starts with.")] = 3
    max_images: Annotated[int, _doc("Most training images one custom model may hold.")] = 100
    max_steps: Annotated[
        int, _doc("Cap on the steps of every training (0: the presets' own; small values for demos and tests).")
    ] = 0
    resolution: Annotated[int, _doc("Training resolution in pixels (0: the preset's share of the model's).")] = 0
    preview_every: Annotated[int, _doc("Steps between preview images of a training (0: none).")] = 0


class Limits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a principal may do. Unset limits are unlimited; an empty ``models`` list allows no model."""

    models: Annotated[list[str], _doc("Model name patterns this principal may use (`*` for all).")] = msgspec.field(
        default_factory=lambda: ["*"]
    )
    rpm: Annotated[int | None, _doc("Image requests per minute (moving window).")] = None
    max_concurrent: Annotated[int | None, _doc("Image requests in flight at once.")] = None
    image_quota: Annotated[int | None, _doc("Images per quota_period.")] = None
    quota_period: Annotated[QuotaPeriod, _doc("Calendar period (UTC) the image quota resets on.")] = "day"
    expires_at: Annotated[str | None, _doc("ISO 8601 time after which the credential stops working.")] = None
    active: Annotated[bool, _doc("False disables the credential.")] = True


class ApiKeyConfig(Limits, kw_only=True, forbid_unknown_fields=True):
    """A static API key from the configuration; its secret is given as a SHA-256 digest or in an env variable."""

    id: Annotated[str, _doc("Stable identifier; usage is recorded under it.")]
    alias: Annotated[str, _doc("Name shown in the admin API and metrics.")] = ""
    key_sha256: Annotated[str, _doc("Hex SHA-256 of the key (`imagegate hash-key`).")] = ""
    key_env: Annotated[str, _doc("Name of an environment variable holding the key itself.")] = ""
    admin: Annotated[bool, _doc("The key may use the admin API.")] = False


class UserConfig(Limits, kw_only=True, forbid_unknown_fields=True):
    """A named user for HTTP Basic auth; the password is an argon2 hash or comes from an env variable."""

    name: Annotated[str, _doc("User name (also the principal id).")]
    password_hash: Annotated[str, _doc("argon2 hash of the password (`imagegate hash-password`).")] = ""
    password_env: Annotated[str, _doc("Name of an environment variable holding the password itself.")] = ""
    role: Annotated[Literal["user", "admin"], _doc("admin may use the admin API.")] = "user"


def demo_model(data_dir: str) -> ModelConfig:
    """The embedded demo model served when no model is configured."""
    return ModelConfig(
        name=DEMO_MODEL,
        path=str(Path(data_dir) / "models" / DEMO_MODEL),
        demo=True,
        devices=["cpu"],
        default_size="256x256",
        min_side=64,
        max_side=1024,
        size_multiple=16,
        default_steps=20,
        max_steps=100,
        preview="vae",
        preview_downscale=1,  # a random-weight VAE is not scale-robust: pooled latents decode to other pictures
        default_scheduler="ddim",
    )


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "imagegate")


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything `imagegate serve` and `imagegate worker` read at start-up."""

    host: Annotated[str, _doc("Address the gateway binds.")] = "127.0.0.1"
    port: Annotated[int, _doc("Port the gateway binds.")] = 8000
    data_dir: Annotated[
        str, _doc("Where models, generated image files and secrets live (default: $XDG_DATA_HOME/imagegate).")
    ] = ""
    models: Annotated[list[ModelConfig], _doc("Served models; none configured serves the demo model.")] = []
    default_response_format: Annotated[
        Literal["b64_json", "url"], _doc("response_format when the request names none.")
    ] = "b64_json"
    public_url: Annotated[
        str, _doc("Base URL put in `url` responses (e.g. https://images.example.com); default: the request's.")
    ] = ""
    url_ttl: Annotated[int, _doc("Seconds a signed image URL stays valid; files are deleted after it.")] = 3600
    url_secret: Annotated[str, _doc("Key that signs image URLs; default: generated once and kept in data_dir.")] = ""
    sse_ping_interval: Annotated[float, _doc("Seconds between keep-alive comments on an idle SSE stream.")] = 15.0
    request_timeout: Annotated[float, _doc("Deadline in seconds for one request, queueing included.")] = 600.0
    upstreams: Annotated[list[UpstreamConfig], _doc("OpenAI-compatible image APIs that serve some models.")] = (
        msgspec.field(default_factory=list)
    )
    backend_weights: Annotated[
        dict[str, float],
        _doc("Backend name (local-cuda0, remote-host:port, an upstream's name) -> routing weight (default 1)."),
    ] = msgspec.field(default_factory=dict)
    routing: Annotated[
        Literal["least_work_p2c", "least_work"],
        _doc("Routing policy: least outstanding work between two random backends, or over all of them."),
    ] = "least_work_p2c"
    max_attempts: Annotated[
        int, _doc("Backends one request may try before anything reached the client (never the same one twice).")
    ] = 3
    cooldown_failures: Annotated[int, _doc("Failures within cooldown_window that take a backend out of the pool.")] = 3
    cooldown_window: Annotated[float, _doc("Seconds over which a backend's failures are counted.")] = 60.0
    cooldown_seconds: Annotated[float, _doc("Seconds a failing backend stays out before probes may bring it back.")] = (
        10.0
    )
    health_interval: Annotated[float, _doc("Seconds between health probes of each remote worker and upstream.")] = 2.0
    drain_timeout: Annotated[
        float, _doc("On SIGTERM, seconds in-flight requests may take to finish (new ones get 503) before stopping.")
    ] = 30.0
    batch_window_ms: Annotated[
        float, _doc("Milliseconds a worker waits for compatible requests to join a batch (0: batch only what queued).")
    ] = 5.0
    worker_start_timeout: Annotated[float, _doc("Seconds a local worker may take to load its models.")] = 600.0
    worker_restart_max_backoff: Annotated[float, _doc("Longest wait before restarting a crashed worker.")] = 30.0
    load_failure_backoff: Annotated[
        float, _doc("Seconds before a worker whose models failed to load is started again (its reason is in /ready).")
    ] = 300.0
    worker_token: Annotated[str, _doc("Shared secret between gateway and workers on TCP.")] = ""
    max_body_size: Annotated[int, _doc("Largest accepted JSON request body in bytes (413 above).")] = 10_000_000
    max_upload_size: Annotated[
        int, _doc("Largest accepted edit or variation body in bytes (413 before reading past it).")
    ] = 16 * 50_000_000 + 1_000_000
    max_images: Annotated[int, _doc("Most input images one edit may carry.")] = 16
    max_image_bytes: Annotated[int, _doc("Largest accepted input image file in bytes.")] = 50_000_000
    max_image_pixels: Annotated[
        int, _doc("Largest accepted input image in pixels (width x height), checked before decoding it.")
    ] = 50_000_000
    image_url_allowlist: Annotated[
        list[str], _doc("Hosts from which edits may fetch http(s) image URLs; empty: none (only data: URLs).")
    ] = msgspec.field(default_factory=list)
    image_url_timeout: Annotated[float, _doc("Seconds allowed to fetch one image URL.")] = 10.0
    log_level: Annotated[Literal["debug", "info", "warning", "error"], _doc("Log verbosity.")] = "info"
    log_format: Annotated[
        Literal["plain", "json"],
        _doc("Log lines as plain text or as one JSON object each (gateway and local workers alike)."),
    ] = "plain"
    admin_key: Annotated[str, _doc("Key for the admin API (better given as IMAGEGATE_ADMIN_KEY).")] = ""
    api_keys: Annotated[list[ApiKeyConfig], _doc("Static API keys.")] = msgspec.field(default_factory=list)
    users: Annotated[list[UserConfig], _doc("Users for HTTP Basic auth.")] = msgspec.field(default_factory=list)
    allow_anonymous: Annotated[
        bool, _doc("Serve without any credential on a non-loopback address (refused otherwise).")
    ] = False
    metrics_auth: Annotated[Literal["open", "admin"], _doc("Whether /metrics needs the admin credential.")] = "open"
    cors_origins: Annotated[
        list[str],
        _doc("Origins (https://app.example.com, or *) whose pages may call the API; empty: same origin only."),
    ] = msgspec.field(default_factory=list)

    database_url: Annotated[
        str,
        _doc(
            "SQLAlchemy URL of the database that keeps keys, usage and jobs (postgresql://... for several gateway "
            "replicas); empty: an SQLite file in data_dir."
        ),
    ] = ""
    job_share: Annotated[
        float, _doc("Share (0-1] of each model's worker capacity that asynchronous jobs may use at once.")
    ] = 0.5
    job_lease: Annotated[
        float, _doc("Seconds a running job's claim lasts without renewal; an expired claim puts the job back.")
    ] = 30.0
    job_max_attempts: Annotated[
        int, _doc("Times a job is started before a lost run (worker or gateway gone) fails it with worker_lost.")
    ] = 3
    job_queue_timeout: Annotated[float, _doc("Seconds a job may wait in the queue before it expires.")] = 86400.0
    job_retention: Annotated[
        float, _doc("Seconds a job, its result files and its idempotency key are kept after it was submitted.")
    ] = 86400.0
    job_poll_interval: Annotated[
        float, _doc("Seconds between looks for jobs that another gateway replica submitted or released.")
    ] = 1.0
    webhook_allowlist: Annotated[
        list[str],
        _doc("Hosts, addresses or CIDR networks webhooks may reach although private, loopback or link-local."),
    ] = msgspec.field(default_factory=list)
    webhook_retry_schedule: Annotated[
        list[float],
        _doc("Seconds after a failed webhook attempt before the next one, one entry per retry (then it fails)."),
    ] = msgspec.field(default_factory=lambda: list(WEBHOOK_RETRY_SCHEDULE))
    webhook_timeout: Annotated[float, _doc("Seconds a webhook receiver has to answer one delivery.")] = 15.0
    webhook_progress_interval: Annotated[float, _doc("Fewest seconds between two progress webhooks of one job.")] = 2.0
    max_loras: Annotated[int, _doc("Most LoRA adapters one request may apply.")] = 4
    modelslab_wait: Annotated[
        float,
        _doc("Seconds a ModelsLab-dialect generation is waited for before the answer is processing, with a fetch URL."),
    ] = 20.0
    training: Annotated[TrainingConfig, _doc("LoRA training of custom models (see the training table).")] = (
        msgspec.field(default_factory=TrainingConfig)
    )
    enhancer_url: Annotated[
        str,
        _doc(
            "Base URL (up to /v1) of an OpenAI-compatible chat completions API that enhances prompts; empty: the "
            "built-in template enhancer."
        ),
    ] = ""
    enhancer_model: Annotated[str, _doc("Model the prompt enhancer asks for at enhancer_url.")] = ""
    enhancer_api_key_env: Annotated[
        str, _doc("Environment variable holding the key for enhancer_url; empty: no key sent.")
    ] = ""

    def database(self) -> str:
        """The database URL, or the SQLite file in the data directory."""
        return self.database_url or str(Path(self.data_dir) / "imagegate.db")

    def resolved_models(self) -> list[ModelConfig]:
        return self.models or [demo_model(self.data_dir)]

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.resolved_models() if m.name == name), None)

    def training_model(self) -> ModelConfig:
        """The base model of custom models."""
        return self.model(self.training.base_model) or self.resolved_models()[0]


def field_docs(cls: type[msgspec.Struct]) -> dict[str, str]:
    """Field name -> its documentation, read from the ``Meta`` annotations."""
    docs: dict[str, str] = {}
    info = msgspec.inspect.type_info(cls)
    for f in info.fields:  # type: ignore[attr-defined]
        extra = getattr(f.type, "extra_json_schema", None) or {}
        docs[f.name] = extra.get("description", "")
    return docs


def scalar_fields() -> dict[str, type]:
    """Settings fields that map one-to-one onto a command-line flag."""
    info = msgspec.inspect.type_info(Settings)
    out: dict[str, type] = {}
    for f in info.fields:  # type: ignore[attr-defined]
        t = f.type
        base = getattr(t, "type", t) if isinstance(t, msgspec.inspect.Metadata) else t
        if isinstance(base, msgspec.inspect.BoolType):
            out[f.name] = bool
        elif isinstance(base, msgspec.inspect.StrType | msgspec.inspect.LiteralType):
            out[f.name] = str
        elif isinstance(base, msgspec.inspect.IntType):
            out[f.name] = int
        elif isinstance(base, msgspec.inspect.FloatType):
            out[f.name] = float
    return out


def list_fields() -> list[str]:
    """Settings fields that are lists of strings: a repeatable flag each (``--image-url-allowlist a --...``)."""
    info = msgspec.inspect.type_info(Settings)
    out = []
    for f in info.fields:  # type: ignore[attr-defined]
        t = f.type.type if isinstance(f.type, msgspec.inspect.Metadata) else f.type
        if isinstance(t, msgspec.inspect.ListType) and isinstance(t.item_type, msgspec.inspect.StrType):
            out.append(f.name)
    return out


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    scalars = scalar_fields()
    for name in msgspec.structs.fields(Settings):
        key = ENV_PREFIX + name.name.upper()
        if key not in environ:
            continue
        raw = environ[key]
        if name.name in scalars:
            out[name.name] = raw
        else:
            try:
                out[name.name] = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key} must be JSON: {e}") from None
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        if p.suffix == ".json":
            return json.loads(raw)
        return tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {e}") from None


def load_settings(
    config_file: str | Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Merge the three layers (file < env < overrides) and validate the result.

    Raises:
        ConfigError: a value is missing, malformed or inconsistent.
    """
    environ = dict(os.environ) if environ is None else environ
    merged: dict[str, Any] = {}
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = environ[ENV_PREFIX + "CONFIG"]
    if config_file:
        merged.update(read_config_file(config_file))
    merged.update(_from_env(environ))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        settings = msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid configuration: {e}") from None
    if not settings.data_dir:
        settings.data_dir = _default_data_dir()
    settings.data_dir = str(Path(settings.data_dir).expanduser().resolve())
    if not settings.models:
        settings.models = [demo_model(settings.data_dir)]
    validate(settings)
    return settings


def _validate_credentials(settings: Settings) -> None:
    from datetime import datetime

    ids: set[str] = set()
    for k in settings.api_keys:
        if k.id in ids:
            raise ConfigError(f"api key {k.id!r} is configured twice")
        ids.add(k.id)
        if bool(k.key_sha256) == bool(k.key_env):
            raise ConfigError(f"api key {k.id!r}: give exactly one of key_sha256 and key_env")
        if k.key_sha256 and not re.fullmatch(r"[0-9a-f]{64}", k.key_sha256):
            raise ConfigError(f"api key {k.id!r}: key_sha256 must be 64 hex digits")
    for u in settings.users:
        if bool(u.password_hash) == bool(u.password_env):
            raise ConfigError(f"user {u.name!r}: give exactly one of password_hash and password_env")
    for who, limits in [
        *((f"api key {k.id!r}", k) for k in settings.api_keys),
        *((f"user {u.name!r}", u) for u in settings.users),
    ]:
        if limits.expires_at:
            try:
                datetime.fromisoformat(limits.expires_at)
            except ValueError:
                raise ConfigError(f"{who}: expires_at {limits.expires_at!r} is not an ISO 8601 time") from None


def validate(settings: Settings) -> None:
    """Check what the types alone cannot: unique names, sizes, known schedulers, credentials."""
    _validate_credentials(settings)
    seen: set[str] = set()
    for m in settings.resolved_models():
        where = f"model {m.name!r}"
        if m.name in seen:
            raise ConfigError(f"{where} is configured twice")
        seen.add(m.name)
        if not m.path and m.devices:
            raise ConfigError(f"{where}: `path` is required")
        if not m.devices and not m.remote_workers and not any(m.name in u.models for u in settings.upstreams):
            raise ConfigError(f"{where}: name at least one local device, remote worker or upstream")
        for d in m.devices:
            if not _DEVICE.fullmatch(d):
                raise ConfigError(f"{where}: unknown device {d!r} (cpu, cuda:N, mps, xpu:N)")
        if not 1 <= m.min_side <= m.max_side:
            raise ConfigError(f"{where}: need 1 <= min_side <= max_side")
        try:
            w, h = parse_size(m.default_size)
        except ValueError:
            raise ConfigError(f"{where}: default_size {m.default_size!r} is not WxH") from None
        if (
            not (m.min_side <= w <= m.max_side and m.min_side <= h <= m.max_side)
            or w % m.size_multiple
            or (h % m.size_multiple)
        ):
            raise ConfigError(f"{where}: default_size {m.default_size} is outside {m.size_limits_text()}")
        if m.default_steps is not None and not 1 <= m.default_steps <= m.max_steps:
            raise ConfigError(f"{where}: need 1 <= default_steps <= max_steps")
        if not 1 <= m.max_n <= 10:
            raise ConfigError(f"{where}: max_n must be 1-10")
        unknown = [s for s in [*(m.schedulers or []), m.default_scheduler] if s and s not in SCHEDULERS]
        if unknown:
            raise ConfigError(f"{where}: unknown scheduler(s) {unknown}; known: {', '.join(sorted(SCHEDULERS))}")
        if m.schedulers is not None and m.default_scheduler and m.default_scheduler not in m.schedulers:
            m.schedulers = [*m.schedulers, m.default_scheduler]
        if m.preview == "taesd" and not m.taesd_path:
            raise ConfigError(f"{where}: preview = taesd needs taesd_path")
        if m.offload != "none" and any(not d.startswith(("cuda", "xpu")) for d in m.devices):
            raise ConfigError(f"{where}: offload = {m.offload} needs GPU devices (cuda:N, xpu:N), not {m.devices}")
        backend, _, kind = m.quantization.partition(":")
        if m.quantization and kind not in QUANTIZATION.get(backend, ()):
            known = ", ".join(f"{b}:{k}" for b, kinds in QUANTIZATION.items() for k in kinds)
            raise ConfigError(f"{where}: quantization {m.quantization!r} is not one of {known}")
        cache, _, threshold = m.step_cache.partition(":")
        if m.step_cache and (cache != "first_block" or not _positive_number(threshold)):
            raise ConfigError(f"{where}: step_cache {m.step_cache!r} is not first_block:<threshold> (e.g. 0.12)")
        for name in ("edit_strength", "edit_strength_high_fidelity", "variation_strength"):
            if not 0 < getattr(m, name) <= 1:
                raise ConfigError(f"{where}: {name} must be in (0, 1]")
        if m.preview_downscale < 1:
            raise ConfigError(f"{where}: preview_downscale must be >= 1")
        bad_q = set(m.quality_steps) - {"low", "medium", "high"}
        if bad_q or any(not 0 < v <= 1 for v in m.quality_steps.values()):
            raise ConfigError(f"{where}: quality_steps maps low/medium/high to fractions in (0, 1]")
        if m.max_batch_pixels < 0:
            raise ConfigError(f"{where}: max_batch_pixels must be >= 0")
        if m.enhance_template:
            from app.services.enhance import check_template  # here: config is imported before any service

            try:
                check_template(m.enhance_template)
            except ValueError as e:
                raise ConfigError(f"{where}: enhance_template: {e}") from None
    _validate_pool(settings, seen)
    t = settings.training
    if t.base_model and t.base_model not in seen:
        raise ConfigError(f"training: base_model {t.base_model!r} is not a configured model")
    if not 1 <= t.min_images <= t.max_images:
        raise ConfigError("training: need 1 <= min_images <= max_images")
    if t.max_steps < 0 or t.resolution < 0 or t.preview_every < 0 or t.resolution % 8:
        raise ConfigError("training: max_steps, preview_every and resolution (a multiple of 8) must be >= 0")


def _validate_pool(settings: Settings, models: set[str]) -> None:
    for m in settings.resolved_models():
        unknown = [f for f in m.fallbacks if f not in models or f == m.name]
        if unknown:
            raise ConfigError(f"model {m.name!r}: fallbacks {unknown} are not other configured models")
    names: set[str] = set()
    for u in settings.upstreams:
        where = f"upstream {u.name!r}"
        if u.name in names:
            raise ConfigError(f"{where} is configured twice")
        names.add(u.name)
        if not u.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: base_url must be an http(s) URL")
        unknown = sorted(set(u.models) - models)
        if unknown:
            raise ConfigError(f"{where}: models {unknown} are not configured models")
    bad_weights = {name: w for name, w in settings.backend_weights.items() if not w > 0}
    if bad_weights:
        raise ConfigError(f"backend_weights must be positive: {bad_weights}")
    if settings.max_attempts < 1:
        raise ConfigError("max_attempts must be >= 1")
    if settings.cooldown_failures < 1 or settings.cooldown_window <= 0 or settings.cooldown_seconds < 0:
        raise ConfigError("need cooldown_failures >= 1, cooldown_window > 0 and cooldown_seconds >= 0")
    if settings.batch_window_ms < 0 or settings.drain_timeout < 0 or settings.health_interval <= 0:
        raise ConfigError("batch_window_ms and drain_timeout must be >= 0, health_interval > 0")
    if not 0 < settings.job_share <= 1:
        raise ConfigError("job_share must be in (0, 1]")
    if settings.job_max_attempts < 1 or settings.job_lease <= 0 or settings.job_poll_interval <= 0:
        raise ConfigError("need job_max_attempts >= 1, job_lease > 0 and job_poll_interval > 0")
    if settings.job_queue_timeout <= 0 or settings.job_retention <= 0:
        raise ConfigError("job_queue_timeout and job_retention must be > 0")
    if any(s < 0 for s in settings.webhook_retry_schedule) or settings.webhook_timeout <= 0:
        raise ConfigError("webhook_retry_schedule entries must be >= 0 and webhook_timeout > 0")
    if settings.enhancer_url and not (
        settings.enhancer_url.startswith(("http://", "https://")) and settings.enhancer_model
    ):
        raise ConfigError("enhancer_url must be an http(s) URL, and enhancer_model must be set with it")
