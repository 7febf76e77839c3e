"""Typed errors and the one place that maps them to HTTP statuses and JSON bodies.

The core's own errors that reach a route unmapped are mapped here too (`UnknownModel` -> 404).

Every error response, from v1, health or the framework itself, is
`{"error": {"code": "<machine-readable>", "message": "<for humans>"}}` with the status below.
Under `/v2` the Open Inference Protocol's own shape is kept, `{"error": "<message>", "code": ...}`,
because standard v2 clients (`tritonclient.http`) read `error` as a string.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.core import UnknownModel

__all__ = [
    "BadRequest",
    "InferenceFailed",
    "InvalidImage",
    "ModelNotFound",
    "ModelUnavailable",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "ServiceError",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "WrongImageSize",
    "error_body",
    "error_response",
    "install_error_handlers",
]

log = logging.getLogger("service.errors")


class ServiceError(Exception):
    """Base of every error the service answers on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class BadRequest(ServiceError):
    """The request cannot be parsed: bad JSON, bad base64, no images, a byte count that does not add up."""

    status_code = 400
    code = "bad_request"


class InvalidImage(BadRequest):
    """An image file that does not decode (garbage, truncated, unsupported); the message names its index."""

    code = "invalid_image"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="oodflow"'})


class ModelNotFound(ServiceError):
    status_code = 404
    code = "model_not_found"


class PayloadTooLarge(ServiceError):
    """Over a configured limit; the message names the limit and its value."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class Unprocessable(ServiceError):
    """Well-formed but not scorable by this model (wrong size, wrong channel count, schema mismatch)."""

    status_code = 422
    code = "unprocessable"


class WrongImageSize(Unprocessable):
    code = "wrong_image_size"


class Overloaded(ServiceError):
    """The model's queue is full; retry after `retry_after_s`."""

    status_code = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class InferenceFailed(ServiceError):
    """The runtime raised on a batch that passed every input check: a server fault, hence 500."""

    status_code = 500
    code = "inference_failed"


class NotReady(ServiceError):
    """Still loading, shutting down, or the model was refused at load time."""

    status_code = 503
    code = "not_ready"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: float | None = 1.0) -> None:
        headers = {} if retry_after_s is None else {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
        super().__init__(message, code=code, headers=headers)


class ModelUnavailable(NotReady):
    code = "model_unavailable"


def _is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None, path: str = ""
) -> Response:
    """The JSON error response; `path` under /v2 selects the Open Inference Protocol's shape."""
    body = {"error": message, "code": code} if _is_v2(path) else error_body(code, message)
    return Response(
        orjson.dumps(body),
        status_code=status_code,
        headers=dict(headers or {}),
        media_type="application/json",
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "overloaded",
    503: "not_ready",
}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type to the JSON error format."""

    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        if exc.status_code >= 500:
            log.error("%s: %s", exc.code, exc.message)
        return error_response(exc.status_code, exc.code, exc.message, exc.headers, request.url.path)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", _validation_message(exc), path=request.url.path)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, code, str(exc.detail), headers, request.url.path)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal server error", path=request.url.path)

    async def unknown_model(request: Request, exc: Exception) -> Response:
        return error_response(404, ModelNotFound.code, str(exc), path=request.url.path)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(UnknownModel, unknown_model)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
