"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.errors import error_body
from service.metrics import CONTENT_TYPE_LATEST
from service.routes.common import get_state, json_response
from service.schemas import Health, Readiness

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Response:
    return json_response({"status": "alive"})


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Every configured model is loaded, verified and warmed",
    responses={503: {"description": "not ready; the body says which models are not"}},
)
async def readyz(request: Request) -> Response:
    ready, models = get_state(request).readiness()
    if ready:
        return json_response({"ready": True, "models": models})
    not_ready = {k: v for k, v in models.items() if v != "ready"} or {"service": "loading or no models"}
    body = error_body("not_ready", f"not ready: {not_ready}") | {"ready": False, "models": models}
    return json_response(body, status_code=503, headers={"Retry-After": "1"})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
