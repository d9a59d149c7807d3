"""The error vocabulary: worker failures, Retry-After, and OpenAI's error body."""

from __future__ import annotations

import json
from typing import Annotated

import msgspec
import pytest
from litestar import get, post
from litestar.testing import create_test_client

from app.api.errors import EXCEPTION_HANDLERS
from app.errors import (
    ApiError,
    BackendFailed,
    Cancelled,
    DeadlineExceeded,
    ErrorEvent,
    ErrorResponse,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    OutOfMemory,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
    from_worker,
)
from app.worker.protocol import Failed


def test_from_worker_invalid_request_keeps_message_and_param():
    error = from_worker(Failed(message="prompt too long", kind="invalid_request", param="prompt"))
    assert type(error) is InvalidRequest
    assert error.status == 400
    assert error.message == "prompt too long"
    assert error.param == "prompt"


def test_from_worker_out_of_memory():
    error = from_worker(Failed(message="CUDA OOM", kind="out_of_memory"))
    assert type(error) is OutOfMemory
    assert (error.status, error.code) == (503, "out_of_memory")


def test_from_worker_cancelled():
    error = from_worker(Failed(message="client left", kind="cancelled"))
    assert type(error) is Cancelled
    assert error.code == "cancelled"


def test_from_worker_generation_failed():
    error = from_worker(Failed(message="model 'm': the pipeline produced NaN values", kind="generation_failed"))
    assert (error.status, error.type, error.code) == (500, "server_error", "generation_failed")
    assert "NaN" in error.message


def test_from_worker_internal_is_backend_failed():
    error = from_worker(Failed(message="segfault"))
    assert type(error) is BackendFailed
    assert (error.status, error.type, error.code) == (502, "server_error", "worker_failed")
    assert "segfault" in error.message


@pytest.mark.parametrize(
    ("cls", "status", "type_", "code"),
    [
        (ApiError, 500, "server_error", None),
        (InvalidRequest, 400, "invalid_request_error", None),
        (NotFound, 404, "invalid_request_error", None),
        (MethodNotAllowed, 405, "invalid_request_error", None),
        (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
        (Overloaded, 429, "rate_limit_error", "queue_full"),
        (Unavailable, 503, "server_error", "model_unavailable"),
        (BackendFailed, 502, "server_error", "worker_failed"),
        (OutOfMemory, 503, "server_error", "out_of_memory"),
        (DeadlineExceeded, 504, "server_error", "timeout"),
    ],
)
def test_statuses_types_and_default_codes(cls, status, type_, code):
    error = cls("m")
    assert (error.status, error.type, error.code) == (status, type_, code)
    assert error.body().code == code


def test_explicit_code_beats_default():
    assert Overloaded("m", code="custom").code == "custom"


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(0, "1"), (0.2, "1"), (0.6, "1"), (1.0, "1"), (1.4, "1"), (2.6, "3"), (30, "30"), (-5, "1")],
)
def test_retry_after_is_rounded_with_minimum_one(retry_after, header):
    assert Overloaded("m", retry_after=retry_after).headers() == {"retry-after": header}


def test_no_retry_after_header_without_retry_after():
    assert InvalidRequest("m").headers() == {}


def test_extra_headers_are_kept_and_not_mutated():
    extra = {"allow": "POST"}
    error = Unavailable("m", retry_after=5, headers=extra)
    assert error.headers() == {"allow": "POST", "retry-after": "5"}
    assert extra == {"allow": "POST"}


def test_error_response_json_has_all_four_keys():
    body = json.loads(msgspec.json.encode(ErrorResponse(error=ApiError("broken").body())))
    assert body == {"error": {"message": "broken", "type": "server_error", "param": None, "code": None}}


def test_error_response_json_with_param_and_code():
    error = NotFound("no model", param="model", code="model_not_found")
    body = json.loads(msgspec.json.encode(ErrorResponse(error=error.body())))
    assert body == {
        "error": {"message": "no model", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    }


def test_error_event_has_top_level_type_and_error():
    body = json.loads(msgspec.json.encode(ErrorEvent(error=BackendFailed("x").body())))
    assert body["type"] == "error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "worker_failed"


def test_api_error_is_an_exception_with_its_message():
    error = InvalidRequest("bad size", param="size")
    assert isinstance(error, Exception)
    assert str(error) == "bad size"


# -- app.api.errors: every failure leaves a Litestar app in OpenAI's shape ---------------------------------------


class _Body(msgspec.Struct, kw_only=True):
    prompt: Annotated[str, msgspec.Meta(min_length=1)]
    n: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1


@post("/gen")
async def _gen(data: _Body) -> dict[str, int]:
    return {"n": data.n}


@get("/busy")
async def _busy() -> None:
    raise Overloaded("The queue is full.", retry_after=2.4)


@get("/missing-model")
async def _missing_model() -> None:
    raise NotFound("no such model", param="model", code="model_not_found")


@get("/boom")
async def _boom() -> None:
    raise RuntimeError("secret internal detail /etc/passwd")


@pytest.fixture(scope="module")
def client():
    with create_test_client(
        [_gen, _busy, _missing_model, _boom], exception_handlers=EXCEPTION_HANDLERS, logging_config=None
    ) as c:
        yield c


def _error(response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_success_passes_through(client):
    response = client.post("/gen", json={"prompt": "a", "n": 3})
    assert response.status_code == 201
    assert response.json() == {"n": 3}


def test_missing_field_names_the_param(client):
    response = client.post("/gen", json={"n": 2})
    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "prompt"
    assert error["code"] is None
    assert "Missing required parameter: 'prompt'." in error["message"]


def test_missing_field_message_is_openais(client):
    error = _error(client.post("/gen", json={"n": 2}))
    assert error["message"] == "Missing required parameter: 'prompt'."


def test_wrong_type_names_the_param(client):
    response = client.post("/gen", json={"prompt": "a", "n": "three"})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "n"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("Invalid value for 'n': ")
    assert "$." not in error["message"]  # msgspec's path suffix is stripped


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt": "a", "n": 11}, "n"), ({"prompt": "a", "n": 0}, "n"), ({"prompt": ""}, "prompt")],
)
def test_constraint_violation_names_the_param(client, body, param):
    response = client.post("/gen", json=body)
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b'{"prompt": ', b"{nope}", b"not json"])
def test_malformed_json_is_400_without_param(client, content):
    response = client.post("/gen", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["message"]


def test_unknown_route_is_404_in_openai_shape(client):
    response = client.get("/v1/nope")
    assert response.status_code == 404
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None


def test_wrong_method_is_405_with_allow(client):
    response = client.get("/gen")
    assert response.status_code == 405
    assert _error(response)["type"] == "invalid_request_error"
    assert "POST" in response.headers["allow"]


def test_api_error_keeps_status_code_and_retry_after(client):
    response = client.get("/busy")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    error = _error(response)
    assert error == {"message": "The queue is full.", "type": "rate_limit_error", "param": None, "code": "queue_full"}


def test_api_error_param_and_code(client):
    response = client.get("/missing-model")
    assert response.status_code == 404
    assert _error(response) == {
        "message": "no such model",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_unexpected_exception_is_500_without_leaking(client):
    response = client.get("/boom")
    assert response.status_code == 500
    error = _error(response)
    assert error["type"] == "server_error"
    assert "secret" not in response.text
    assert "passwd" not in response.text
    assert "RuntimeError" not in response.text
