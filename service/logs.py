"""JSON log lines carrying the current request id, and the middleware that sets it.

`X-Request-ID` is echoed when the client sends a sane one (up to 128 visible ASCII characters),
otherwise generated; every log line written while the request runs carries it, and so does the
access-log line with method, path, status and duration.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import check_api_key, needs_key
from service.errors import error_response

__all__ = ["JsonFormatter", "RequestContextMiddleware", "configure_logging", "request_id"]

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
access_log = logging.getLogger("service.access")

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", json_lines: bool = True) -> None:
    """Root logging to stderr: JSON lines (default) or plain text. uvicorn's loggers follow."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def _sane_id(raw: bytes | None) -> str:
    """The client's id if sane, else `<random per process>-<counter>` (unique, and no syscall)."""
    if raw and len(raw) <= 128 and all(33 <= c <= 126 for c in raw):
        return raw.decode("ascii")
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


_OPEN_WHILE_DRAINING = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")


class RequestContextMiddleware:
    """Pure ASGI (cheaper than BaseHTTPMiddleware): request id, access log, request metrics, API-key
    check (401), 503 for new requests once the service drains for shutdown, and the request's
    admission scope (a model version retired by a swap waits for the requests it admitted)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_id = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = _sane_id(raw_id)
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 500
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], rid_header]
            await send(message)

        state = scope["app"].state.service
        path = scope["path"]
        try:
            refusal = None
            if state.api_keys and needs_key(path, state.settings):
                refusal = check_api_key(scope["headers"], state.api_keys + state.admin_api_keys)
            if refusal is not None:
                headers = {"WWW-Authenticate": 'Bearer realm="oodflow"'}
                response = error_response(401, "unauthorized", refusal, headers, path)
                await response(scope, receive, send_with_id)
            elif state.draining and path not in _OPEN_WHILE_DRAINING:
                headers = {"Retry-After": "1", "Connection": "close"}
                response = error_response(503, "shutting_down", "the service is shutting down", headers, path)
                await response(scope, receive, send_with_id)
            else:
                with state.admission():  # model versions this request is admitted on stay loaded
                    await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            state.metrics.request(template, scope["method"], status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "%s %s %s",
                    scope["method"],
                    path,
                    status,
                    extra={"status": status, "duration_ms": round(seconds * 1000, 3), "route": template},
                )
            request_id.reset(token)
