"""The API contract (``openapi.yaml`` + ``schemas/``) against the code, so that neither drifts from the other.

Static checks: the bundle resolves, the routes are the contract's paths, the handlers' parameters, bodies and
operation ids and success statuses are the contract's, every wire struct has the same fields, required-ness, types,
constraints and enums as the contract's schema of the same name, the upload routes' multipart and JSON bodies are
the structs they are decoded into (plus their file parts), and each operation's ``security`` is what the auth
middleware enforces on its path. Live checks: what the app actually answers (JSON, SSE frames, errors, headers),
anonymous and with credentials (admin key, virtual keys in every header, Basic users, per-key limits, the admin
API, asynchronous jobs and their events, the custom-models inference API, the custom-models API), validates against
the contract, and so do the Hugging Face dialect's image bytes and ``{"error"}`` envelope and the AUTOMATIC1111
dialect's answers (its ``info`` JSON string included) and ``{"error", "detail", "body", "errors"}`` envelope, and
the ModelsLab dialect's ``success``/``processing``/``error`` envelopes, fetches, webhook payloads, informational
answers and ``{"status": "error", "message", "messege"}`` refusals. No torch: the backend is :class:`FakeBackend`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import time
import typing
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from litestar import Litestar, Response
from litestar.testing import TestClient
from PIL import Image

from app import contract
from app.api import uploads
from app.api.errors import ENVELOPES
from app.api.system import Readiness, ReadyBackend
from app.asgi import create_app
from app.auth import middleware
from app.auth.principals import KEY_PREFIX, hash_password
from app.backends.fake import FakeBackend
from app.config import DEMO_MODEL, Settings, load_settings
from app.errors import ErrorBody, ErrorEvent, ErrorResponse
from app.protocol import a1111 as a1111_protocol
from app.protocol import admin as admin_protocol
from app.protocol import custom as custom_protocol
from app.protocol import hf as hf_protocol
from app.protocol import images as protocol
from app.protocol import infer as infer_protocol
from app.protocol import jobs as jobs_protocol
from app.protocol import modelslab as modelslab_protocol
from app.services.custom import MAX_IMAGE_BYTES
from app.worker.protocol import SCHEDULERS


def module_structs(module: Any) -> list[type[msgspec.Struct]]:
    """The public wire structs of a module (a private base only lends its fields to them)."""
    return [
        obj
        for name, obj in vars(module).items()
        if isinstance(obj, type)
        and issubclass(obj, msgspec.Struct)
        and obj.__module__ == module.__name__
        and not name.startswith("_")
    ]


# Every struct of the app.protocol modules is a public wire type, so each must be in the contract.
PROTOCOL_STRUCTS = module_structs(protocol)
ADMIN_STRUCTS = module_structs(admin_protocol)
JOB_STRUCTS = module_structs(jobs_protocol)
INFER_STRUCTS = module_structs(infer_protocol)
CUSTOM_STRUCTS = module_structs(custom_protocol)
HF_STRUCTS = module_structs(hf_protocol)
A1111_STRUCTS = module_structs(a1111_protocol)
MODELSLAB_STRUCTS = module_structs(modelslab_protocol)
WIRE_STRUCTS: list[type[msgspec.Struct]] = [
    *PROTOCOL_STRUCTS,
    *ADMIN_STRUCTS,
    *JOB_STRUCTS,
    *INFER_STRUCTS,
    *CUSTOM_STRUCTS,
    *HF_STRUCTS,
    *A1111_STRUCTS,
    *MODELSLAB_STRUCTS,
    ErrorResponse,
    ErrorBody,
    ErrorEvent,
    Readiness,
    ReadyBackend,
]
# Structs the server decodes (requests); all others it only encodes (responses, events).
REQUEST_STRUCTS = {
    protocol.ImageGenerateRequest,
    protocol.ImageEditRequest,
    protocol.ImageRef,
    protocol.Fallback,
    protocol.LoraSpec,
    protocol.ImageEditJsonRequest,
    protocol.ImageVariationRequest,
    admin_protocol.KeyCreate,
    admin_protocol.KeyUpdate,
    infer_protocol.GenerationRequest,
    infer_protocol.EnhancePromptRequest,
    custom_protocol.CreateModel,
    custom_protocol.RenameModel,
    custom_protocol.StartTraining,
    custom_protocol.CreatePrediction,
    custom_protocol.ScaleConfig,
    custom_protocol.ImageSize,
    hf_protocol.TaskRequest,
    hf_protocol.TaskParameters,
    hf_protocol.TaskOptions,
    hf_protocol.TargetSize,
    hf_protocol.HandlerRequest,
    a1111_protocol.Txt2Img,
    a1111_protocol.Img2Img,
    modelslab_protocol.Request,
}
# Wire structs documented under another name than their own (the contract's schemas have one namespace).
SCHEMA_NAMES: dict[type[msgspec.Struct], str] = {
    modelslab_protocol.Request: "ModelsLabRequest",
    modelslab_protocol.ErrorBody: "ModelsLabError",
}
# Request structs whose fields typed ``Any`` take several JSON forms (app/protocol/modelslab.py ``Request``: a number
# or a string holding one, "yes"/"no" or a boolean), read by the translation itself (``number``, ``flag``):
# msgspec's schema of such a field is empty, so the contract states the forms it takes (a ``oneOf``, or no type for
# any value) and says how it is read; only its default is compared. The live checks send the forms.
ANY_TYPED_REQUESTS = {modelslab_protocol.Request}
# Routes that read their body themselves (app/api/uploads.py) instead of through a ``data`` argument:
# operationId -> {media type: (the contract's body schema, the struct app/api/uploads.py decodes it into)}.
UPLOAD_BODIES: dict[str, dict[str, tuple[str, type[msgspec.Struct]]]] = {
    "imageEdit": {
        "multipart/form-data": ("ImageEditMultipartRequest", protocol.ImageEditRequest),
        "application/json": ("ImageEditJsonRequest", protocol.ImageEditJsonRequest),
    },
    "imageVariation": {
        "multipart/form-data": ("ImageVariationMultipartRequest", protocol.ImageVariationRequest),
    },
}
# Routes that decode a JSON body themselves (app/api/hf.py: ``hf.decode(await request.body(), ...)``,
# app/services/sdapi.py: ``a1111.decode(body, ...)`` and app/services/modelslab.py: ``modelslab.decode(body)``,
# leniently) instead of through a ``data`` argument, checked as UPLOAD_BODIES are: operationId -> {media type:
# (schema, struct)}.
DECODED_BODIES: dict[str, dict[str, tuple[str, type[msgspec.Struct]]]] = {
    "hfTextToImage": {"application/json": ("TaskRequest", hf_protocol.TaskRequest)},
    "hfHandler": {"application/json": ("HandlerRequest", hf_protocol.HandlerRequest)},
    "sdTxt2Img": {"application/json": ("Txt2Img", a1111_protocol.Txt2Img)},
    "sdImg2Img": {"application/json": ("Img2Img", a1111_protocol.Img2Img)},
    **{
        operation_id: {"application/json": ("ModelsLabRequest", modelslab_protocol.Request)}
        for operation_id in (
            "mlText2Img",
            "mlImg2Img",
            "mlInpaint",
            "mlFetch",
            "mlFetchByBody",
            "mlSystemLoad",
            "mlSystemDetails",
            "mlAllModels",
            "mlModelList",
            "mlSchedulers",
        )
    },
}
# Of those, the routes whose body may be left out (``modelslab.decode`` reads no body as ``{}``): the key may come
# in a header, and they read nothing else, or only an id the path names.
OPTIONAL_BODIES = {"mlFetch", "mlSystemLoad", "mlSystemDetails", "mlAllModels", "mlModelList", "mlSchedulers"}
# Routes whose body is a file's raw bytes, read from the request stream (app/api/admin.py, app/api/custom.py):
# operationId -> the media types the contract declares for it, each ``type: string, format: binary``.
IMAGE_BYTES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
RAW_BODIES = {
    "uploadAdapter": ("application/octet-stream",),
    "customUploadData": IMAGE_BYTES,
    "customReplaceData": IMAGE_BYTES,
}
# The file parts each multipart body declares besides its struct's fields (all of them names uploads.py reads).
MULTIPART_FILES = {"imageEdit": {"image", "image[]", "mask"}, "imageVariation": {"image", "image[]"}}
# Header parameters each handler reads from the request itself (app/api/images.py, app/api/infer.py), lower case.
HEADER_PARAMETERS = {
    **dict.fromkeys(("imageGeneration", "imageEdit", "imageVariation"), ("prefer", "idempotency-key")),
    "inferCreateGeneration": ("idempotency-key",),
    **dict.fromkeys(("hfTextToImage", "hfHandler"), ("x-wait-for-model", "x-scale-up-timeout")),
}
# A handler served at several paths has one ``operation_id``, but OpenAPI wants each operation's ``operationId``
# unique: the operations of its other paths are named here (app/api/hf.py's seed 003 handler, also at ``/predict``).
# The ModelsLab routes (app/api/modelslab.py) are each served under /api/v6/images (their own id), the enterprise
# API's /api/v1/enterprise (``mlEnterprise…``) and the SDK's /api/v1/enterprise/images (``mlSdk…``).
ML_PREFIXES = {"/api/v1/enterprise": "mlEnterprise", "/api/v1/enterprise/images": "mlSdk"}
ML_ROUTES = {"text2img": "Text2Img", "img2img": "Img2Img", "inpaint": "Inpaint", "fetch/{job_id}": "Fetch"}
OTHER_OPERATION_IDS = {
    ("/hf/endpoints/{model_id}/predict", "POST"): "hfHandlerPredict",
    **{
        (f"{prefix}/{route}", "POST"): f"{name}{op}"
        for prefix, name in ML_PREFIXES.items()
        for route, op in ML_ROUTES.items()
    },
    **{(f"{prefix}/fetch", "POST"): f"{name}FetchByBody" for prefix, name in ML_PREFIXES.items()},
}
# 2xx statuses a handler answers besides its declared ``status_code``, through a ``Response`` of its own: a job
# (``Prefer: respond-async``), a cancel still under way, a result not ready yet.
OTHER_SUCCESSES = {
    **dict.fromkeys(("imageGeneration", "imageEdit", "imageVariation"), ("202",)),
    "cancelJob": ("202",),
    "inferGenerationResult": ("202",),
}
# Each streamed route's event union and the prefix of its image events' ``type`` (app/services/images.py).
STREAM_UNIONS = {"ImageGenStreamEvent": "image_generation", "ImageEditStreamEvent": "image_edit"}
# Contract schemas with no struct of their own name behind them: the SSE unions, the multipart bodies (a struct
# plus files, checked by test_upload_bodies_match_structs), and /health's plain dict (checked live).
SCHEMAS_WITHOUT_STRUCT = {
    *STREAM_UNIONS,
    "ImageGenServerSentEvent",  # an SSE event's fields (event, data): sse.py frames them, data is the union
    "ImageEditServerSentEvent",
    "JobServerSentEvent",  # a job event's SSE fields; data is a JobEvent
    *(name for bodies in UPLOAD_BODIES.values() for name, struct in bodies.values() if name != struct.__name__),
    "Health",
    # The ModelsLab dialect's answers, built as dicts (app/services/modelslab.py ``_answer``, ``_webhook_body``,
    # app/protocol/modelslab.py ``meta``, the informational routes): checked live. ModelsLabFlag: the forms of a
    # yes/no field of ModelsLabRequest.
    "ModelsLabFlag",
    "ModelsLabMeta",
    "ModelsLabSuccess",
    "ModelsLabProcessing",
    "ModelsLabFailure",
    "ModelsLabResult",
    "ModelsLabWebhook",
    "ModelsLabWebhookSuccess",
    "ModelsLabWebhookFailed",
    "ModelsLabSystemLoad",
    "ModelsLabSystemDetails",
    "ModelsLabLoadedModel",
    "ModelsLabAllModels",
    "ModelsLabModel",
    "ModelsLabSchedulers",
}

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
IGNORED_METHODS = {"HEAD", "OPTIONS"}
# Handler arguments Litestar fills itself: never path or query parameters.
RESERVED_KWARGS = {"self", "request", "data", "state", "scope", "headers", "cookies", "query", "body", "socket"}
# Keywords compared between msgspec's JSON schema and the contract (descriptions, titles, examples are not).
CONSTRAINT_KEYS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "multipleOf",
    "format",
)
# Of those, the ones the contract may add to a field the server only sends (as it may add an ``enum``): the
# live checks hold the answers to them.
NARROWING_KEYS = ("pattern", "format")

# The credential alternatives of each kind of route (components.securitySchemes), as app/auth/middleware.py and
# app/auth/principals.py enforce them: any credential on /v1, an admin's (never a virtual key, so not x-bf-vk) on
# /admin, open or an admin's on /metrics, nothing elsewhere.
ANY_CREDENTIAL = [{"BearerAuth": []}, {"BasicAuth": []}, {"VirtualKeyAuth": []}, {"ApiKeyAuth": []}]
ADMIN_CREDENTIAL = [{"BearerAuth": []}, {"ApiKeyAuth": []}, {"BasicAuth": []}]
SECURITY_SCHEMES = {
    "BearerAuth": {"type": "http", "scheme": "bearer"},
    "BasicAuth": {"type": "http", "scheme": "basic"},
    "VirtualKeyAuth": {"type": "apiKey", "in": "header", "name": "x-bf-vk"},
    "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "x-api-key"},
}
# Headers whose meaning a client must be told: when the app sends one, the contract must declare it.
DECLARED_HEADERS = ("retry-after", "www-authenticate", "x-should-retry")
ADMIN_KEY = "sk-test-admin"
# The refusals of routes whose errors come in a dialect's envelope (app/api/errors.py ENVELOPES), by path prefix:
# status -> the contract's response (an envelope's own, in place of the OpenAI-shaped one).
DIALECT_REFUSALS = {
    "/hf/": {"401": "HFUnauthorized"},
    "/sdapi/": {"401": "A1111Unauthorized"},
    "/api/": {"401": "ModelsLabUnauthorized"},
}
# Routes the auth middleware leaves open because their service authenticates the caller itself, by path prefix: the
# ModelsLab dialect reads the key from the JSON body, else the credential headers of /v1
# (app/services/modelslab.py ``_principal``). Their ``security`` is ``{}`` (the key in the body) or any credential
# header, and they answer 401.
BODY_KEY_PREFIXES = ("/api/",)


# -- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return contract.bundle()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(environ={}, overrides={"data_dir": str(tmp_path)})


@pytest.fixture
def app(settings: Settings) -> Litestar:
    return create_app(settings, backends=[])


# -- helpers ------------------------------------------------------------------------------------------------------


def resolve(spec: dict[str, Any], ref: str) -> Any:
    """The node a local ``#/a/b`` JSON pointer names; KeyError when there is none."""
    if not ref.startswith("#/"):
        raise KeyError(ref)
    node: Any = spec
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[part]
    return node


def walk(node: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every mapping in ``node`` with its JSON-pointer-ish location."""
    if isinstance(node, dict):
        yield where, node
        for k, v in node.items():
            yield from walk(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{where}/{i}")


def normalise_path(path: str) -> str:
    """Litestar's ``/v1/models/{model_id:str}`` -> OpenAPI's ``/v1/models/{model_id}``."""
    return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", path)


def handlers(app: Litestar) -> Iterator[tuple[str, str, Any]]:
    """``(OpenAPI path, METHOD, handler)`` for every route handler of ``app``, HEAD and OPTIONS left out."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            for method in sorted(set(handler.http_methods) - IGNORED_METHODS):
                yield normalise_path(route.path), method, handler


def operation(spec: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    item = spec["paths"].get(path)
    assert item is not None, f"openapi.yaml has no path {path}"
    op = item.get(method.lower())
    assert op is not None, f"openapi.yaml has no {method} {path}"
    return op


def flatten(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with ``$ref`` followed and its ``allOf`` members merged into one object schema.

    ``properties`` and ``required`` are the union of the members'; other keywords are the schema's own.
    """
    if "$ref" in schema:
        return flatten(spec, resolve(spec, schema["$ref"]))
    if "allOf" not in schema:
        return schema
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    properties: dict[str, Any] = {}
    required: list[str] = []
    for part in [*(flatten(spec, member) for member in schema["allOf"]), merged]:
        properties.update(part.get("properties", {}))
        required += [name for name in part.get("required", []) if name not in required]
        if part.get("additionalProperties") is False:
            merged["additionalProperties"] = False
    merged["properties"] = properties
    if required:
        merged["required"] = required
    return merged


def schema_name(struct: type[msgspec.Struct]) -> str:
    """The name of a wire struct's schema in the contract: its own, but for those in SCHEMA_NAMES."""
    return SCHEMA_NAMES.get(struct, struct.__name__)


def is_struct(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


def ref_name(node: dict[str, Any]) -> str | None:
    ref = node.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(type(value))


def shape(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema reduced to what both msgspec and the contract must agree on, whatever way each spells it.

    ``anyOf: [{type: integer, minimum: 0}, {type: null}]`` and ``type: [integer, 'null'], minimum: 0`` give the
    same shape; so do ``enum: [a, b]`` next to ``type: null`` and ``type: [string, 'null'], enum: [a, b, null]``.
    """
    branches = schema.get("anyOf") or schema.get("oneOf")
    if branches:
        merged: dict[str, Any] = {"types": set()}
        for branch in branches:
            part = shape(branch)
            merged["types"] |= part.pop("types")
            if "enum" in part:
                merged["enum"] = merged.get("enum", set()) | part.pop("enum")
            merged.update(part)
        return merged
    out: dict[str, Any] = {}
    types = schema.get("type", [])
    out["types"] = {types} if isinstance(types, str) else set(types)
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values is not None:
        if None in values:
            out["types"].add("null")
        values = [v for v in values if v is not None]
        if not schema.get("type"):
            out["types"] |= {json_type(v) for v in values}
        out["enum"] = set(values)
    if "$ref" in schema:
        out["ref"] = ref_name(schema)
    if "items" in schema:
        out["items"] = shape(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = shape(schema["additionalProperties"])
    out.update({k: schema[k] for k in CONSTRAINT_KEYS if k in schema})
    return out


def shape_diff(code: dict[str, Any], spec: dict[str, Any], *, narrowing: bool) -> dict[str, tuple[Any, Any]]:
    """``{keyword: (code's, contract's)}`` where they differ.

    With ``narrowing`` (schemas the server only sends), the contract may list the values a plain ``str`` field
    actually takes as an ``enum``, as long as they have the field's type, and may state a ``pattern`` or ``format``
    the code does not (the live checks hold the answers to both).
    """
    code, spec = dict(code), dict(spec)
    if narrowing and "enum" in spec and "enum" not in code:
        enum = spec.pop("enum")
        if not {json_type(v) for v in enum} <= code["types"]:
            return {"enum": (None, sorted(enum, key=str))}
    diff: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(code) | set(spec)):
        a, b = code.get(key), spec.get(key)
        if key in ("items", "additionalProperties") and a is not None and b is not None:
            for sub, pair in shape_diff(a, b, narrowing=narrowing).items():
                diff[f"{key}.{sub}"] = pair
        elif a != b and not (narrowing and key in NARROWING_KEYS and a is None):
            diff[key] = (
                sorted(a, key=str) if isinstance(a, set) else a,
                sorted(b, key=str) if isinstance(b, set) else b,
            )
    return diff


def always_sent(struct: type[msgspec.Struct], field: msgspec.structs.FieldInfo) -> bool:
    """Whether encoding ``struct`` always writes ``field`` (the contract's ``required`` for responses)."""
    if field.required:
        return True
    return field.default is not msgspec.UNSET and not struct.__struct_config__.omit_defaults


def validate(value: Any, schema: dict[str, Any], spec: dict[str, Any], where: str = "$") -> list[str]:
    """What is wrong with ``value`` against a contract ``schema``; objects are closed (undeclared keys are drift)."""
    if "$ref" in schema:
        return validate(value, resolve(spec, schema["$ref"]), spec, where)
    if "allOf" in schema:
        return validate(value, flatten(spec, schema), spec, where)
    if "oneOf" in schema:
        disc = schema.get("discriminator")
        if disc and isinstance(value, dict):
            key = value.get(disc["propertyName"])
            target = disc.get("mapping", {}).get(key)
            if target is None:
                return [f"{where}.{disc['propertyName']}: {key!r} is none of {sorted(disc.get('mapping', {}))}"]
            return validate(value, {"$ref": target}, spec, where)
        results = [validate(value, branch, spec, where) for branch in schema["oneOf"]]
        if sum(not r for r in results) != 1:
            return [f"{where}: matches {sum(not r for r in results)} of the oneOf branches, not 1: {results}"]
        return []
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        allowed = {types} if isinstance(types, str) else set(types)
        actual = json_type(value)
        if actual not in allowed and not (actual == "integer" and "number" in allowed):
            return [f"{where}: {actual} {value!r:.60} where the contract says {sorted(allowed)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not in the contract's enum {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{where}: length {len(value)} is outside the contract's bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r:.60} does not match the contract's pattern {schema['pattern']!r}")
        if schema.get("format") == "date-time" and not is_date_time(value):
            errors.append(f"{where}: {value!r} is not an RFC 3339 date-time")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            errors.append(f"{where}: {value} is outside the contract's bounds")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], spec, f"{where}[{i}]")
    elif isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{where}: required key {k!r} is missing" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if k in props:
                errors += validate(v, props[k], spec, f"{where}.{k}")
            elif isinstance(extra, dict):
                errors += validate(v, extra, spec, f"{where}.{k}")
            elif extra is not True:
                errors.append(f"{where}: key {k!r} is sent but not in the contract")
    return errors


def is_date_time(value: str) -> bool:
    """RFC 3339 ``date-time``: a full date and time with a ``Z`` or numeric offset."""
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def check_response(spec: dict[str, Any], path: str, method: str, response: Any) -> Any:
    """Assert the contract declares ``response`` (status, media type, headers) and its JSON body conforms."""
    op = operation(spec, path, method)
    status = str(response.status_code)
    declared = op["responses"].get(status)
    assert declared is not None, (
        f"{method} {path} answered {status}, which openapi.yaml does not declare "
        f"(it has {sorted(op['responses'])}); body: {response.text[:200]}"
    )
    if "$ref" in declared:
        declared = resolve(spec, declared["$ref"])
    content = declared.get("content", {})
    if not content:
        assert not response.content, f"{method} {path} {status} has a body; openapi.yaml declares none"
        return None
    media = response.headers.get("content-type", "").split(";")[0].strip()
    assert media in content, (
        f"{method} {path} {status} answered {media!r}, but openapi.yaml declares only {sorted(content)}"
    )
    headers = {k.lower(): v for k, v in declared.get("headers", {}).items()}
    for name, header in headers.items():
        if header.get("required"):
            assert name in response.headers, f"{method} {path} {status} lacks the required header {name}"
    for name in DECLARED_HEADERS:
        if name in response.headers:
            assert name in headers, f"{method} {path} {status} sends {name}; openapi.yaml does not say so"
            enum = headers[name].get("schema", {}).get("enum")
            assert enum is None or response.headers[name] in enum, (
                f"{method} {path} {status} sends {name}: {response.headers[name]}, not one of {enum}"
            )
    body = response.json() if media == "application/json" else None
    if body is not None:
        errors = validate(body, content[media]["schema"], spec)
        assert not errors, f"{method} {path} {status} body drifted from openapi.yaml:\n" + "\n".join(errors)
    return body


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE body, asserting OpenAI's framing: ``event:`` + ``data:``, no ``id:``, no ``[DONE]``."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields: dict[str, list[str]] = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
        assert set(fields) == {"event", "data"}, (
            f"SSE frame has fields {sorted(fields)}, not event + data: {block!r:.200}"
        )
        assert len(fields["event"]) == len(fields["data"]) == 1, (
            f"SSE frame is not one event + one data: {block!r:.200}"
        )
        assert fields["data"][0] != "[DONE]", "the stream sends data: [DONE]; the contract says it does not"
        data = json.loads(fields["data"][0])
        assert data.get("type") == fields["event"][0], f"event: {fields['event'][0]} carries type {data.get('type')}"
        events.append((fields["event"][0], data))
    return events


# -- 1. the bundle ------------------------------------------------------------------------------------------------


def test_bundle_resolves(spec: dict[str, Any]) -> None:
    problems = []
    for where, node in walk(spec):
        ref = node.get("$ref")
        targets = [ref] if isinstance(ref, str) else []
        if where.endswith("/discriminator"):
            targets += list(node.get("mapping", {}).values())
        for target in targets:
            if not target.startswith("#/"):
                problems.append(f"{where}: external $ref {target!r} left unresolved")
                continue
            try:
                resolved = resolve(spec, target)
            except (KeyError, IndexError, TypeError):
                problems.append(f"{where}: $ref {target!r} points at nothing")
                continue
            if resolved == {}:
                problems.append(f"{where}: $ref {target!r} points at an empty schema (a bundling placeholder)")
    assert not problems, "the bundled contract has broken references:\n" + "\n".join(problems)
    assert spec["openapi"] == "3.1.0"
    assert spec["info"]["title"] == "imagegate"


def test_security_schemes(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert set(schemes) == set(SECURITY_SCHEMES), f"securitySchemes are {sorted(schemes)}"
    for name, expected in SECURITY_SCHEMES.items():
        declared = {k: v for k, v in schemes[name].items() if k != "description"}
        assert declared == expected, f"{name} is {declared} in openapi.yaml, {expected} in app/auth/principals.py"
        assert schemes[name].get("description"), f"{name} must say what it accepts"
    assert "security" not in spec, "each operation declares its own security; no global default"


def example_path(path: str) -> str:
    """A concrete request path for an OpenAPI path template."""
    return re.sub(r"\{\w+\}", "x", path)


def test_operation_security(spec: dict[str, Any]) -> None:
    """Each operation's ``security`` is what app/auth/middleware.py enforces on its path, and its refusals
    (401, 403) are declared where they can happen, in the envelope of the dialect whose routes they are on."""
    problems = []
    unknown = set(DIALECT_REFUSALS) - set(ENVELOPES)
    assert not unknown, f"DIALECT_REFUSALS names prefixes app/api/errors.py wraps in no envelope: {sorted(unknown)}"
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            where = f"{method.upper()} {path}"
            default = middleware._protected(example_path(path), metrics_admin=False)
            when_admin = middleware._protected(example_path(path), metrics_admin=True)
            if path.startswith(BODY_KEY_PREFIXES):
                if default != (False, False):
                    problems.append(f"{where}: the middleware checks it, so a key sent in the body cannot work")
                expected, refusals = [{}, *ANY_CREDENTIAL], {"401": "Unauthorized"}
            elif default != when_admin:  # /metrics: open by default, an admin's with metrics_auth = admin
                expected, refusals = [{}, *ADMIN_CREDENTIAL], {"401": "Unauthorized", "403": "AdminRequired"}
            elif default == (True, True):
                expected, refusals = ADMIN_CREDENTIAL, {"401": "Unauthorized", "403": "AdminRequired"}
            elif default == (True, False):
                expected, refusals = ANY_CREDENTIAL, {"401": "Unauthorized"}
                if path.startswith("/v1/images/"):
                    refusals |= {"403": "ModelNotAllowed", "429": "TooManyRequests"}
            else:
                expected, refusals = [], {}
            for prefix, dialect in DIALECT_REFUSALS.items():
                if path.startswith(prefix):
                    refusals = {status: dialect.get(status, name) for status, name in refusals.items()}
            if op.get("security") != expected:
                problems.append(f"{where}: security is {op.get('security')!r}, the middleware enforces {expected!r}")
            for status, name in refusals.items():
                found = ref_name(op["responses"].get(status, {}))
                if found != name:
                    problems.append(f"{where}: {status} is {found!r} in openapi.yaml, {name!r} expected")
            if not refusals and {"401", "403"} & set(op["responses"]):
                problems.append(f"{where}: an open route declares 401 or 403")
    assert not problems, "security drifted from app/auth:\n" + "\n".join(problems)


def test_examples_conform(spec: dict[str, Any]) -> None:
    problems = []
    for where, node in walk(spec):
        if "example" in node and "schema" in node:
            problems += [f"{where}: {e}" for e in validate(node["example"], node["schema"], spec)]
        if isinstance(node.get("examples"), dict) and "schema" in node:
            for name, example in node["examples"].items():
                value = example["value"]
                problems += [f"{where}/examples/{name}: {e}" for e in validate(value, node["schema"], spec)]
    assert not problems, "examples in openapi.yaml that do not match their own schema:\n" + "\n".join(problems)


# -- 2. routes and operations -------------------------------------------------------------------------------------


def test_routes_are_the_contract_paths(app: Litestar, spec: dict[str, Any]) -> None:
    served = {(path, method) for path, method, _ in handlers(app)}
    documented = {
        (path, method.upper()) for path, item in spec["paths"].items() for method in item if method in HTTP_METHODS
    }
    missing = sorted(served - documented)
    stale = sorted(documented - served)
    assert not missing and not stale, (
        f"routes the app serves that openapi.yaml lacks: {missing}; "
        f"operations in openapi.yaml the app does not serve: {stale}"
    )


def test_operation_ids_are_unique(spec: dict[str, Any]) -> None:
    ids = [op.get("operationId") for item in spec["paths"].values() for m, op in item.items() if m in HTTP_METHODS]
    repeated = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    assert not repeated, f"operationIds used by more than one operation in openapi.yaml: {repeated}"


def test_operations_match_handlers(app: Litestar, spec: dict[str, Any]) -> None:
    problems = []
    unserved = set(OTHER_OPERATION_IDS) - {(path, method) for path, method, _ in handlers(app)}
    if unserved:
        problems.append(f"OTHER_OPERATION_IDS names operations the app does not serve: {sorted(unserved)}")
    for path, method, handler in handlers(app):
        op = operation(spec, path, method)
        where = f"{method} {path}"
        operation_id = OTHER_OPERATION_IDS.get((path, method), handler.operation_id)
        if operation_id and op.get("operationId") != operation_id:
            problems.append(f"{where}: operationId {op.get('operationId')!r} in openapi.yaml, {operation_id!r} in code")

        # Path and query parameters: the handler's arguments that are neither reserved nor dependencies.
        dependencies = set(handler.resolve_dependencies())
        path_params = set(re.findall(r"\{(\w+)\}", path))
        code_params = {}
        for name, param in handler.parsed_fn_signature.parameters.items():
            if name in RESERVED_KWARGS or name in dependencies:
                continue
            where_in = "path" if name in path_params else "query"
            code_params[(where_in, name)] = where_in == "path" or not param.has_default
        declared = [resolve(spec, p["$ref"]) if "$ref" in p else p for p in op.get("parameters", [])]
        spec_params = {(p["in"], p["name"]): bool(p.get("required")) for p in declared if p["in"] != "header"}
        if code_params != spec_params:
            problems.append(
                f"{where}: parameters (in, name): required are {spec_params} in openapi.yaml, {code_params} in code"
            )
        # Header parameters: those the handler reads from the request itself (HEADER_PARAMETERS), all optional.
        spec_headers = {p["name"].lower(): bool(p.get("required")) for p in declared if p["in"] == "header"}
        code_headers = dict.fromkeys(HEADER_PARAMETERS.get(handler.operation_id, ()), False)
        if spec_headers != code_headers:
            problems.append(f"{where}: header parameters are {spec_headers} in openapi.yaml, {code_headers} in code")

        # Request body: the struct behind ``data``, or for upload routes and the hf dialect, the bodies they read.
        data = handler.parsed_fn_signature.parameters.get("data")
        content = op.get("requestBody", {}).get("content", {})
        read_bodies = UPLOAD_BODIES.get(handler.operation_id) or DECODED_BODIES.get(handler.operation_id)
        raw = RAW_BODIES.get(handler.operation_id)
        if raw is not None:
            if data is not None:
                problems.append(f"{where}: decodes a `data` argument, but RAW_BODIES says it reads its own body")
            if sorted(content) != sorted(raw):
                problems.append(f"{where}: body media types are {sorted(content)} in openapi.yaml, {sorted(raw)}")
            for media, body in content.items():
                if body.get("schema") != {"type": "string", "format": "binary"}:
                    problems.append(f"{where}: the {media} body is {body.get('schema')}, not a binary string")
            if not op.get("requestBody", {}).get("required"):
                problems.append(f"{where}: the request body is required")
        elif read_bodies is not None:
            if data is not None:
                problems.append(f"{where}: decodes a `data` argument, but UPLOAD_BODIES or DECODED_BODIES say not")
            if set(content) != set(read_bodies):
                problems.append(
                    f"{where}: body media types are {sorted(content)} in openapi.yaml, {sorted(read_bodies)}"
                )
            for media, (name, _) in read_bodies.items():
                found = ref_name(content.get(media, {}).get("schema", {}))
                if found != name:
                    problems.append(f"{where}: {media} body is {found!r} in openapi.yaml, {name!r} expected")
            required = handler.operation_id not in OPTIONAL_BODIES
            if bool(op.get("requestBody", {}).get("required")) != required:
                problems.append(f"{where}: the request body is {'required' if required else 'optional'}")
        else:
            body = content.get("application/json", {}).get("schema", {})
            struct, optional = body_type(data.annotation) if data is not None else (None, False)
            if struct is not None and not is_struct(struct):
                # A body that is no struct (POST /sdapi/v1/options: any JSON object): an inline schema of its shape.
                diff = shape_diff(shape(msgspec.json.schema(struct)), shape(body), narrowing=False)
                if diff or "$ref" in body:
                    problems.append(f"{where}: request body is {body} in openapi.yaml, {struct} in code: {diff}")
            else:
                code_body = schema_name(struct) if struct is not None else None
                if code_body != ref_name(body):
                    problems.append(
                        f"{where}: request body is {ref_name(body)!r} in openapi.yaml, {code_body!r} in code"
                    )
            if set(content) - {"application/json"}:
                problems.append(f"{where}: body media types {sorted(content)}; a raw body belongs in RAW_BODIES")
            if data is not None and bool(op.get("requestBody", {}).get("required")) == optional:
                problems.append(
                    f"{where}: the request body is {'optional' if optional else 'required'} in code, "
                    f"required: {op.get('requestBody', {}).get('required')} in openapi.yaml"
                )

        # The handler's success status (200, 201 for a create, 204 for a delete) is the contract's only 2xx, but for
        # those the handler answers itself (OTHER_SUCCESSES).
        status = str(handler.status_code)
        successes = sorted(code for code in op["responses"] if code.startswith("2"))
        expected = sorted({status, *OTHER_SUCCESSES.get(handler.operation_id, ())})
        if successes != expected:
            problems.append(f"{where}: success statuses are {successes} in openapi.yaml, {expected} in code")
        # Its body, where the handler declares a struct (``Model`` or ``Response[Readiness]``) or a list of them,
        # JSON ``null`` where it returns None with a body (POST /sdapi/v1/options); none for a 204.
        returned = handler.parsed_fn_signature.return_type.annotation
        struct = typing.get_args(returned)[0] if typing.get_origin(returned) is Response else returned
        declared = op["responses"].get(status, {})
        if "$ref" in declared:
            declared = resolve(spec, declared["$ref"])
        ok = declared.get("content", {}).get("application/json", {}).get("schema", {})
        if is_struct(struct):
            if ref_name(ok) != schema_name(struct):
                problems.append(
                    f"{where}: {status} body is {ref_name(ok)!r} in openapi.yaml, {schema_name(struct)!r} in code"
                )
        elif typing.get_origin(struct) is list and is_struct(item := typing.get_args(struct)[0]):
            if ok.get("type") != "array" or ref_name(ok.get("items", {})) != schema_name(item):
                problems.append(
                    f"{where}: {status} body is {ok} in openapi.yaml, a list of {schema_name(item)} in code"
                )
        elif struct in (None, type(None)) and status != "204" and ok != {"type": "null"}:
            problems.append(f"{where}: {status} body is {ok} in openapi.yaml; the handler answers JSON null")
        if status == "204" and (returned not in (None, type(None)) or "content" in declared):
            problems.append(f"{where}: a 204 has no body, but the handler returns {returned!r} or the contract one")
    assert not problems, "operations drifted:\n" + "\n".join(problems)


def body_type(annotation: Any) -> tuple[Any, bool]:
    """The struct a ``data`` argument decodes into, and whether the body may be left out (``Struct | None``)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


# -- 3. wire structs ----------------------------------------------------------------------------------------------


def test_every_contract_schema_has_a_source(spec: dict[str, Any]) -> None:
    structs = {schema_name(s) for s in WIRE_STRUCTS}
    documented = set(spec["components"]["schemas"])
    assert structs - documented == set(), f"wire structs with no schema in the contract: {sorted(structs - documented)}"
    stale = documented - structs - SCHEMAS_WITHOUT_STRUCT
    assert not stale, f"contract schemas with no struct behind them: {sorted(stale)}"


def struct_problems(struct: type[msgspec.Struct], schema: dict[str, Any], *, request: bool) -> list[str]:
    """How a contract object ``schema`` (``allOf`` already merged) differs from ``struct``: field names,
    required-ness, types, constraints, enums, and for requests the defaults and whether unknown fields are refused.
    """
    name = struct.__name__
    if schema.get("type") != "object":
        return [f"{name}: contract type is {schema.get('type')!r}, not object"]
    fields = {f.name: f for f in msgspec.structs.fields(struct)}
    props: dict[str, Any] = schema.get("properties", {})

    missing, extra = sorted(set(fields) - set(props)), sorted(set(props) - set(fields))
    if missing or extra:
        return [f"{name}: fields in code but not in the contract: {missing}; in the contract but not in code: {extra}"]

    problems = []
    # Requests: a field without a default must be sent. Responses: a field the encoder always writes is required.
    if request:
        # The server ignores unknown fields unless the struct forbids them; the contract must say the same.
        forbids = struct.__struct_config__.forbid_unknown_fields
        closed = schema.get("additionalProperties") is False
        if closed != forbids:
            problems.append(
                f"{name}: unknown fields are {'rejected' if forbids else 'ignored'} in code, "
                f"{'rejected' if closed else 'allowed'} by the contract (additionalProperties)"
            )

    code_required = {n for n, f in fields.items() if (f.required if request else always_sent(struct, f))}
    spec_required = set(schema.get("required", []))
    if code_required != spec_required:
        problems.append(
            f"{name}: required only in code: {sorted(code_required - spec_required)}; "
            f"required only in the contract: {sorted(spec_required - code_required)}"
        )

    _, components = msgspec.json.schema_components([struct], ref_template="#/components/schemas/{name}")
    code_props = components[name]["properties"]
    for field, code_schema in code_props.items():
        if struct in ANY_TYPED_REQUESTS and set(code_schema) <= {"default"}:
            # Typed ``Any``: the contract states the forms the translation takes, and must say how it reads them.
            if not props[field].get("description"):
                problems.append(f"{name}.{field}: takes any JSON value in code; the contract must describe its forms")
        else:
            diff = shape_diff(shape(code_schema), shape(props[field]), narrowing=not request)
            problems += [
                f"{name}.{field}: {key} is {a!r} in code, {b!r} in the contract" for key, (a, b) in diff.items()
            ]
        if request:
            # A default the server applies by itself (n=1, stream=false, models=['*']) must be in the contract,
            # and only those; msgspec's schema leaves out the ones made by a default_factory.
            default = code_schema.get("default")
            factory = fields[field].default_factory
            if "default" not in code_schema and factory is not msgspec.NODEFAULT:
                default = msgspec.to_builtins(factory())
            if props[field].get("default") != default:
                problems.append(
                    f"{name}.{field}: default is {default!r} in code, {props[field].get('default')!r} in the contract"
                )
    return problems


def test_schema_names_are_unique() -> None:
    """The contract has one namespace of schemas: two wire structs of one name cannot both be documented."""
    names = [schema_name(s) for s in WIRE_STRUCTS]
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert not repeated, (
        f"wire structs of the same name: {repeated}; rename one, or name its schema apart in SCHEMA_NAMES: "
        + ", ".join(f"{s.__module__}.{s.__name__}" for s in WIRE_STRUCTS if schema_name(s) in repeated)
    )


@pytest.mark.parametrize("struct", WIRE_STRUCTS, ids=schema_name)
def test_struct_matches_schema(struct: type[msgspec.Struct], spec: dict[str, Any]) -> None:
    name = schema_name(struct)
    schema = spec["components"]["schemas"].get(name)
    assert schema is not None, f"openapi.yaml has no schema {name} for {struct.__module__}.{name}"
    problems = struct_problems(struct, flatten(spec, schema), request=struct in REQUEST_STRUCTS)
    assert not problems, "\n".join(problems)


def is_file(schema: dict[str, Any]) -> bool:
    """A multipart file part: ``format: binary``, an array of those, or a ``oneOf`` of both."""
    branches = schema.get("oneOf") or [schema]
    return all(b.get("format") == "binary" or b.get("items", {}).get("format") == "binary" for b in branches)


@pytest.mark.parametrize(
    ("operation_id", "media"),
    [(op, media) for op, bodies in UPLOAD_BODIES.items() for media in bodies],
)
def test_upload_bodies_match_structs(operation_id: str, media: str, spec: dict[str, Any]) -> None:
    name, struct = UPLOAD_BODIES[operation_id][media]
    schema = spec["components"]["schemas"].get(name)
    assert schema is not None, f"openapi.yaml has no schema {name} for the {media} body of {operation_id}"
    body = flatten(spec, schema)
    if media == "application/json":
        problems = struct_problems(struct, body, request=True)
        assert not problems, "\n".join(problems)
        return

    # Multipart: the struct's fields as text parts, plus the file parts uploads.py reads.
    props = body.get("properties", {})
    files = {k for k, v in props.items() if is_file(v)}
    assert files == MULTIPART_FILES[operation_id], f"{name}: file parts are {sorted(files)}"
    unread = files - {*uploads._IMAGE_FIELDS, *uploads._MASK_FIELDS}
    assert not unread, f"{name}: file parts app/api/uploads.py does not read: {sorted(unread)}"
    fields = {k: v for k, v in props.items() if k not in files}
    assert not set(body.get("required", [])) & files, f"{name}: `image` or `image[]` suffices; neither is required"
    assert body.get("anyOf") == [{"required": ["image"]}, {"required": ["image[]"]}], (
        f"{name}: must require one of `image` and `image[]` (anyOf), the names uploads.py reads images from"
    )
    max_images = Settings().max_images
    for part in ("image", "image[]"):
        arrays = [b for b in props[part].get("oneOf", [props[part]]) if b.get("type") == "array"]
        assert arrays and all(b.get("maxItems") == max_images for b in arrays), (
            f"{name}.{part}: an array of at most max_images ({max_images}) files"
        )
    text = {**body, "properties": fields, "required": [r for r in body.get("required", []) if r not in files]}
    problems = struct_problems(struct, text, request=True)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("union_name", "prefix"), STREAM_UNIONS.items())
def test_stream_event_union(union_name: str, prefix: str, spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    union = schemas[union_name]
    members = {ref_name(s) for s in union["oneOf"]}
    expected = {s.__name__ for s in typing.get_args(protocol.StreamEvent)} | {ErrorEvent.__name__}
    assert members == expected, f"{union_name}.oneOf is {sorted(members)}; the code streams {sorted(expected)}"
    mapping = union["discriminator"]["mapping"]
    error_type = ErrorEvent(error=ErrorBody("m", "server_error", None, None)).type
    assert set(mapping) == {f"{prefix}.partial_image", f"{prefix}.completed", error_type}, (
        f"{union_name} maps {sorted(mapping)}; the route streams {prefix}.* events"
    )
    assert {target.rsplit("/", 1)[-1] for target in mapping.values()} == expected
    for event_type, target in mapping.items():
        enum = resolve(spec, target)["properties"]["type"].get("enum")
        assert enum and event_type in enum, f"{union_name} maps {event_type!r} to {target}, whose type enum is {enum}"


def test_event_types_are_the_unions(spec: dict[str, Any]) -> None:
    """An event schema's ``type`` enum lists exactly the types some route's union maps to it."""
    mapped: dict[str, set[str]] = {}
    for union_name in STREAM_UNIONS:
        for event_type, target in spec["components"]["schemas"][union_name]["discriminator"]["mapping"].items():
            mapped.setdefault(target, set()).add(event_type)
    for target, types in mapped.items():
        enum = set(resolve(spec, target)["properties"]["type"]["enum"])
        assert enum == types, f"{target}: type enum {sorted(enum)}, but the stream unions map {sorted(types)}"


def test_scheduler_names_documented(spec: dict[str, Any]) -> None:
    text = spec["components"]["schemas"]["ImageGenerateRequest"]["properties"]["scheduler"]["description"]
    undocumented = [name for name in SCHEDULERS if f"`{name}`" not in text]
    assert not undocumented, f"scheduler names the code knows but the contract does not list: {undocumented}"


def test_a1111_samplers_documented(spec: dict[str, Any]) -> None:
    """The table of ``Txt2Img.sampler_name`` is app/protocol/a1111.py's SAMPLERS: name, aliases, scheduler."""
    text = spec["components"]["schemas"]["Txt2Img"]["properties"]["sampler_name"]["description"]
    rows = {
        cells[0].strip("`"): cells
        for line in text.splitlines()
        if line.startswith("| `") and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 3
    }
    problems = []
    for name, (scheduler, aliases) in a1111_protocol.SAMPLERS.items():
        row = rows.pop(name, None)
        if row is None:
            problems.append(f"{name!r} has no row")
            continue
        documented = {a.strip("` ") for a in row[1].split(",") if a.strip()}
        if documented != set(aliases):
            problems.append(f"{name!r}: aliases {sorted(documented)} in the contract, {aliases} in code")
        if not row[2].startswith(f"`{scheduler}`"):
            problems.append(f"{name!r}: scheduler {row[2]!r} in the contract, {scheduler!r} in code")
    karras = rows.pop("DPM++ 2M Karras", None)
    if karras is None or not karras[2].startswith("`dpmpp_2m_karras`"):
        problems.append(f"'DPM++ 2M Karras' must be documented as dpmpp_2m_karras: {karras}")
    if "`dpmpp_2m_karras`" not in text.split("| `DPM++ 2M` |")[-1].splitlines()[0]:
        problems.append("'DPM++ 2M' with scheduler karras must be documented as dpmpp_2m_karras")
    if rows:
        problems.append(f"rows for samplers the code does not know: {sorted(rows)}")
    schedules = spec["components"]["schemas"]["Schedule"]["properties"]
    if schedules["name"].get("enum") != list(a1111_protocol.SCHEDULES):
        problems.append(
            f"Schedule.name enum is {schedules['name'].get('enum')}, SCHEDULES {list(a1111_protocol.SCHEDULES)}"
        )
    if schedules["label"].get("enum") != list(a1111_protocol.SCHEDULES.values()):
        problems.append(f"Schedule.label enum is {schedules['label'].get('enum')}")
    assert not problems, "the sampler table drifted from app/protocol/a1111.py:\n" + "\n".join(problems)


def test_modelslab_schedulers_documented(spec: dict[str, Any]) -> None:
    """The table of ``ModelsLabRequest.scheduler`` is app/protocol/modelslab.py's SCHEDULERS and REFUSED, and the
    answers that list the accepted names (``schedulers_list``, ``meta.scheduler``) list those."""
    schemas = spec["components"]["schemas"]
    text = schemas["ModelsLabRequest"]["properties"]["scheduler"]["description"]
    rows = {
        cells[0].strip("`"): cells[1]
        for line in text.splitlines()
        if line.startswith("| `") and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 2
    }
    problems = []
    for name, ours in modelslab_protocol.SCHEDULERS.items():
        row = rows.pop(name, None)
        if row is None:
            problems.append(f"{name!r} has no row")
        elif ours is None and row != f"refused: {modelslab_protocol.REFUSED[name]}":
            reason = modelslab_protocol.REFUSED[name]
            problems.append(f"{name!r} is refused in code ({reason!r}), {row!r} in the contract")
        elif ours is not None and not row.startswith(f"`{ours}`"):
            problems.append(f"{name!r}: scheduler {row!r} in the contract, {ours!r} in code")
    if rows:
        problems.append(f"rows for scheduler names the code does not know: {sorted(rows)}")
    karras = text.split("| `DPMSolverMultistepScheduler` |")[-1].splitlines()[0]
    if "`dpmpp_2m_karras`" not in karras:
        problems.append("DPMSolverMultistepScheduler with use_karras_sigmas must be documented as dpmpp_2m_karras")
    accepted = [name for name, ours in modelslab_protocol.SCHEDULERS.items() if ours is not None]
    listed = schemas["ModelsLabSchedulers"]["properties"]["schedulers"]["items"]["enum"]
    if listed != accepted:
        problems.append(f"ModelsLabSchedulers lists {listed}, the code accepts {accepted}")
    if schemas["ModelsLabMeta"]["properties"]["scheduler"]["enum"] != ["default", *accepted]:
        problems.append("ModelsLabMeta.scheduler must list `default` and the accepted names")
    assert not problems, "the scheduler table drifted from app/protocol/modelslab.py:\n" + "\n".join(problems)


# -- 4. the served contract ---------------------------------------------------------------------------------------


def test_served_contract_is_the_bundle(app: Litestar) -> None:
    with TestClient(app) as client:
        response = client.get("/openapi.yaml")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/yaml")
    assert yaml.safe_load(response.content) == contract.bundle(), "GET /openapi.yaml differs from contract.bundle()"


# -- 5. live answers against the contract -------------------------------------------------------------------------


def fake_app(settings: Settings, **fake: Any) -> Litestar:
    return create_app(settings, backends=[(FakeBackend(**fake), [DEMO_MODEL])])


def png(width: int = 32, height: int = 32, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_tokens(width: int, height: int) -> int:
    return -(-width // 16) * -(-height // 16)


def post_checked(client: TestClient, spec: dict[str, Any], path: str, status: int, **kwargs: Any) -> Any:
    """POST, assert the status, check the answer against the contract and return its JSON body."""
    response = client.post(path, **kwargs)
    assert response.status_code == status, (kwargs.get("data"), kwargs.get("json"), response.text[:300])
    return check_response(spec, path, "POST", response)


def test_live_answers_conform(settings: Settings, spec: dict[str, Any]) -> None:
    gen = "/v1/images/generations"
    with TestClient(fake_app(settings)) as client:
        check_response(spec, "/health", "GET", client.get("/health"))
        check_response(spec, "/ready", "GET", client.get("/ready"))
        check_response(spec, "/v1/models", "GET", client.get("/v1/models"))
        check_response(spec, "/v1/models/{model_id}", "GET", client.get(f"/v1/models/{DEMO_MODEL}"))
        check_response(spec, "/v1/models/{model_id}", "GET", client.get("/v1/models/nope"))
        check_response(spec, "/metrics", "GET", client.get("/metrics"))

        body = check_response(spec, gen, "POST", client.post(gen, json={"prompt": "a cat", "n": 2, "size": "64x64"}))
        assert len(body["data"]) == 2 and all("b64_json" in d for d in body["data"])
        response = client.post(gen, json={"prompt": "a cat", "size": "64x64", "not_an_openai_field": 1})
        assert response.status_code == 200, f"the contract says unknown fields are ignored: {response.text}"
        body = check_response(
            spec, gen, "POST", client.post(gen, json={"prompt": "a cat", "size": "64x64", "response_format": "url"})
        )
        url = body["data"][0]["url"]
        check_response(spec, "/files/images/{name}", "GET", client.get(url))
        check_response(spec, "/files/images/{name}", "GET", client.get(url.split("?")[0]))

        for bad in ({"prompt": ""}, {"prompt": "x", "n": 11}, {"prompt": "x", "background": "transparent"}, {}):
            response = client.post(gen, json=bad)
            assert response.status_code == 400, (bad, response.text)
            check_response(spec, gen, "POST", response)
        response = client.post(gen, json={"prompt": "x", "model": "nope"})
        assert response.status_code == 404
        check_response(spec, gen, "POST", response)
        response = client.post(
            gen, content=b"x" * (settings.max_body_size + 1), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        check_response(spec, gen, "POST", response)


def test_live_stream_conforms(settings: Settings, spec: dict[str, Any]) -> None:
    gen = "/v1/images/generations"
    request = {
        "prompt": "a cat",
        "n": 2,
        "size": "64x64",
        "stream": True,
        "partial_images": 2,
        "response_format": "url",
    }
    with TestClient(fake_app(settings)) as client:
        response = client.post(gen, json=request)
    check_response(spec, gen, "POST", response)
    events = sse_events(response.text)
    union = spec["paths"][gen]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    union = resolve(spec, union["$ref"])["properties"]["data"]["contentSchema"]
    for i, (_, data) in enumerate(events):
        errors = validate(data, union, spec, f"event[{i}]")
        assert not errors, "stream event drifted from openapi.yaml:\n" + "\n".join(errors)
    kinds = [event for event, _ in events]
    assert kinds.count("image_generation.partial_image") == 4 and kinds.count("image_generation.completed") == 2
    assert all("b64_json" in data for _, data in events), "streams always carry b64_json"


def test_live_stream_error_event_conforms(settings: Settings, spec: dict[str, Any]) -> None:
    gen = "/v1/images/generations"
    with TestClient(fake_app(settings, fail="after_partial")) as client:
        response = client.post(gen, json={"prompt": "a cat", "size": "64x64", "stream": True, "partial_images": 1})
    check_response(spec, gen, "POST", response)
    events = sse_events(response.text)
    assert events and events[-1][0] == "error", f"the failed stream did not end with an error event: {events}"
    errors = validate(events[-1][1], {"$ref": "#/components/schemas/ImageGenStreamEvent"}, spec, "error event")
    assert not errors, "\n".join(errors)


def test_live_answers_without_workers(app: Litestar, spec: dict[str, Any]) -> None:
    gen = "/v1/images/generations"
    with TestClient(app) as client:
        response = client.get("/ready")
        assert response.status_code == 503
        check_response(spec, "/ready", "GET", response)
        response = client.post(gen, json={"prompt": "a cat"})
        assert response.status_code == 503 and "retry-after" in response.headers
        check_response(spec, gen, "POST", response)
        response = client.post(gen, json={"prompt": "a cat", "stream": True})
        assert response.status_code == 503, "errors before the stream starts keep their HTTP status"
        check_response(spec, gen, "POST", response)


EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"


def test_live_edit_answers_conform(settings: Settings, spec: dict[str, Any]) -> None:
    image = png(100, 60)
    with TestClient(fake_app(settings)) as client:
        # Multipart as the SDKs send it: scalars as strings, the file's type from its bytes, not its name.
        body = post_checked(
            client,
            spec,
            EDITS,
            200,
            data={"prompt": "a cat", "n": "2"},
            files={"image": ("a.txt", image, "text/plain")},
        )
        assert len(body["data"]) == 2 and body["background"] == "opaque"
        usage = body["usage"]
        assert usage["input_tokens_details"]["image_tokens"] == image_tokens(100, 60)
        assert usage["input_tokens"] == usage["input_tokens_details"]["text_tokens"] + image_tokens(100, 60)
        # `image[]` (what the SDKs send, even for one file) with a mask: inpainting, then outpainting around it.
        files = [("image[]", ("a.png", png(), "image/png")), ("mask", ("m.png", png(mode="RGBA"), "image/png"))]
        post_checked(client, spec, EDITS, 200, data={"prompt": "a cat", "stream": "false"}, files=files)
        post_checked(
            client, spec, EDITS, 200, data={"prompt": "x", "type": "outpainting", "size": "128x64"}, files=files
        )
        body = post_checked(
            client, spec, EDITS, 200, data={"type": "background_removal"}, files={"image": ("a", png(), "")}
        )
        assert body["background"] == "transparent"
        # JSON form: data: URLs, and the contract's own example.
        request = {
            "prompt": "a cat",
            "images": [{"image_url": data_url(png())}],
            "mask": {"image_url": data_url(png())},
        }
        body = post_checked(client, spec, EDITS, 200, json={**request, "response_format": "url"})
        assert "url" in body["data"][0]
        example = spec["paths"][EDITS]["post"]["requestBody"]["content"]["application/json"]["example"]
        post_checked(client, spec, EDITS, 200, json=example)

        one = {"image": ("a.png", png(), "image/png")}
        refused: list[tuple[dict[str, Any], str | None, str | None]] = [
            ({"data": {"prompt": "x"}, "files": {"mask": ("m.png", png(), "image/png")}}, "image", None),
            (
                {"data": {"prompt": "x"}, "files": {"image": ("a.png", b"GIF89a" + bytes(64), "image/png")}},
                "image",
                "invalid_image_format",
            ),
            (
                {"data": {"prompt": "x"}, "files": {"image": ("a.png", png()[:40], "image/png")}},
                "image",
                "invalid_image",
            ),
            (
                {"data": {"prompt": "x"}, "files": [("image", one["image"]), ("image[]", one["image"])]},
                "image",
                "unsupported",
            ),
            ({"data": {"prompt": "x"}, "files": {**one, "mask": ("m.png", png(16, 16), "image/png")}}, "mask", None),
            ({"data": {"prompt": "x", "type": "inpainting"}, "files": one}, "mask", None),
            ({"data": {"prompt": "x", "type": "outpainting"}, "files": one}, "size", None),
            ({"data": {"type": "background_removal", "output_format": "jpeg"}, "files": one}, "output_format", None),
            ({"data": {"n": "2"}, "files": one}, "prompt", None),
            ({"data": {"prompt": "x", "n": "two"}, "files": one}, "n", None),
            ({"json": {"prompt": "x", "images": [{"file_id": "file-1"}]}}, "images[0]", None),
            ({"json": {"prompt": "x", "images": [{"image_url": "https://example.com/a.png"}]}}, "images[0]", None),
            ({"json": {"prompt": "x", "images": []}}, "images", None),
            ({"content": b"prompt=x", "headers": {"content-type": "application/x-www-form-urlencoded"}}, None, None),
        ]
        for kwargs, param, code in refused:
            body = post_checked(client, spec, EDITS, 400, **kwargs)
            assert (body["error"]["param"], body["error"]["code"]) == (param, code), (kwargs, body)
        body = post_checked(client, spec, EDITS, 404, data={"prompt": "x", "model": "nope"}, files=one)
        assert body["error"]["code"] == "model_not_found"


def test_live_upload_limits_conform(tmp_path: Path, spec: dict[str, Any]) -> None:
    limits = {"data_dir": str(tmp_path), "max_upload_size": 20_000, "max_image_pixels": 40 * 40}
    with TestClient(fake_app(load_settings(environ={}, overrides=limits))) as client:
        for path in (EDITS, VARIATIONS):
            body = post_checked(client, spec, path, 400, data={"prompt": "x"}, files={"image": ("a", png(41, 40), "")})
            assert body["error"]["code"] == "image_too_large"
            body = post_checked(client, spec, path, 413, files={"image": ("a.png", png() + bytes(20_000), "")})
            assert body["error"]["code"] == "payload_too_large"
        body = post_checked(client, spec, EDITS, 413, json={"images": [{"image_url": data_url(png() + bytes(20_000))}]})
        assert body["error"]["code"] == "payload_too_large"


def test_live_edit_stream_conforms(settings: Settings, spec: dict[str, Any]) -> None:
    data = {"prompt": "a cat", "n": "2", "stream": "true", "partial_images": "2", "response_format": "url"}
    with TestClient(fake_app(settings)) as client:
        response = client.post(EDITS, data=data, files={"image[]": ("a.png", png(64, 64), "image/png")})
    check_response(spec, EDITS, "POST", response)
    events = sse_events(response.text)
    union = spec["paths"][EDITS]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    union = resolve(spec, union["$ref"])["properties"]["data"]["contentSchema"]
    for i, (_, event) in enumerate(events):
        errors = validate(event, union, spec, f"event[{i}]")
        assert not errors, "edit stream event drifted from openapi.yaml:\n" + "\n".join(errors)
    kinds = [event for event, _ in events]
    assert kinds.count("image_edit.partial_image") == 4 and kinds.count("image_edit.completed") == 2, kinds
    completed = [event for kind, event in events if kind == "image_edit.completed"]
    assert all(e["usage"]["input_tokens_details"]["image_tokens"] == image_tokens(64, 64) for e in completed)


def test_live_edit_stream_error_event_conforms(settings: Settings, spec: dict[str, Any]) -> None:
    request = {"prompt": "a cat", "stream": True, "partial_images": 1, "images": [{"image_url": data_url(png())}]}
    with TestClient(fake_app(settings, fail="after_partial")) as client:
        response = client.post(EDITS, json=request)
    check_response(spec, EDITS, "POST", response)
    events = sse_events(response.text)
    assert events and events[-1][0] == "error", f"the failed stream did not end with an error event: {events}"
    errors = validate(events[-1][1], {"$ref": "#/components/schemas/ImageEditStreamEvent"}, spec, "error event")
    assert not errors, "\n".join(errors)


def test_live_variation_answers_conform(settings: Settings, spec: dict[str, Any]) -> None:
    first, second = ("a.png", png(48, 32), "image/png"), ("b.png", png(), "image/png")
    with TestClient(fake_app(settings)) as client:
        body = post_checked(
            client, spec, VARIATIONS, 200, data={"n": "2", "seed": "7"}, files=[("image", first), ("image", second)]
        )
        assert len(body["data"]) == 2 and (body["quality"], body["background"]) == ("high", "opaque")
        assert body["usage"]["input_tokens_details"]["image_tokens"] == image_tokens(48, 32), "the first image is used"
        post_checked(client, spec, VARIATIONS, 200, data={"response_format": "url"}, files={"image[]": first})
        for kwargs, param in [
            ({"data": {"stream": "true"}, "files": {"image": first}}, "stream"),
            ({"files": {"other": ("x.txt", b"x", "text/plain")}}, "image"),
            ({"json": {"image": data_url(png())}}, None),
        ]:
            body = post_checked(client, spec, VARIATIONS, 400, **kwargs)
            assert body["error"]["param"] == param, (kwargs, body)
        post_checked(client, spec, VARIATIONS, 404, data={"model": "nope"}, files={"image": first})


def test_live_uploads_without_workers(app: Litestar, spec: dict[str, Any]) -> None:
    with TestClient(app) as client:
        for path, data in ((EDITS, {"prompt": "x"}), (VARIATIONS, {})):
            response = client.post(path, data=data, files={"image": ("a.png", png(), "image/png")})
            assert response.status_code == 503 and "retry-after" in response.headers, response.text
            check_response(spec, path, "POST", response)


# -- 6. authentication, limits and the admin API, live ------------------------------------------------------------

GEN = "/v1/images/generations"
KEYS = "/admin/keys"
KEY = "/admin/keys/{key_id}"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def secured_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with the admin key configured, so the gateway is not in anonymous mode."""
    return load_settings(environ={}, overrides={"data_dir": str(tmp_path), "admin_key": ADMIN_KEY, **overrides})


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def call_checked(
    client: TestClient,
    spec: dict[str, Any],
    method: str,
    path: str,
    status: int,
    template: str | None = None,
    **kw: Any,
) -> Any:
    """Send, assert the status, check the answer against the contract (at ``template``) and return its JSON body."""
    response = client.request(method, path, **kw)
    assert response.status_code == status, (method, path, kw.get("headers"), response.text[:300])
    return check_response(spec, template or path, method, response)


def refused(
    client: TestClient, spec: dict[str, Any], method: str, path: str, status: int, code: str, **kw: Any
) -> dict[str, Any]:
    """Like :func:`call_checked` for a refusal with ``code``; returns the error object."""
    body = call_checked(client, spec, method, path, status, **kw)
    assert body["error"]["code"] == code, body
    return body["error"]


def create_key(client: TestClient, spec: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return call_checked(client, spec, "POST", KEYS, 201, json={"alias": "test", **fields}, headers=ADMIN)


def test_live_refusals_conform(tmp_path: Path, spec: dict[str, Any]) -> None:
    upload = {"image": ("a.png", png(), "image/png")}
    with TestClient(fake_app(secured_settings(tmp_path))) as client:
        # Open routes need nothing, even with credentials configured.
        for path in ("/health", "/ready", "/metrics", "/openapi.yaml"):
            response = client.get(path)
            assert response.status_code == 200, (path, response.text[:200])
            if path != "/openapi.yaml":
                check_response(spec, path, "GET", response)

        # Every /v1 operation: no credential, an unknown one, a malformed header, the admin key where only virtual
        # keys go: 401 invalid_api_key with WWW-Authenticate.
        calls: list[tuple[str, str, str, dict[str, Any]]] = [
            ("GET", "/v1/models", "/v1/models", {}),
            ("GET", f"/v1/models/{DEMO_MODEL}", "/v1/models/{model_id}", {}),
            ("POST", GEN, GEN, {"json": {"prompt": "a cat"}}),
            ("POST", EDITS, EDITS, {"data": {"prompt": "a cat"}, "files": upload}),
            ("POST", VARIATIONS, VARIATIONS, {"files": upload}),
        ]
        for method, path, template, kw in calls:
            for headers in ({}, bearer("sk-ig-nope"), {"authorization": "Token x"}, {"x-bf-vk": ADMIN_KEY}):
                error = refused(
                    client, spec, method, path, 401, "invalid_api_key", template=template, **kw, headers=headers
                )
                assert error["type"] == "invalid_request_error"
            response = client.request(method, path, **kw)
            assert response.headers["www-authenticate"] == 'Bearer realm="imagegate"'
        # The admin key works as Bearer and as x-api-key.
        for headers in (ADMIN, {"x-api-key": ADMIN_KEY}):
            call_checked(client, spec, "GET", "/v1/models", 200, headers=headers)
            call_checked(client, spec, "POST", GEN, 200, json={"prompt": "a cat", "size": "64x64"}, headers=headers)
        refused(client, spec, "GET", KEYS, 401, "invalid_api_key")


def test_live_admin_api_conforms(tmp_path: Path, spec: dict[str, Any]) -> None:
    with TestClient(fake_app(secured_settings(tmp_path))) as client:
        created = create_key(client, spec, models=["imagegate-*"], rpm=60, image_quota=100, expires_at="2999-01-01")
        key, key_id = created["key"], created["id"]
        assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 43 and created["prefix"] == key[:10]
        assert (created["quota_period"], created["active"], created["revoked_at"]) == ("day", True, None)
        assert created["usage"] == created["period_usage"] == {"requests": 0, "images": 0, "pixel_steps": 0}
        path = f"{KEYS}/{key_id}"

        # The secret is shown once: KeyView and KeyList are closed schemas without `key`.
        listed = call_checked(client, spec, "GET", KEYS, 200, headers=ADMIN)
        assert [k["id"] for k in listed["data"]] == [key_id] and listed["object"] == "list"
        call_checked(client, spec, "GET", path, 200, template=KEY, headers=ADMIN)

        # The key works in each of its three headers.
        for headers in (bearer(key), {"x-api-key": key}, {"x-bf-vk": key}):
            call_checked(client, spec, "GET", "/v1/models", 200, headers=headers)
        call_checked(client, spec, "POST", GEN, 200, json={"prompt": "a cat", "size": "64x64"}, headers=bearer(key))
        for _ in range(100):  # usage rows are written just after the answer
            shown = call_checked(client, spec, "GET", path, 200, template=KEY, headers=ADMIN)
            if shown["usage"]["images"]:
                break
            time.sleep(0.02)
        assert shown["usage"]["requests"] == shown["usage"]["images"] == 1, shown["usage"]
        assert shown["period_usage"] == shown["usage"] and shown["usage"]["pixel_steps"] > 0

        # A virtual key is never an admin, in whichever header.
        for headers in (bearer(key), {"x-api-key": key}, {"x-bf-vk": key}):
            error = refused(client, spec, "GET", KEYS, 403, "admin_required", headers=headers)
            assert error["type"] == "permission_error"

        # Update: only the fields present; null clears a limit.
        updated = call_checked(
            client, spec, "PATCH", path, 200, template=KEY, json={"rpm": None, "alias": "renamed"}, headers=ADMIN
        )
        assert (updated["rpm"], updated["alias"], updated["image_quota"]) == (None, "renamed", 100)
        for bad in ({"expires_at": "tomorrow"}, {"rpm": -1}, {"quota_period": "week"}):
            body = call_checked(client, spec, "PATCH", path, 400, template=KEY, json=bad, headers=ADMIN)
            assert body["error"]["param"] == next(iter(bad)), body
        for bad, param in (
            ({"alias": "x", "expires_at": "tomorrow"}, "expires_at"),
            ({"alias": ""}, "alias"),
            ({"models": ["*"]}, "alias"),
            ({"alias": "x", "image_quota": "many"}, "image_quota"),
        ):
            body = call_checked(client, spec, "POST", KEYS, 400, json=bad, headers=ADMIN)
            assert body["error"]["param"] == param, body

        # Revoke: 401 for the key; PATCH active=true brings it back.
        revoked = call_checked(client, spec, "POST", f"{path}/revoke", 200, template=f"{KEY}/revoke", headers=ADMIN)
        assert revoked["active"] is False and revoked["revoked_at"] is not None
        error = refused(client, spec, "GET", "/v1/models", 401, "invalid_api_key", headers=bearer(key))
        assert "revoked" in error["message"]
        restored = call_checked(client, spec, "PATCH", path, 200, template=KEY, json={"active": True}, headers=ADMIN)
        assert restored["active"] is True and restored["revoked_at"] is None
        call_checked(client, spec, "GET", "/v1/models", 200, headers=bearer(key))

        # An expired key is a 401 too.
        call_checked(
            client, spec, "PATCH", path, 200, template=KEY, json={"expires_at": "2000-01-01T00:00:00Z"}, headers=ADMIN
        )
        error = refused(client, spec, "GET", "/v1/models", 401, "invalid_api_key", headers=bearer(key))
        assert "expired" in error["message"]

        # Delete: 204 without a body, then 404 key_not_found everywhere.
        call_checked(client, spec, "DELETE", path, 204, template=KEY, headers=ADMIN)
        refused(client, spec, "GET", "/v1/models", 401, "invalid_api_key", headers=bearer(key))
        for method, template in (("GET", KEY), ("PATCH", KEY), ("DELETE", KEY), ("POST", f"{KEY}/revoke")):
            kw: dict[str, Any] = {"json": {"rpm": 1}} if method == "PATCH" else {}
            url = template.replace("{key_id}", key_id)
            error = refused(client, spec, method, url, 404, "key_not_found", template=template, headers=ADMIN, **kw)
            assert error["param"] == "key_id"


def test_live_limits_conform(tmp_path: Path, spec: dict[str, Any]) -> None:
    cat = {"prompt": "a cat", "size": "64x64"}
    upload = {"image": ("a.png", png(), "image/png")}
    with TestClient(fake_app(secured_settings(tmp_path))) as client:
        # models: fnmatch patterns, an empty list allows no model.
        for models in (["other-*"], []):
            headers = bearer(create_key(client, spec, models=models)["key"])
            error = refused(client, spec, "POST", GEN, 403, "model_not_allowed", json=cat, headers=headers)
            assert (error["type"], error["param"]) == ("permission_error", "model")
            refused(client, spec, "POST", EDITS, 403, "model_not_allowed", data=cat, files=upload, headers=headers)
            call_checked(client, spec, "GET", "/v1/models", 200, headers=headers)  # the list is not limited
        call_checked(
            client,
            spec,
            "POST",
            GEN,
            200,
            json=cat,
            headers=bearer(create_key(client, spec, models=["imagegate-?emo"])["key"]),
        )

        # rpm and max_concurrent: rate_limit_exceeded, with Retry-After and without x-should-retry.
        headers = bearer(create_key(client, spec, rpm=1)["key"])
        call_checked(client, spec, "POST", GEN, 200, json=cat, headers=headers)
        response = client.post(GEN, json={**cat, "stream": True}, headers=headers)
        assert response.status_code == 429 and "x-should-retry" not in response.headers, response.text
        body = check_response(spec, GEN, "POST", response)
        assert (body["error"]["type"], body["error"]["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        headers = bearer(create_key(client, spec, max_concurrent=0)["key"])
        refused(client, spec, "POST", EDITS, 429, "rate_limit_exceeded", data=cat, files=upload, headers=headers)

        # image_quota: insufficient_quota, with Retry-After until the period ends and x-should-retry: false.
        headers = bearer(create_key(client, spec, image_quota=1, quota_period="month")["key"])
        response = client.post(GEN, json={**cat, "n": 2}, headers=headers)
        assert response.status_code == 429 and response.headers.get("x-should-retry") == "false", response.text
        body = check_response(spec, GEN, "POST", response)
        assert (body["error"]["type"], body["error"]["code"]) == ("insufficient_quota", "insufficient_quota")
        assert int(response.headers["retry-after"]) >= 1
        call_checked(client, spec, "POST", GEN, 200, json=cat, headers=headers)


def test_live_variation_limits_conform(tmp_path: Path, spec: dict[str, Any]) -> None:
    with TestClient(fake_app(secured_settings(tmp_path))) as client:
        headers = bearer(create_key(client, spec, models=[])["key"])
        files = {"image": ("a.png", png(), "image/png")}
        refused(client, spec, "POST", VARIATIONS, 403, "model_not_allowed", files=files, headers=headers)


def test_live_users_static_keys_and_metrics_conform(tmp_path: Path, spec: dict[str, Any]) -> None:
    settings = load_settings(
        environ={},
        overrides={
            "data_dir": str(tmp_path),
            "metrics_auth": "admin",
            "users": [
                {"name": "alice", "password_hash": hash_password("alice-pw"), "role": "admin"},
                {"name": "bob", "password_hash": hash_password("bob-pw"), "models": []},
            ],
            "api_keys": [{"id": "ci", "key_sha256": hashlib.sha256(b"sk-static").hexdigest()}],
        },
    )
    with TestClient(fake_app(settings)) as client:
        alice, bob = basic("alice", "alice-pw"), basic("bob", "bob-pw")
        # /metrics with metrics_auth = admin: 401 without a credential, 403 for a non-admin, 200 for an admin.
        refused(client, spec, "GET", "/metrics", 401, "invalid_api_key")
        for headers in (bob, bearer("sk-static")):
            refused(client, spec, "GET", "/metrics", 403, "admin_required", headers=headers)
        call_checked(client, spec, "GET", "/metrics", 200, headers=alice)

        # Basic: the users, with their roles and limits; a bad password says Basic in WWW-Authenticate.
        call_checked(client, spec, "GET", KEYS, 200, headers=alice)
        refused(client, spec, "GET", KEYS, 403, "admin_required", headers=bob)
        refused(client, spec, "POST", GEN, 403, "model_not_allowed", json={"prompt": "x"}, headers=bob)
        for headers in (basic("alice", "wrong"), basic("carol", "x"), {"authorization": "Basic !!!"}):
            refused(client, spec, "GET", "/v1/models", 401, "invalid_api_key", headers=headers)
            response = client.get("/v1/models", headers=headers)
            assert response.headers["www-authenticate"] == 'Basic realm="imagegate"'

        # A static key: Bearer and x-api-key, not x-bf-vk (virtual keys only).
        for headers in (bearer("sk-static"), {"x-api-key": "sk-static"}):
            call_checked(client, spec, "POST", GEN, 200, json={"prompt": "a cat", "size": "64x64"}, headers=headers)
        refused(client, spec, "GET", "/v1/models", 401, "invalid_api_key", headers={"x-bf-vk": "sk-static"})


def test_live_anonymous_mode_conforms(app: Litestar, spec: dict[str, Any]) -> None:
    """No credential configured: everything is open, the admin API included, until the first key exists."""
    with TestClient(app) as client:
        call_checked(client, spec, "GET", "/v1/models", 200)
        call_checked(client, spec, "GET", KEYS, 200)
        key = create_key(client, spec)["key"]
        refused(client, spec, "GET", "/v1/models", 401, "invalid_api_key")
        refused(client, spec, "GET", KEYS, 401, "invalid_api_key")
        call_checked(client, spec, "GET", "/v1/models", 200, headers=bearer(key))


# -- 7. asynchronous jobs and webhook secrets, live ---------------------------------------------------------------

JOBS = "/v1/jobs"
JOB = "/v1/jobs/{job_id}"
ASYNC = {"prefer": "respond-async"}


def ended(client: TestClient, url: str, headers: dict[str, str] | None = None) -> Any:
    """Poll ``url`` (a job or a result) until its job has ended; returns the last response."""
    for _ in range(500):
        response = client.get(url, headers=headers)
        if response.json().get("status") not in ("queued", "running"):
            return response
        time.sleep(0.01)
    raise AssertionError(f"the job at {url} did not end: {response.text}")


def test_live_jobs_conform(settings: Settings, spec: dict[str, Any]) -> None:
    cat = {"prompt": "a cat", "size": "64x64", "partial_images": 1, "num_inference_steps": 4}
    upload = {"image": ("a.png", png(64, 64), "image/png")}
    with TestClient(fake_app(settings)) as client:
        # Prefer: respond-async makes each image route answer 202 with the job and its Location.
        response = client.post(GEN, json=cat, headers={**ASYNC, "idempotency-key": "k1"})
        assert response.status_code == 202, response.text
        job = check_response(spec, GEN, "POST", response)
        assert response.headers["location"] == job["urls"]["get"] and job["status"] == "queued"
        # The same key and request: the same job (200); with another request: 409.
        again = post_checked(client, spec, GEN, 200, json=cat, headers={**ASYNC, "idempotency-key": "k1"})
        assert again["id"] == job["id"]
        body = post_checked(client, spec, GEN, 409, json={**cat, "n": 2}, headers={**ASYNC, "idempotency-key": "k1"})
        assert body["error"]["code"] == "idempotency_key_reused"
        body = post_checked(client, spec, GEN, 400, json={**cat, "webhook_url": "https://example.com/hook"})
        assert body["error"]["param"] == "webhook_url"
        edit = post_checked(
            client,
            spec,
            EDITS,
            202,
            data={"prompt": "a cat", "webhook_events": "completed"},
            files=upload,
            headers=ASYNC,
        )
        variation = post_checked(client, spec, VARIATIONS, 202, files=upload, headers=ASYNC)
        assert (edit["kind"], variation["kind"]) == ("image.edit", "image.variation")

        # The job, its image file, its list, its events.
        path = f"{JOBS}/{job['id']}"
        done = check_response(spec, JOB, "GET", ended(client, path))
        assert done["status"] == "succeeded" and done["progress"]["percent"] == 100
        url = done["result"]["data"][0]["url"]
        check_response(spec, "/files/jobs/{name}", "GET", client.get(url))
        check_response(spec, "/files/jobs/{name}", "GET", client.get(url.split("?")[0]))
        ended(client, f"{JOBS}/{edit['id']}")
        ended(client, f"{JOBS}/{variation['id']}")
        page = call_checked(client, spec, "GET", f"{JOBS}?limit=2", 200, template=JOBS)
        assert len(page["data"]) == 2 and page["has_more"]
        rest = call_checked(client, spec, "GET", f"{JOBS}?after={page['last_id']}&status=succeeded", 200, template=JOBS)
        assert [j["id"] for j in page["data"] + rest["data"]] == [variation["id"], edit["id"], job["id"]]
        for query, status in (("limit=0", 400), ("status=done", 400), ("after=job_nope", 404)):
            call_checked(client, spec, "GET", f"{JOBS}?{query}", status, template=JOBS)

        response = client.get(f"{path}/events")
        check_response(spec, f"{JOB}/events", "GET", response)
        events = sse_events(response.text)
        schema = {"$ref": "#/components/schemas/JobEvent"}
        for i, (_, event) in enumerate(events):
            errors = validate(event, schema, spec, f"event[{i}]")
            assert not errors, "job event drifted from openapi.yaml:\n" + "\n".join(errors)
        kinds = [kind for kind, _ in events]
        assert kinds[0] == "image.job.queued" and kinds[-1] == "image.job.succeeded", kinds
        assert {"image.job.started", "image.job.progress", "image.job.partial_image"} <= set(kinds), kinds

        # Cancel a finished job: 409; delete: 200, then 404 everywhere.
        body = call_checked(client, spec, "POST", f"{path}/cancel", 409, template=f"{JOB}/cancel")
        assert body["error"]["code"] == "job_finished"
        call_checked(client, spec, "DELETE", path, 200, template=JOB)
        for method, template in (("GET", JOB), ("DELETE", JOB), ("GET", f"{JOB}/events"), ("POST", f"{JOB}/cancel")):
            url = template.replace("{job_id}", job["id"])
            refused(client, spec, method, url, 404, "job_not_found", template=template)

        # Webhook secrets: the caller's and the server's, each shown once.
        first = call_checked(client, spec, "POST", "/v1/webhooks/secret", 201)
        second = call_checked(client, spec, "POST", "/v1/webhooks/secret", 201)
        assert first["previous_valid_until"] is None and second["previous_valid_until"] is not None
        server = call_checked(client, spec, "POST", "/admin/webhooks/secret", 201)
        assert server["owner"] == "server"


def test_live_job_cancel_conforms(settings: Settings, spec: dict[str, Any]) -> None:
    with TestClient(fake_app(settings, fail="hang")) as client:
        job = post_checked(client, spec, GEN, 202, json={"prompt": "a cat", "size": "64x64"}, headers=ASYNC)
        path = f"{JOBS}/{job['id']}"
        for _ in range(500):
            if client.get(path).json()["status"] == "running":
                break
            time.sleep(0.01)
        body = call_checked(client, spec, "POST", f"{path}/cancel", 200, template=f"{JOB}/cancel")
        assert body["status"] == "cancelled" and body["error"]["code"] == "cancelled"


# -- 8. the custom-models inference API, live ---------------------------------------------------------------------

INFER = "/infer_api/v1"
PROJECT_MODEL = f"{INFER}/projects/{{container_name}}/models/{{model_name}}"
RESULT = f"{INFER}/generations/{{job_id}}/result"
BROKEN = "broken-model"


def infer_app(tmp_path: Path) -> Litestar:
    """Two models: the demo model in project `studio` with a sample image, and one whose jobs fail (`default`)."""
    sample = tmp_path / "sample.png"
    sample.write_bytes(png(48, 32))
    keys = [
        {"id": "alice", "key_sha256": hashlib.sha256(b"sk-alice").hexdigest()},
        {"id": "root", "key_sha256": hashlib.sha256(b"sk-root").hexdigest(), "admin": True},
    ]
    models = [
        {
            "name": DEMO_MODEL,
            "path": str(tmp_path / "demo"),
            "project": "studio",
            "default_size": "256x256",
            "size_multiple": 16,
            "sample_images": [str(sample), str(tmp_path / "missing.png")],
            "trigger_words": ["ohwx"],
            "style": "watercolor",
        },
        {"name": BROKEN, "path": str(tmp_path / "broken")},
    ]
    settings = secured_settings(tmp_path, api_keys=keys, models=models)
    backends = [
        (FakeBackend(models=[DEMO_MODEL], step_delay=0.02), [DEMO_MODEL]),
        (FakeBackend(name="broken", models=[BROKEN], fail="invalid"), [BROKEN]),
    ]
    return create_app(settings, backends=backends)


def test_live_infer_answers_conform(tmp_path: Path, spec: dict[str, Any]) -> None:
    alice, root = bearer("sk-alice"), bearer("sk-root")
    with TestClient(infer_app(tmp_path)) as client:

        def get(path: str, status: int, template: str | None = None, headers: dict[str, str] = alice) -> Any:
            return call_checked(client, spec, "GET", path, status, template, headers=headers)

        table = get(f"{INFER}/aspect_ratios", 200)
        assert table["model"] == DEMO_MODEL and table["data"][0] == {"aspect_ratio": "1:1", "width": 256, "height": 256}
        get(f"{INFER}/aspect_ratios?model={BROKEN}", 200, f"{INFER}/aspect_ratios")
        refused(
            client,
            spec,
            "GET",
            f"{INFER}/aspect_ratios?model=nope",
            404,
            "model_not_found",
            template=f"{INFER}/aspect_ratios",
            headers=alice,
        )
        dims = f"{INFER}/output_image_dimensions/{{aspect_ratio}}"
        for ratio in ("16%3A9", "16:9", "16x9", "16-9"):
            assert get(f"{INFER}/output_image_dimensions/{ratio}", 200, dims)["aspect_ratio"] == "16:9"
        error = refused(
            client,
            spec,
            "GET",
            f"{INFER}/output_image_dimensions/7:5",
            404,
            "unknown_aspect_ratio",
            template=dims,
            headers=alice,
        )
        assert "16:9" in error["message"]

        projects = get(f"{INFER}/projects", 200)["data"]
        assert projects == [{"name": "studio", "model_count": 1}, {"name": "default", "model_count": 1}]
        models = f"{INFER}/projects/{{container_name}}/models"
        assert [m["name"] for m in get(f"{INFER}/projects/studio/models", 200, models)["data"]] == [DEMO_MODEL]
        refused(
            client,
            spec,
            "GET",
            f"{INFER}/projects/nope/models",
            404,
            "project_not_found",
            template=models,
            headers=alice,
        )
        model = f"{INFER}/projects/studio/models/{DEMO_MODEL}"
        config = get(f"{model}/config", 200, f"{PROJECT_MODEL}/config")
        assert config["trigger_words"] == ["ohwx"] and len(config["aspect_ratios"]) == 11
        refused(
            client,
            spec,
            "GET",
            f"{INFER}/projects/studio/models/{BROKEN}/config",
            404,
            "model_not_found",
            template=f"{PROJECT_MODEL}/config",
            headers=alice,
        )
        samples = get(f"{model}/images", 200, f"{PROJECT_MODEL}/images")["data"]
        assert [(s["index"], s["width"], s["height"]) for s in samples] == [(0, 48, 32)], (
            "unreadable files are left out"
        )
        get(samples[0]["url"], 200, f"{PROJECT_MODEL}/images/{{index}}")
        get(f"{model}/images/1", 404, f"{PROJECT_MODEL}/images/{{index}}")

        # A generation: 202 with Location, its result 202 then 200, its images downloadable.
        gen = f"{INFER}/generations"
        body = {"project": "studio", "model": DEMO_MODEL, "prompt": "a cat", "aspect_ratio": "16:9", "steps": 5}
        response = client.post(gen, json=body, headers=alice)
        assert response.status_code == 202, response.text
        job = check_response(spec, gen, "POST", response)
        assert response.headers["location"] == job["result_url"] and job["status"] == "queued"
        result = get(job["result_url"], 202, RESULT)
        assert result["status"] in ("queued", "running")
        result = check_response(spec, RESULT, "GET", ended(client, job["result_url"], alice))
        assert result["status"] == "completed" and result["size"] == "336x192" and len(result["images"]) == 1
        check_response(spec, "/files/jobs/{name}", "GET", client.get(result["images"][0]["url"]))
        failed = post_checked(client, spec, gen, 202, json={"model": BROKEN, "prompt": "x"}, headers=alice)
        result = check_response(spec, RESULT, "GET", ended(client, failed["result_url"], alice))
        assert result["status"] == "failed" and result["error"]["code"] == "invalid_request"
        for bad, status in (
            ({**body, "aspect_ratio": "7:5"}, 400),
            ({**body, "size": "64x64"}, 400),
            ({**body, "width": 64}, 400),
            ({**body, "steps": 1000}, 400),
            ({"model": DEMO_MODEL, "prompt": "x"}, 404),
            ({**body, "model": "nope"}, 404),
        ):
            post_checked(client, spec, gen, status, json=bad, headers=alice)
        refused(
            client,
            spec,
            "GET",
            RESULT.replace("{job_id}", "job_nope"),
            404,
            "job_not_found",
            template=RESULT,
            headers=alice,
        )

        enhance = f"{INFER}/projects/{{project_name}}/models/{{model_name}}/enhance-prompt"
        url = f"{INFER}/projects/studio/models/{DEMO_MODEL}/enhance-prompt"
        out = call_checked(client, spec, "POST", url, 200, enhance, json={"prompt": "a cat"}, headers=alice)
        assert out["method"] == "template" and "ohwx" in out["enhanced_prompt"]
        call_checked(client, spec, "POST", url, 400, enhance, json={"prompt": " "}, headers=alice)

        # The job lists, then deletion.
        jobs = get(f"{INFER}/jobs?limit=1", 200, f"{INFER}/jobs")
        assert jobs["has_more"] and jobs["data"][0]["job_id"] == failed["job_id"]
        assert [j["job_id"] for j in get(f"{INFER}/jobs/completed", 200)["data"]] == [job["job_id"]]
        assert [j["job_id"] for j in get(f"{INFER}/jobs/failed", 200)["data"]] == [failed["job_id"]]
        get(f"{INFER}/jobs?limit=101", 400, f"{INFER}/jobs")
        get(f"{INFER}/jobs?after=job_nope", 404, f"{INFER}/jobs")
        one = f"{INFER}/jobs/{{job_id}}"
        call_checked(client, spec, "DELETE", f"{INFER}/jobs/{job['job_id']}", 200, one, headers=alice)
        refused(
            client, spec, "DELETE", f"{INFER}/jobs/{job['job_id']}", 404, "job_not_found", template=one, headers=alice
        )
        assert call_checked(client, spec, "DELETE", f"{INFER}/jobs", 200, headers=alice)["deleted"] == 1

        # The admin-only route.
        refused(client, spec, "GET", f"{INFER}/secure-route", 401, "invalid_api_key")
        refused(client, spec, "GET", f"{INFER}/secure-route", 403, "admin_required", headers=alice)
        assert get(f"{INFER}/secure-route", 200, headers=root)["principal"] == "root"
        refused(client, spec, "GET", f"{INFER}/projects", 401, "invalid_api_key")


# -- 9. the custom-models API, live -------------------------------------------------------------------------------

CM = "/custom-models/v1"
CM_MODELS = f"{CM}/models"
CM_MODEL = f"{CM_MODELS}/{{model_id}}"
CM_DATA = f"{CM_MODEL}/data"
CM_IMAGE = f"{CM_DATA}/{{data_id}}"
CM_TRAININGS = f"{CM_MODEL}/trainings"
CM_TRAINING = f"{CM_TRAININGS}/{{training_id}}"
CM_PREDICTIONS = f"{CM}/predictions"
CM_PREDICTION = f"{CM_PREDICTIONS}/{{prediction_id}}"


def rotated_jpeg(width: int, height: int) -> bytes:
    """A JPEG of ``width`` x ``height`` pixels whose EXIF orientation (6) says to turn it a quarter clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def test_live_custom_models_conform(tmp_path: Path, spec: dict[str, Any]) -> None:
    keys = [
        {"id": "alice", "key_sha256": hashlib.sha256(b"sk-alice").hexdigest()},
        {"id": "bob", "key_sha256": hashlib.sha256(b"sk-bob").hexdigest()},
    ]
    alice, bob = bearer("sk-alice"), bearer("sk-bob")
    with TestClient(fake_app(secured_settings(tmp_path, api_keys=keys))) as client:

        def call(method: str, template: str, status: int, headers: dict[str, str] = alice, **kw: Any) -> Any:
            ids = {k: v for k, v in kw.items() if k.endswith("_id")}
            rest = {k: v for k, v in kw.items() if k not in ids}
            path = template.format(**ids)
            if query := rest.pop("query", ""):
                path = f"{path}?{query}"
            return call_checked(client, spec, method, path, status, template, headers=headers, **rest)

        def upload(status: int, image: bytes, caption: str | None = None, data_id: str | None = None) -> Any:
            query = f"caption={caption}" if caption is not None else ""
            kw = {"content": image, "headers": {**alice, "content-type": "image/png"}}
            if data_id is None:
                return call("POST", CM_DATA, status, model_id=model_id, query=query, **kw)
            return call("PUT", CM_IMAGE, status, model_id=model_id, data_id=data_id, query=query, **kw)

        # Models: create, get, list (paged), rename; another key's model does not exist for it.
        model = call("POST", CM_MODELS, 201, json={"displayName": "Acme sneakers"})
        model_id = model["id"]
        assert (model["baseModel"], model["imageCount"], model["latestTrainingId"]) == (DEMO_MODEL, 0, None)
        other = call("POST", CM_MODELS, 201, json={"displayName": "other", "customModelType": "style"})
        assert call("GET", CM_MODEL, 200, model_id=model_id) == model
        page = call("GET", CM_MODELS, 200, query="limit=1")
        assert [m["id"] for m in page["data"]] == [other["id"]] and page["nextCursor"] == other["id"]
        page = call("GET", CM_MODELS, 200, query=f"limit=1&cursor={other['id']}")
        assert [m["id"] for m in page["data"]] == [model_id]
        assert call("GET", CM_MODELS, 200, headers=bob)["data"] == []
        renamed = call("PATCH", CM_MODEL, 200, model_id=model_id, json={"updatedDisplayName": "Acme 2026"})
        assert renamed["displayName"] == "Acme 2026"
        for status, kw in (
            (400, {"json": {"displayName": ""}}),
            (400, {"json": {"displayName": "x", "color": "red"}}),
            (400, {"query": "limit=0"}),
            (400, {"query": "limit=101"}),
            (404, {"query": "cursor=cm_nope"}),
        ):
            call("POST" if "json" in kw else "GET", CM_MODELS, status, **kw)
        call("PATCH", CM_MODEL, 400, model_id=model_id, json={"updatedDisplayName": "x" * 201})
        call("GET", CM_MODEL, 404, headers=bob, model_id=model_id)
        refused(client, spec, "GET", CM_MODELS, 401, "invalid_api_key")

        # Training images: upload three, list them, get one with its bytes, replace one, delete one.
        ids = [upload(201, png(48, 32), caption="white sneaker")["dataId"] for _ in range(3)]
        images = call("GET", CM_DATA, 200, model_id=model_id)
        assert [i["dataId"] for i in images] == ids and all("dataUrl" not in i for i in images)
        assert (images[0]["format"], images[0]["width"], images[0]["caption"]) == ("png", 48, "white sneaker")
        one = call("GET", CM_IMAGE, 200, model_id=model_id, data_id=ids[0])
        assert one["dataUrl"].startswith("data:image/png;base64,")
        assert upload(200, png(64, 64), data_id=ids[0]) == {"dataId": ids[0]}
        replaced = call("GET", CM_IMAGE, 200, model_id=model_id, data_id=ids[0])
        assert (replaced["width"], replaced["caption"]) == (64, "white sneaker"), "no caption keeps the old one"
        assert call("DELETE", CM_IMAGE, 200, model_id=model_id, data_id=ids[2]) == {"id": ids[2], "deleted": True}
        call("GET", CM_IMAGE, 404, model_id=model_id, data_id=ids[2])
        # Checked on upload: other formats, corrupt images, an empty body, oversize ones, long captions; EXIF.
        for body, code in (
            (b"GIF89a" + bytes(64), "invalid_image_format"),
            (png()[:40], "invalid_image_format"),
            (b"", None),
            (bytes(MAX_IMAGE_BYTES + 1), "image_too_large"),
        ):
            error = upload(400, body)["error"]
            assert (error["param"], error["code"]) == ("file", code), error
        assert upload(400, png(), caption="x" * 1001)["error"]["param"] == "caption"
        assert upload(413, bytes(MAX_IMAGE_BYTES + (2 << 20)))["error"]["code"] == "payload_too_large"
        upright = call("GET", CM_IMAGE, 200, model_id=model_id, data_id=upload(201, rotated_jpeg(40, 20))["dataId"])
        assert (upright["format"], upright["width"], upright["height"]) == ("jpeg", 20, 40), upright
        call("DELETE", CM_IMAGE, 200, model_id=model_id, data_id=upright["dataId"])

        # Trainings: too few images, then a training (it stays `processing`: no fake worker trains), cancelled.
        error = call("POST", CM_TRAININGS, 400, model_id=model_id)["error"]
        assert (error["param"], error["code"]) == ("modelId", "not_enough_images")
        upload(201, png())
        call("POST", CM_TRAININGS, 400, model_id=model_id, json={"trainingSpeed": "slow"})
        call("POST", CM_TRAININGS, 400, model_id=model_id, json={"trainingStrength": 11})
        started = call("POST", CM_TRAININGS, 201, model_id=model_id, json={"trainingSpeed": "high_quality"})
        training_id = started["trainingId"]
        assert started["status"] == "processing" and re.fullmatch(r"[A-Z]{3}\d{2}[A-Z]{2}", started["triggerWord"])
        assert started["hyperparameters"]["rank"] == 16 and started["hyperparameters"]["steps"] == 500
        training = call("GET", CM_TRAINING, 200, model_id=model_id, training_id=training_id)
        assert (training["status"], training["imageCount"], training["progress"]) == ("processing", 3, None)
        assert call("GET", CM_TRAININGS, 200, model_id=model_id) == [{"id": training_id, "status": "processing"}]
        cancelled = call("POST", f"{CM_TRAINING}/cancel", 200, model_id=model_id, training_id=training_id)
        assert cancelled["status"] == "canceled" and cancelled["error"]["code"] == "cancelled"
        assert cancelled["completedAt"] is not None
        call("POST", f"{CM_TRAINING}/cancel", 409, model_id=model_id, training_id=training_id)
        second = call("POST", CM_TRAININGS, 201, model_id=model_id)["trainingId"]  # no body: the defaults
        assert call("GET", CM_TRAINING, 200, model_id=model_id, training_id=second)["trainingSpeed"] == "fast"
        call("DELETE", CM_TRAINING, 200, model_id=model_id, training_id=second)
        call("GET", CM_TRAINING, 404, model_id=model_id, training_id=second)
        assert [t["id"] for t in call("GET", CM_TRAININGS, 200, model_id=model_id)] == [training_id]

        # Predictions: an unknown model, a model without a successful training, bad keys and fields.
        for configs, param, code in (
            ({"1": {"modelId": "cm_nope"}}, "scaleConfigs.1.modelId", "model_not_found"),
            ({"1": {"modelId": model_id}}, "scaleConfigs.1.modelId", "training_not_ready"),
            ({"first": {"modelId": model_id}}, "scaleConfigs", "invalid_key"),
        ):
            error = call("POST", CM_PREDICTIONS, 400, json={"scaleConfigs": configs, "prompt": "x"})["error"]
            assert (error["param"], error["code"]) == (param, code), error
        for bad in (
            {"scaleConfigs": {}, "prompt": "x"},
            {"scaleConfigs": {"1": {"modelId": model_id, "scale": 3}}, "prompt": "x"},
            {"scaleConfigs": {"1": {"modelId": model_id}}, "prompt": "x", "image_size": {"width": 64, "height": 64}},
        ):
            call("POST", CM_PREDICTIONS, 400, json=bad)
        call("GET", CM_PREDICTION, 404, prediction_id="pred_nope")
        call("DELETE", CM_PREDICTION, 404, prediction_id="pred_nope")

        # Deleting the model: 200 Deleted, then 404 for it and everything under it.
        assert call("DELETE", CM_MODEL, 200, model_id=model_id) == {"id": model_id, "deleted": True}
        error = call("GET", CM_MODEL, 404, model_id=model_id)["error"]
        assert (error["param"], error["code"]) == ("modelId", "model_not_found")
        call("GET", CM_DATA, 404, model_id=model_id)
        call("GET", CM_TRAINING, 404, model_id=model_id, training_id=training_id)
        call("DELETE", CM_MODEL, 404, model_id=model_id)


# -- 10. the Hugging Face dialect, live ---------------------------------------------------------------------------

HF_TASK = "/hf/models/{model_id}"
HF_HANDLER = "/hf/endpoints/{model_id}"
HF_PREDICT = f"{HF_HANDLER}/predict"
HF_HEALTH = f"{HF_HANDLER}/health"


def hf_error(client: TestClient, spec: dict[str, Any], path: str, status: int, template: str, **kw: Any) -> str:
    """POST to an ``/hf/`` route, assert an ``HFError`` with ``status`` that conforms; returns its message."""
    body = call_checked(client, spec, "POST", path, status, template, **kw)
    assert set(body) == {"error"} and body["error"], body
    return body["error"]


def test_live_hf_dialect_conforms(tmp_path: Path, spec: dict[str, Any]) -> None:
    keys = [{"id": "alice", "key_sha256": hashlib.sha256(b"sk-alice").hexdigest()}]
    alice = bearer("sk-alice")
    task, handler = HF_TASK.format(model_id=DEMO_MODEL), HF_HANDLER.format(model_id=DEMO_MODEL)
    with TestClient(fake_app(secured_settings(tmp_path, api_keys=keys))) as client:

        def image(response: Any, template: str, media: str, size: tuple[int, int] = (64, 64)) -> None:
            assert response.status_code == 200, response.text[:300]
            check_response(spec, template, "POST", response)
            assert response.headers["content-type"] == media
            decoded = Image.open(io.BytesIO(response.content))
            assert (f"image/{decoded.format.lower()}", decoded.size) == (media, size)

        # The task: the Accept header's first image type; JPEG for */*, image/* or none; numbers as strings.
        body = {"inputs": "a cat", "parameters": {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}}
        for accept, media in (
            ("image/png", "image/png"),
            ("text/html, image/webp;q=0.9, image/png", "image/webp"),
            ("*/*", "image/jpeg"),
            ("image/*", "image/jpeg"),
            (None, "image/jpeg"),
        ):
            headers = alice if accept is None else {**alice, "accept": accept}
            image(client.post(task, json=body, headers=headers), HF_TASK, media)
        lenient = {"inputs": "a cat", "parameters": {"target_size": {"width": "64", "height": "80"}, "seed": "7"}}
        image(client.post(task, json=lenient, headers={**alice, "accept": "image/png"}), HF_TASK, "image/png", (64, 80))

        # The handler: {"image": base64 JPEG}, or the bytes when Accept names an image type; at .../predict too.
        flat = {"inputs": "a cat", "negative_prompt": "blur", "height": 64, "width": 64, "inference_steps": "2"}
        for path in (handler, HF_PREDICT.format(model_id=DEMO_MODEL)):
            template = HF_HANDLER if path == handler else HF_PREDICT
            answer = call_checked(client, spec, "POST", path, 200, template, json=flat, headers=alice)
            decoded = Image.open(io.BytesIO(base64.b64decode(answer["image"], validate=True)))
            assert (decoded.format, decoded.size) == ("JPEG", (64, 64))
            image(client.post(path, json=flat, headers={**alice, "accept": "image/png"}), template, "image/png")
        nested = {"inputs": "a cat", "parameters": {"width": 64, "height": 64, "num_inference_steps": 2}}
        image(client.post(handler, json=nested, headers={**alice, "accept": "image/webp"}), HF_HANDLER, "image/webp")
        response = client.get(HF_HEALTH.format(model_id=DEMO_MODEL), headers=alice)
        assert response.status_code == 200 and response.text == "Ok", response.text
        check_response(spec, HF_HEALTH, "GET", response)

        # Errors, in the {"error"} envelope: no inputs, a bad value, not JSON, an unknown model (ids may have a /).
        one_side = {"inputs": "x", "parameters": {"width": 64}}
        for path, template, bad in ((task, HF_TASK, one_side), (handler, HF_HANDLER, {"inputs": "x", "width": 64})):
            message = hf_error(client, spec, path, 400, template, json={"parameters": {}}, headers=alice)
            assert message == 'Body needs to provide a inputs key, received: {"parameters":{}}', message
            hf_error(client, spec, path, 400, template, json=bad, headers=alice)
        hf_error(client, spec, task, 400, HF_TASK, content=b"inputs=x", headers=alice)
        hf_error(client, spec, task, 400, HF_TASK, json={**body, "parameters": {"seed": -1}}, headers=alice)
        assert "'acme/sdxl'" in hf_error(
            client, spec, HF_TASK.format(model_id="acme/sdxl"), 404, HF_TASK, json={"inputs": "x"}, headers=alice
        )
        hf_error(client, spec, HF_HANDLER.format(model_id="nope"), 404, HF_HANDLER, json=flat, headers=alice)
        hf_error(client, spec, HF_PREDICT.format(model_id="nope"), 404, HF_PREDICT, json=flat, headers=alice)
        too_large = b"x" * (secured_settings(tmp_path).max_body_size + 1)
        hf_error(client, spec, task, 413, HF_TASK, content=too_large, headers=alice)

        # No credential, a wrong one: 401 in the envelope, with WWW-Authenticate.
        for headers in ({}, bearer("sk-nope"), basic("alice", "wrong")):
            for path, template in ((task, HF_TASK), (handler, HF_HANDLER)):
                hf_error(client, spec, path, 401, template, json=flat, headers=headers)
            response = client.get(HF_HEALTH.format(model_id=DEMO_MODEL), headers=headers)
            assert response.status_code == 401 and set(response.json()) == {"error"}, response.text
            check_response(spec, HF_HEALTH, "GET", response)


def test_live_hf_dialect_without_workers_conforms(app: Litestar, spec: dict[str, Any]) -> None:
    """A model with no ready worker: 503 with ``estimated_time`` and Retry-After, also after a short wait."""
    with TestClient(app) as client:
        for path, template, headers in (
            (HF_TASK.format(model_id=DEMO_MODEL), HF_TASK, {}),
            (HF_HANDLER.format(model_id=DEMO_MODEL), HF_HANDLER, {"x-scale-up-timeout": "0.2"}),
        ):
            response = client.post(path, json={"inputs": "a cat"}, headers=headers)
            assert response.status_code == 503, response.text
            body = check_response(spec, template, "POST", response)
            assert body["estimated_time"] > 0 and body["error"] and "retry-after" in response.headers, body


# -- 11. the AUTOMATIC1111 dialect, live --------------------------------------------------------------------------

SD = "/sdapi/v1"
SD_ERROR_KEYS = {"error", "detail", "body", "errors"}


def sd_error(
    client: TestClient, spec: dict[str, Any], method: str, route: str, status: int, error: str, **kw: Any
) -> str:
    """Send to ``/sdapi/v1/<route>``, assert an ``A1111Error`` of class ``error`` with ``status`` that conforms;
    returns its ``detail``."""
    path = route.partition("?")[0]
    body = call_checked(client, spec, method, f"{SD}/{route}", status, f"{SD}/{path}", **kw)
    assert set(body) == SD_ERROR_KEYS and (body["error"], body["body"], body["errors"]) == (error, "", ""), body
    assert body["detail"], body
    return body["detail"]


def test_live_sdapi_dialect_conforms(tmp_path: Path, spec: dict[str, Any]) -> None:
    keys = [{"id": "alice", "key_sha256": hashlib.sha256(b"sk-alice").hexdigest()}]
    alice = bearer("sk-alice")
    info_schema = spec["components"]["schemas"]["GenerationResponse"]["properties"]["info"]["contentSchema"]
    settings = secured_settings(tmp_path, api_keys=keys, job_poll_interval=0.01)
    with TestClient(fake_app(settings, step_delay=0.01)) as client:

        def call(method: str, route: str, status: int = 200, **kw: Any) -> Any:
            path = route.partition("?")[0]
            return call_checked(client, spec, method, f"{SD}/{route}", status, f"{SD}/{path}", headers=alice, **kw)

        def generated(route: str, body: dict[str, Any], n: int, fmt: str = "PNG") -> dict[str, Any]:
            """A txt2img or img2img answer: ``n`` base64 images of 64x64 in ``fmt`` and its ``info`` conform."""
            answer = call("POST", route, json=body)
            decoded = [Image.open(io.BytesIO(base64.b64decode(i, validate=True))) for i in answer["images"]]
            assert [(d.format, d.size) for d in decoded] == [(fmt, (64, 64))] * n, answer["parameters"]
            info = json.loads(answer["info"])
            errors = validate(info, info_schema, spec, "info")
            assert not errors, "GenerationResponse.info drifted from openapi.yaml:\n" + "\n".join(errors)
            assert info["all_seeds"] == [info["seed"] + i for i in range(n)] and info["sd_model_name"] == DEMO_MODEL
            return answer

        # What Open WebUI and SillyTavern read first: the options, models, samplers and schedules.
        assert call("GET", "options")["sd_model_checkpoint"] == DEMO_MODEL
        models = call("GET", "sd-models")
        assert [m["title"] for m in models] == [DEMO_MODEL]
        samplers = [s["name"] for s in call("GET", "samplers")]
        assert samplers and set(samplers) <= set(a1111_protocol.SAMPLERS), samplers
        assert [s["name"] for s in call("GET", "schedulers")] == ["automatic", "karras"]
        assert call("POST", "options", json={"sd_model_checkpoint": models[0]["title"], "sd_vae": "None"}) is None

        # txt2img: Open WebUI's body, echoed as sent; a loosely typed one with unknown keys, a sampler and a format.
        open_webui = {"prompt": "a cat", "batch_size": 2, "width": 64, "height": 64, "steps": 2}
        assert generated("txt2img", open_webui, 2)["parameters"] == open_webui
        loose = {
            "prompt": "a cat",
            "width": "64",
            "height": "64",
            "steps": "2",
            "seed": "7",
            "sampler_name": "DPM++ 2M",
            "scheduler": "Karras",
            "samples_format": "jpg",
            "override_settings": {"sd_model_checkpoint": DEMO_MODEL},
        }
        # keys imagegate does not read are not echoed (SillyTavern forwards its own, its `auth` among them)
        answer = generated("txt2img", {**loose, "save_images": False, "auth": "user:secret"}, 1, "JPEG")
        assert answer["parameters"] == loose and json.loads(answer["info"])["all_seeds"] == [7]

        # img2img: base64 (and data: URL) images; init_images and mask are not echoed.
        image = base64.b64encode(png(64, 64)).decode()
        body = {"prompt": "a cat", "init_images": [image], "width": 64, "height": 64, "steps": 2}
        assert generated("img2img", {**body, "denoising_strength": "0.5"}, 1)["parameters"] == {
            "prompt": "a cat",
            "width": 64,
            "height": 64,
            "steps": 2,
            "denoising_strength": "0.5",
        }
        mask = data_url(png(64, 64, "L"))
        assert "mask" not in generated("img2img", {**body, "mask": mask}, 1)["parameters"]

        # Progress when idle, with and without the preview; interrupt with nothing to stop.
        for route in ("progress", "progress?skip_current_image=true"):
            idle = call("GET", route)
            assert (idle["progress"], idle["current_image"], idle["state"]["job_count"]) == (0, None, 0), idle
        assert call("POST", "interrupt") == {}

        # Errors, in A1111's envelope with imagegate's statuses.
        for bad, param in (
            ({"sampler_name": "Euler b"}, "Sampler not found"),
            ({"enable_hr": True}, "enable_hr"),
            ({"alwayson_scripts": {"ADetailer": {"args": []}}}, "alwayson_scripts"),
            ({"sampler_name": "Euler", "scheduler": "karras"}, "karras"),
            ({"prompt": " "}, "prompt"),
        ):
            detail = sd_error(
                client, spec, "POST", "txt2img", 400, "InvalidRequest", json={**open_webui, **bad}, headers=alice
            )
            assert param in detail, (bad, detail)
        sd_error(client, spec, "POST", "txt2img", 400, "InvalidRequest", content=b"prompt=x", headers=alice)
        detail = sd_error(client, spec, "POST", "img2img", 400, "InvalidRequest", json=open_webui, headers=alice)
        assert "init_images" in detail, detail
        unknown = {"override_settings": {"sd_model_checkpoint": "sdxl.safetensors [31e35c80fc]"}}
        detail = sd_error(
            client, spec, "POST", "txt2img", 404, "NotFound", json={**open_webui, **unknown}, headers=alice
        )
        assert detail.startswith("Model not found"), detail
        sd_error(client, spec, "POST", "options", 404, "NotFound", json={"sd_model_checkpoint": "sdxl"}, headers=alice)
        sd_error(client, spec, "POST", "options", 400, "InvalidRequest", json=["sdxl"], headers=alice)
        sd_error(client, spec, "GET", "progress?skip_current_image=maybe", 400, "InvalidRequest", headers=alice)
        too_large = b"x" * (settings.max_body_size + 1)
        sd_error(client, spec, "POST", "txt2img", 413, "PayloadTooLarge", content=too_large, headers=alice)

        # No credential, a wrong one (an API key is configured): 401 in the envelope, with WWW-Authenticate.
        for headers in ({}, bearer("sk-nope")):
            for method, route, kw in (
                ("GET", "options", {}),
                ("GET", "progress", {}),
                ("POST", "interrupt", {}),
                ("POST", "txt2img", {"json": open_webui}),
            ):
                sd_error(client, spec, method, route, 401, "Unauthorized", headers=headers, **kw)
        sd_error(client, spec, "GET", "sd-models", 401, "Unauthorized", headers=basic("alice", "wrong"))


def test_live_sdapi_progress_and_interrupt_conform(tmp_path: Path, spec: dict[str, Any]) -> None:
    """A running generation's progress with its preview; interrupted, its request answers 200 with no images."""
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "job_poll_interval": 0.01})
    answers: list[Any] = []
    with TestClient(fake_app(settings, step_delay=0.01)) as client:
        body = {"prompt": "a cat", "width": 64, "height": 64, "steps": 100}
        thread = threading.Thread(target=lambda: answers.append(client.post(f"{SD}/txt2img", json=body)))
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                progress = call_checked(client, spec, "GET", f"{SD}/progress", 200)
                if progress["current_image"] is not None:
                    break
                time.sleep(0.01)
            assert progress["current_image"] is not None, (progress, answers and answers[0].text)
            assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 100, progress
            assert progress["state"]["job"].startswith("job_") and progress["state"]["job_count"] == 1, progress
            assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"], validate=True))).size == (64, 64)
            assert call_checked(client, spec, "POST", f"{SD}/interrupt", 200) == {}
        finally:
            thread.join(20)
        (answer,) = answers
        assert answer.status_code == 200, answer.text
        assert check_response(spec, f"{SD}/txt2img", "POST", answer)["images"] == []


# -- 12. the ModelsLab dialect, live ------------------------------------------------------------------------------

ML = "/api/v6/images"
ML_ENTERPRISE = "/api/v1/enterprise"
ML_SDK = "/api/v1/enterprise/images"
ML_FETCH = "fetch/{job_id}"


def ml_error(
    client: TestClient, spec: dict[str, Any], path: str, status: int, template: str | None = None, **kw: Any
) -> str:
    """POST to an ``/api/`` route, assert a ``ModelsLabError`` with ``status`` that conforms; returns its message."""
    body = call_checked(client, spec, "POST", path, status, template, **kw)
    assert body["status"] == "error" and body["message"] and body["messege"] == body["message"], body
    return body["message"]


def ml_webhook(client: TestClient, spec: dict[str, Any], job_id: int) -> dict[str, Any]:
    """The webhook payload the job layer would deliver for the job now (the dialect's payload hook), conforming."""
    app = client.app
    record = app.state.jobs.store.get(str(job_id))
    payload = json.loads(app.state.jobs.payloads["modelslab"](record))
    errors = validate(payload, {"$ref": "#/components/schemas/ModelsLabWebhook"}, spec, "webhook")
    assert not errors, "the ModelsLab webhook payload drifted from openapi.yaml:\n" + "\n".join(errors)
    return payload


def test_live_modelslab_dialect_conforms(tmp_path: Path, spec: dict[str, Any]) -> None:
    keys = [{"id": "alice", "key_sha256": hashlib.sha256(b"sk-alice").hexdigest()}]
    alice = bearer("sk-alice")
    settings = secured_settings(tmp_path, api_keys=keys, job_poll_interval=0.01, modelslab_wait=10)
    accepted = [name for name, ours in modelslab_protocol.SCHEDULERS.items() if ours is not None]
    with TestClient(fake_app(settings)) as client:

        def call(path: str, template: str | None = None, **kw: Any) -> Any:
            return call_checked(client, spec, "POST", path, 200, template, **kw)

        # text2img as seed 004 sends it, every value a string: done within the wait, so `success`.
        seeded = {
            "key": "sk-alice",
            "model_id": DEMO_MODEL,
            "prompt": "a cat",
            "negative_prompt": "blur",
            "width": "64",
            "height": "64",
            "samples": "2",
            "num_inference_steps": "2",
            "guidance_scale": "7.5",
            "seed": "7",
            "scheduler": "UniPCMultistepScheduler",
            "use_karras_sigmas": "yes",
            "algorithm_type": "none",
            "safety_checker": "no",
            "enhance_prompt": "no",
            "tomesd": "yes",
            "clip_skip": "1",
            "lora_model": None,
            "vae": None,
            "base64": "no",
            "temp": "no",
            "webhook": "https://hooks.example.com/modelslab",
            "track_id": "t-1",
            "panorama": "no",
            "upscale": "no",
        }
        done = call(f"{ML}/text2img", json=seeded)
        meta = done["meta"]
        assert done["status"] == "success" and len(done["output"]) == 2 and done["proxy_links"] == done["output"]
        assert (meta["W"], meta["H"], meta["seed"], meta["steps"], meta["n_samples"]) == (64, 64, 7, 2, 2), meta
        assert (meta["scheduler"], meta["track_id"], meta["id"]) == ("UniPCMultistepScheduler", "t-1", str(done["id"]))
        assert done["webhook_status"] == "success" and meta["output"] == done["output"]
        for url in done["output"]:
            response = client.get(url)
            assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (64, 64)
            check_response(spec, "/files/jobs/{name}", "GET", response)
        assert ml_webhook(client, spec, done["id"]) == {**done, "track_id": "t-1"}

        # Fetch, at every prefix: by path (body key, or a credential header and no body) and by body (id as
        # number or string): the same envelope.
        for prefix in (ML, ML_ENTERPRISE, ML_SDK):
            path, template = f"{prefix}/fetch/{done['id']}", f"{prefix}/{ML_FETCH}"
            assert call(path, template, json={"key": "sk-alice"}) == done
            assert call(path, template, headers=alice) == done
            for request_id in (done["id"], str(done["id"])):
                assert call(f"{prefix}/fetch", json={"key": "sk-alice", "request_id": request_id}) == done

        # JSON numbers and booleans, at the enterprise and SDK paths; base64: the images themselves.
        typed = {
            "key": "sk-alice",
            "model_id": DEMO_MODEL,
            "prompt": "a cat",
            "width": 64,
            "height": 64,
            "samples": 1,
            "num_inference_steps": 2,
            "seed": 3,
            "safety_checker": False,
            "base64": True,
        }
        for prefix in (ML_ENTERPRISE, ML_SDK):
            answer = call(f"{prefix}/text2img", json=typed)
            (image,) = answer["output"]
            assert Image.open(io.BytesIO(base64.b64decode(image, validate=True))).size == (64, 64)
            assert answer["meta"]["base64"] == "yes" and answer["webhook_status"] == ""
            assert ml_webhook(client, spec, answer["id"])["track_id"] is None

        # img2img (base64 input with base64: yes) and inpaint (data: URLs), at each prefix; a prompt enhanced.
        init = base64.b64encode(png(64, 64)).decode()
        mask = data_url(png(64, 64, "L"))
        for prefix in (ML, ML_ENTERPRISE, ML_SDK):
            answer = call(f"{prefix}/img2img", json={**typed, "init_image": init, "strength": "0.5"})
            assert answer["status"] == "success" and answer["meta"]["n_samples"] == 1, answer["meta"]
            inpaint = {**typed, "base64": "no", "init_image": data_url(png(64, 64)), "mask_image": mask}
            assert call(f"{prefix}/inpaint", json=inpaint)["status"] == "success"
        enhanced = call(f"{ML}/text2img", json={**typed, "enhance_prompt": "yes"})["meta"]
        assert enhanced["enhance_prompt"] == "yes" and enhanced["prompt"] != "a cat", enhanced
        # The safety checker asked for (the fake backend flags nothing), a layer of the text encoder skipped.
        checked = call(f"{ML}/text2img", json={**typed, "safety_checker": "yes", "safety_checker_type": "Blur"})
        assert checked["nsfw_content_detected"] is False, checked
        assert (checked["meta"]["safety_checker"], checked["meta"]["safety_checker_type"]) == ("yes", "blur")
        assert call(f"{ML}/text2img", json={**typed, "clip_skip": 2})["meta"]["clip_skip"] == 2

        # The informational routes: body key, or a credential header and no body.
        for kw in ({"json": {"key": "sk-alice"}}, {"headers": alice}):
            load = call("/api/v3/system_load", **kw)
            assert load["status"] == "ok" and load["queue_num"] == 0, load
            assert call(f"{ML_ENTERPRISE}/system_details", **kw)["model_count"] == 1
            assert call(f"{ML_ENTERPRISE}/get_all_models", **kw)["models"][0]["model_id"] == DEMO_MODEL
            assert [m["model_id"] for m in call("/api/v4/dreambooth/model_list", **kw)] == [DEMO_MODEL]
            assert call(f"{ML_ENTERPRISE}/schedulers_list", **kw)["schedulers"] == accepted

        # Refusals, in the {"status": "error"} envelope with imagegate's statuses. A wrong key in the body (even
        # beside a good header), a wrong header, none at all: 401 with WWW-Authenticate.
        gen = f"{ML}/text2img"
        for kw in (
            {"json": {**typed, "key": "sk-nope"}},
            {"json": {**typed, "key": "sk-nope"}, "headers": alice},
            {"json": {**typed, "key": None}, "headers": bearer("sk-nope")},
            {"json": {**typed, "key": None}},
        ):
            ml_error(client, spec, gen, 401, **kw)
            response = client.post(gen, **kw)
            assert response.headers["www-authenticate"] == 'Bearer realm="imagegate"'
        for path, template in (
            (f"{ML_SDK}/fetch/{done['id']}", f"{ML_SDK}/{ML_FETCH}"),
            ("/api/v3/system_load", None),
            ("/api/v4/dreambooth/model_list", None),
            (f"{ML_ENTERPRISE}/schedulers_list", None),
        ):
            ml_error(client, spec, path, 401, template, json={"key": "sk-nope"})
        # 400: no prompt, no model, refused schedulers (with their reason), features imagegate does not run, values
        # out of range or of the wrong form, img2img without its image, a webhook to a private address.
        assert ml_error(client, spec, gen, 400, json={**typed, "prompt": "  "}) == "The prompt field is required."
        ml_error(client, spec, gen, 400, json={**typed, "model_id": None})
        for name, reason in modelslab_protocol.REFUSED.items():
            assert reason in ml_error(client, spec, gen, 400, json={**typed, "scheduler": name})
        bad_values = [
            {"scheduler": "FancyScheduler"},
            {"algorithm_type": "dpmsolver+++"},
            {"vae": "sdxl-vae"},
            {"upscale": "yes"},
            {"panorama": True},
            {"clip_skip": "9"},
            {"width": "65"},
            {"samples": "5"},
            {"guidance_scale": "25"},
            {"num_inference_steps": "2.5"},
            {"enhance_prompt": "maybe"},
            {"safety_checker": "yes", "safety_checker_type": "smudge"},
            {"lora_model": "ink", "lora_strength": "0.5,0.5"},
            {"webhook": "http://127.0.0.1:9/hook"},
        ]
        for bad in bad_values:
            ml_error(client, spec, gen, 400, json={**typed, **bad})
        ml_error(client, spec, f"{ML_ENTERPRISE}/img2img", 400, json=typed)
        ml_error(client, spec, f"{ML_SDK}/inpaint", 400, json={**typed, "init_image": init})
        ml_error(client, spec, gen, 400, content=b"key=sk-alice")
        ml_error(client, spec, "/api/v3/system_load", 400, json=["sk-alice"])
        # 404: an unknown model; a fetch of no such generation (or another API's job).
        assert ml_error(client, spec, gen, 404, json={**typed, "model_id": "sdxl"}) == "Model not found: sdxl"
        for path, template in ((f"{ML}/fetch/123456789012345", f"{ML}/{ML_FETCH}"), (f"{ML_ENTERPRISE}/fetch", None)):
            ml_error(client, spec, path, 404, template, json={"key": "sk-alice", "request_id": 123456789012345})
        ml_error(client, spec, f"{ML}/fetch/job_1", 400, f"{ML}/{ML_FETCH}", json={"key": "sk-alice"})
        ml_error(client, spec, f"{ML}/fetch", 400, json={"key": "sk-alice"})
        too_large = b"x" * (settings.max_body_size + 1)
        ml_error(client, spec, gen, 413, content=too_large, headers=alice)


def test_live_modelslab_processing_conforms(tmp_path: Path, spec: dict[str, Any]) -> None:
    """Past ``modelslab_wait``: ``processing`` with future links that are a 404 until done, fetched until
    ``success``; a cancelled generation fetches as ``error`` and its webhook says ``failed``."""
    overrides = {"data_dir": str(tmp_path), "job_poll_interval": 0.01, "modelslab_wait": 0}
    with TestClient(fake_app(load_settings(environ={}, overrides=overrides), step_delay=0.02)) as client:
        body = {"model_id": DEMO_MODEL, "prompt": "a cat", "width": "64", "height": "64", "num_inference_steps": "20"}
        waiting = call_checked(client, spec, "POST", f"{ML}/text2img", 200, json={**body, "track_id": 42})
        assert waiting["status"] == "processing" and waiting["output"] == [], waiting
        assert waiting["fetch_result"] == f"http://testserver.local{ML}/fetch/{waiting['id']}", waiting
        (link,) = waiting["future_links"]
        response = client.get(link)
        assert response.status_code == 404, response.text
        check_response(spec, "/files/jobs/{name}", "GET", response)
        fetched = waiting
        for _ in range(500):
            fetched = call_checked(client, spec, "POST", waiting["fetch_result"], 200, f"{ML}/{ML_FETCH}", json={})
            if fetched["status"] != "processing":
                break
            time.sleep(0.01)
        assert fetched["status"] == "success" and fetched["output"] == [link], fetched
        assert fetched["meta"]["track_id"] == 42 and client.get(link).status_code == 200
        assert ml_webhook(client, spec, waiting["id"])["track_id"] == 42

        # Cancelled while processing (through the job layer): fetch answers `error`, the webhook `failed`.
        edit = {**body, "init_image": data_url(png(64, 64))}
        waiting = call_checked(client, spec, "POST", f"{ML_SDK}/img2img", 200, json=edit)
        assert waiting["status"] == "processing", waiting
        assert client.post(f"/v1/jobs/{waiting['id']}/cancel").status_code in (200, 202)
        for _ in range(500):
            failed = call_checked(client, spec, "POST", f"{ML}/fetch", 200, json={"request_id": str(waiting["id"])})
            if failed["status"] != "processing":
                break
            time.sleep(0.01)
        assert failed["status"] == "error" and failed["id"] == waiting["id"], failed
        webhook = ml_webhook(client, spec, waiting["id"])
        assert webhook == {"status": "failed", "id": waiting["id"], "message": webhook["message"], "track_id": None}
