"""The one error vocabulary of imagegate.

Every failure a client can see is an :class:`ApiError`. It renders as OpenAI's error body,
``{"error": {"message", "type", "param", "code"}}``, with its HTTP status before a stream has started, and as an
``error`` SSE event after::

    ApiError (500 server_error)
    ├── InvalidRequest     400 invalid_request_error   a field is missing, malformed or out of range (param names it)
    ├── Unauthorized       401 invalid_request_error   missing, unknown, expired or revoked credential
    ├── PermissionDenied   403 permission_error        model not allowed for the key, or not an admin
    ├── NotFound           404 invalid_request_error   unknown route or model
    ├── MethodNotAllowed   405 invalid_request_error
    ├── PayloadTooLarge    413 invalid_request_error
    ├── Overloaded         429 rate_limit_error        the model's queue is full (Retry-After)
    ├── RateLimited        429 rate_limit_error        the key's requests per minute or concurrency (Retry-After)
    ├── QuotaExceeded      429 insufficient_quota      the key's image quota is spent (x-should-retry: false)
    ├── Unavailable        503 server_error            no worker is ready for the model (Retry-After)
    ├── GenerationFailed   500 server_error            the model produced no usable image (NaN values)
    ├── BackendFailed      502 server_error            a worker failed or vanished mid-request
    ├── OutOfMemory        503 server_error            the device ran out of memory for this request
    └── DeadlineExceeded   504 server_error            the request outlived request_timeout
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from app.worker.protocol import Failed


class ApiError(Exception):
    """Base of every error a client can see."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after
        self.extra_headers = headers or {}

    def body(self) -> ErrorBody:
        return ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        h = dict(self.extra_headers)
        if self.retry_after is not None:
            h["retry-after"] = str(max(1, round(self.retry_after)))
        return h


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(ApiError):
    status = 403
    type = "permission_error"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"


class Conflict(ApiError):
    """The resource is not in a state that allows this (a finished job cancelled, an idempotency key reused)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"

    def headers(self) -> dict[str, str]:
        # Close the connection: otherwise the server keeps reading (and discarding) the rest of the body.
        return {**super().headers(), "connection": "close"}


class Overloaded(ApiError):
    status = 429
    type = "rate_limit_error"
    default_code = "queue_full"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class QuotaExceeded(ApiError):
    status = 429
    type = "insufficient_quota"
    default_code = "insufficient_quota"

    def headers(self) -> dict[str, str]:
        # The SDKs retry 429s unless told not to; a spent quota will not come back in seconds.
        return {**super().headers(), "x-should-retry": "false"}


class Unavailable(ApiError):
    status = 503
    default_code = "model_unavailable"


class GenerationFailed(ApiError):
    status = 500
    default_code = "generation_failed"


class BackendFailed(ApiError):
    status = 502
    default_code = "worker_failed"


class OutOfMemory(ApiError):
    status = 503
    default_code = "out_of_memory"


class DeadlineExceeded(ApiError):
    status = 504
    default_code = "timeout"


class Cancelled(ApiError):
    """The worker stopped the job because its client went away; never shown to a connected client."""

    status = 499
    default_code = "cancelled"


class ErrorBody(msgspec.Struct):
    """OpenAI's ``error`` object; all four keys are always present."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


class ErrorEvent(msgspec.Struct):
    """The ``error`` SSE event: a top-level ``error`` object, so the OpenAI SDKs raise ``APIError``."""

    error: ErrorBody
    type: str = "error"


def from_worker(failed: Failed) -> ApiError:
    """Map a worker's :class:`Failed` event onto the error a client sees."""
    if failed.kind == "invalid_request":
        return InvalidRequest(failed.message, param=failed.param)
    if failed.kind == "out_of_memory":
        return OutOfMemory(failed.message)
    if failed.kind == "cancelled":
        return Cancelled(failed.message)
    if failed.kind == "generation_failed":
        return GenerationFailed(failed.message)
    return BackendFailed(f"the worker failed: {failed.message}")
