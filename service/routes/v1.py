"""v1: score with one model or several; list models (DESIGN §6)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from service.ensemble import combined_block
from service.errors import NotReady
from service.parsing import parse_score_body
from service.routes.common import ERROR_RESPONSES, get_state, json_response, unless_disconnected
from service.schemas import EXAMPLE_ARRAY_B64, EXAMPLE_PNG_B64, ModelList, ModelScores, MultiModelScores
from service.scoring import ModelOutcome, decode_payload, score_model

__all__ = ["SCORE_REQUEST_BODY", "router"]

router = APIRouter(prefix="/v1", tags=["v1"])

SCORE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "images to score, in order: multipart files, base64 files in JSON, or raw uint8",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "image files (PNG, JPEG, BMP, WebP, GIF, TIFF, PPM, TGA)",
                        }
                    },
                }
            },
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/ImagesBody"},
                        {"$ref": "#/components/schemas/ArrayBody"},
                    ]
                },
                "examples": {
                    "encoded_files": {
                        "summary": "base64-encoded image files",
                        "value": {"images": [{"b64": EXAMPLE_PNG_B64}]},
                    },
                    "raw_array": {
                        "summary": "raw uint8 pixels, shape [N, H, W] or [N, H, W, C]",
                        "value": {"array": {"b64": EXAMPLE_ARRAY_B64, "shape": [1, 28, 28]}},
                    },
                },
            },
        },
    }
}

_RESIZE = Query(
    False,
    description="resize images whose size differs from the model's input (PIL bilinear); "
    "otherwise such an image is refused with 422. Resized images say so in their result.",
)


@router.get("/models", response_model=ModelList, summary="Every model: status, manifest summary, calibration")
async def list_models(request: Request) -> Response:
    registry = get_state(request).registry
    return json_response(
        {
            "models": [m.summary() for m in registry.models.values()],
            "ensembles": [e.summary() for e in registry.ensembles.values()],
        }
    )


@router.get(
    "/models/{name}",
    summary="One model: status, manifest summary, calibration, metrics, architecture",
    responses={404: ERROR_RESPONSES[404]},
)
async def get_model(name: str, request: Request) -> Response:
    return json_response(get_state(request).registry.get(name).summary(detail=True))


@router.post(
    "/models/{name}/score",
    response_model=ModelScores,
    summary="Score images with one model",
    responses=ERROR_RESPONSES,
    openapi_extra=SCORE_REQUEST_BODY,
)
async def score(name: str, request: Request, resize: bool = _RESIZE) -> Response:
    state = get_state(request)
    served = state.registry.get(name)
    served.require_ready()
    payload = await parse_score_body(request, state.settings)

    async def work() -> ModelOutcome:
        return await score_model(state, served, await decode_payload(state, payload), resize)

    outcome = await unless_disconnected(request, work())
    return json_response(outcome.to_v1())


@router.post(
    "/score",
    response_model=MultiModelScores,
    summary="Score images with several models (default: every ready model), plus a combined verdict",
    responses=ERROR_RESPONSES,
    openapi_extra=SCORE_REQUEST_BODY,
)
async def score_many(
    request: Request,
    resize: bool = _RESIZE,
    models: str | None = Query(None, description="comma-separated model names; empty: every ready model"),
) -> Response:
    state = get_state(request)
    names = [n.strip() for n in (models or "").split(",") if n.strip()]
    if names:
        served = [state.registry.get(n) for n in dict.fromkeys(names)]
    else:
        served = state.registry.ready_models()
        if not served:
            raise NotReady("no model is ready", code="not_ready")
    for model in served:
        model.require_ready()
    payload = await parse_score_body(request, state.settings)

    async def work() -> list[ModelOutcome]:
        batch = await decode_payload(state, payload)
        return list(await asyncio.gather(*(score_model(state, m, batch, resize) for m in served)))

    outcomes = await unless_disconnected(request, work())
    combined = combined_block(state.registry.ensembles.values(), outcomes)
    return json_response({"models": [o.to_v1() for o in outcomes], "combined": combined})
