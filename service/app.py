"""The app factory, its lifespan, and `run(settings)` for `oodflow serve`.

`create_app(settings)` wires settings, registry, metrics and routes. Its lifespan discovers the
models and loads, verifies and warms them in the background, so `/healthz` answers at once and
`/readyz` turns true when every model serves; on shutdown it stops intake, finishes queued work and
releases the worker threads. `run(settings)` serves the app with uvicorn; SIGTERM/SIGINT make new
requests answer 503 while in-flight ones finish (up to `shutdown_timeout_s`), then the process exits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from service.auth import add_security_to_openapi
from service.core import ScorerWrapper
from service.errors import install_error_handlers
from service.logs import RequestContextMiddleware, configure_logging
from service.routes import drift, health, repository, v1, v2
from service.schemas import ArrayBody, ImagesBody, InferRequest
from service.settings import Settings
from service.state import ServiceState, registry_for

__all__ = ["create_app", "run"]

log = logging.getLogger("service.app")

_DESCRIPTION = """
Out-of-distribution scores from normalizing flows (DESIGN §4): per image `log_likelihood` (nats),
`bits_per_dim`, `ood_score` (higher = more OOD), the calibrated `threshold`, a `p_value` against
in-distribution validation scores, and the verdict `is_ood = ood_score > threshold`.

Bodies: `multipart/form-data` with `images` files, JSON `{"images": [{"b64": ...}]}`, or JSON
`{"array": {"b64": ..., "shape": [N, H, W] | [N, H, W, C]}}`. KServe v2 under `/v2`.
Errors: `{"error": {"code": ..., "message": ...}}`.
"""


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema(
        [(m, "validation") for m in (ImagesBody, ArrayBody, InferRequest)],
        ref_template="#/components/schemas/{model}",
    )
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    add_security_to_openapi(schema, app.state.service.settings)
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None, *, wrap_scorer: ScorerWrapper | None = None) -> FastAPI:
    """The FastAPI app. `wrap_scorer(name, scorer) -> scorer` lets tests slow a model down."""
    settings = settings or Settings()
    state = ServiceState(
        settings,
        registry_for(settings, wrap_scorer),
        api_keys=settings.resolved_api_keys(),
        admin_api_keys=settings.resolved_admin_api_keys(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="oodflow",
        version=v2._server_version(),
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(drift.router)
    app.include_router(v2.router)
    app.include_router(repository.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


class _Server(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT the app starts answering new requests with 503 at once."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._state.draining:
            log.info("signal %s: draining (new requests get 503, in-flight ones finish)", sig)
        self._state.draining = True
        super().handle_exit(sig, frame)


def run(settings: Settings | None = None, *, app: FastAPI | None = None) -> None:
    """Serve until SIGTERM/SIGINT (blocking). `oodflow serve` calls this."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)
    app = app or create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        backlog=2048,
    )
    log.info("serving %s on http://%s:%d", settings.model_repository, settings.host, settings.port)
    _Server(config, app.state.service).run()
