"""Helpers shared by the route modules."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from starlette.responses import Response

from service.errors import ServiceError
from service.schemas import ErrorBody
from service.state import ServiceState

__all__ = [
    "ERROR_RESPONSES",
    "ClientGone",
    "OrjsonResponse",
    "get_state",
    "json_response",
    "unless_disconnected",
]

T = TypeVar("T")


class ClientGone(ServiceError):
    """The client closed the connection before its answer was ready (nginx's 499)."""

    status_code = 499
    code = "client_closed_request"


class OrjsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return OrjsonResponse(content, status_code=status_code, headers=headers)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("malformed request: bad JSON or base64, undecodable or truncated image, no images"),
    401: _error("missing or invalid API key (only when keys are configured)"),
    404: _error("unknown model"),
    413: _error("over a limit: request bytes, images per request, or pixels per image (the limit is named)"),
    415: _error("unsupported content type"),
    422: _error("well-formed but not scorable: wrong image size (see resize), bad shape, schema mismatch"),
    429: _error("the model's queue is full; see Retry-After"),
    503: _error("not ready: models loading, model refused at load time, or shutting down"),
}


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (so queued images are dropped) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    raise ClientGone("client disconnected before the scores were ready")
