"""Exception handlers: every error leaves the gateway in OpenAI's shape, with the right status.

A dialect's routes (their path prefix in :data:`ENVELOPES`) wrap the same error in the envelope their clients read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.exceptions.http_exceptions import MethodNotAllowedException

from app.api.instrument import REQUEST_ID_HEADER, SCOPE_REQUEST_ID, request_id
from app.errors import ApiError, ErrorResponse, InvalidRequest, MethodNotAllowed, NotFound, PayloadTooLarge
from app.protocol import a1111, hf, modelslab

log = logging.getLogger("imagegate.api")

_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
_AT_PATH = re.compile(r" - at `\$\.([A-Za-z0-9_.\[\]]+)`$")


ENVELOPES: dict[str, Callable[[ApiError], msgspec.Struct]] = {
    "/hf/": hf.error_body,
    "/sdapi/": a1111.error_body,
    "/api/": modelslab.error_body,
}
"""Path prefix -> the error body of the dialect served there."""


def error_response(error: ApiError, path: str = "") -> Response[bytes]:
    """The error's response: OpenAI's shape, or the envelope of the dialect whose route ``path`` is."""
    envelope = next((make for prefix, make in ENVELOPES.items() if path.startswith(prefix)), None)
    body = envelope(error) if envelope is not None else ErrorResponse(error=error.body())
    return Response(
        content=msgspec.json.encode(body),
        status_code=error.status,
        media_type=MediaType.JSON,
        headers=error.headers(),
    )


def invalid_value(message: str, param: str | None) -> InvalidRequest:
    """An InvalidRequest from a msgspec validation message, naming the field (from ``param`` or the message)."""
    if param in (None, "data", "body") and (m := _AT_PATH.search(message)):
        param = m.group(1)
    if m := _MISSING_FIELD.search(message):
        param = m.group(1)
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    if param and param not in ("data", "body"):
        return InvalidRequest(f"Invalid value for '{param}': {_AT_PATH.sub('', message)}", param=param)
    return InvalidRequest(message)


def _from_validation(exc: ValidationException) -> ApiError:
    extra = exc.extra if isinstance(exc.extra, list) and exc.extra else None
    if extra is None or not isinstance(extra[0], dict):
        return InvalidRequest(exc.detail or "Invalid request body.")
    first = extra[0]
    return invalid_value(str(first.get("message", exc.detail)), first.get("key"))


def _from_http(exc: HTTPException) -> ApiError:
    if isinstance(exc, ValidationException):
        return _from_validation(exc)
    if isinstance(exc, NotFoundException):
        return NotFound("Not found: no such route or resource.")
    if isinstance(exc, MethodNotAllowedException):
        return MethodNotAllowed(exc.detail or "Method not allowed.", headers=exc.headers)
    if exc.status_code == 413:
        return PayloadTooLarge("The request body is too large.")
    if exc.status_code == 400:
        return InvalidRequest(f"We could not parse your request: {exc.detail}")
    error = ApiError(exc.detail or "Request failed.", headers=exc.headers)
    error.status = exc.status_code  # type: ignore[misc]
    error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"  # type: ignore[misc]
    return error


def handle(request: Request, exc: Exception) -> Response[bytes]:
    scope = request.scope
    path = scope["path"]
    if isinstance(exc, ApiError):
        response = error_response(exc, path)
    elif isinstance(exc, HTTPException):
        response = error_response(_from_http(exc), path)
    else:
        log.exception("unhandled error on %s %s", request.method, path)
        response = error_response(ApiError("The server had an error while processing your request."), path)
    if SCOPE_REQUEST_ID not in scope:  # no route matched (404, 405): the instrumentation never saw the request
        response.headers[REQUEST_ID_HEADER.decode()] = request_id(scope["headers"])
    return response


EXCEPTION_HANDLERS = {Exception: handle}
