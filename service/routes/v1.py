"""v1: score with one model or several; list models (DESIGN §6). The v1 wire format is built here
(`to_v1`, `model_summary`, `ensemble_summary`, `combined_block`), from the core's objects."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from service.core import ServedEnsemble, ServedModel
from service.core.drift import DriftMonitor
from service.core.ensembles import combine, select_ensemble
from service.errors import NotReady
from service.parsing import parse_score_body
from service.routes.common import ERROR_RESPONSES, get_state, json_response, unless_disconnected
from service.schemas import EXAMPLE_ARRAY_B64, EXAMPLE_PNG_B64, ModelList, ModelScores, MultiModelScores
from service.scoring import ModelOutcome, decode_payload, score_model

__all__ = [
    "SCORE_REQUEST_BODY",
    "combined_block",
    "ensemble_summary",
    "model_summary",
    "router",
    "to_v1",
]


def to_v1(outcome: ModelOutcome) -> dict[str, Any]:
    """One model's scores as a v1 response object (`ModelScores`)."""
    s, manifest = outcome.scores, outcome.manifest
    columns = zip(
        s.log_likelihood.tolist(),
        s.bits_per_dim.tolist(),
        s.ood_score.tolist(),
        s.p_value.tolist(),
        s.is_ood.tolist(),
        outcome.resized,
        strict=True,
    )
    return {
        "model": manifest.name,
        "version": manifest.version,
        "kind": manifest.kind,
        "statistic": manifest.score.statistic,
        "results": [
            {
                "log_likelihood": ll,
                "bits_per_dim": bpd,
                "ood_score": score,
                "threshold": s.threshold,
                "p_value": p,
                "is_ood": flag,
                "resized": resized,
            }
            for ll, bpd, score, p, flag, resized in columns
        ],
    }


def model_summary(served: ServedModel, detail: bool = False) -> dict[str, Any]:
    """Manifest summary, calibration and metrics for `/v1/models` (`detail`: architecture too)."""
    out: dict[str, Any] = {
        "name": served.name,
        "version": served.version,
        "status": served.status,
        "reason": served.reason,
    }
    m = served.manifest
    if m is None:
        return out
    cal = m.calibration
    out.update(
        kind=m.kind,
        description=m.description,
        created_at=m.created_at.isoformat(),
        input=m.input.model_dump(mode="json"),
        num_dims=m.num_dims,
        bits_per_dim_unit=m.bits_per_dim_unit,
        parameters=m.parameters,
        score=m.score.model_dump(mode="json"),
        calibration={
            "threshold": cal.threshold,
            "target_fpr": cal.target_fpr,
            "validation_set": cal.validation_set,
            "validation_size": cal.validation_size,
            "validation_fpr": cal.validation_fpr,
            "reference_scores": len(cal.reference_scores),
        },
        in_distribution_test=m.in_distribution_test,
        metrics=[metric.model_dump(mode="json") for metric in m.metrics],
        data=m.data.model_dump(mode="json"),
    )
    if served.scorer is not None:
        out["runtime"] = {"name": served.scorer.runtime, "device": served.scorer.device}
    if detail:
        out.update(architecture=m.architecture, training=m.training, export=m.export, baselines=m.baselines)
    return out


def ensemble_summary(ens: ServedEnsemble) -> dict[str, Any]:
    """One ensemble for `/v1/models` (`EnsembleSummary`)."""
    m = ens.manifest
    return {
        "name": ens.name,
        "status": ens.status,
        "reason": ens.reason,
        "rule": None if m is None else m.rule,
        "members": [] if m is None else [{"name": k.name, "version": k.version} for k in m.members],
        "weights": None if m is None else m.member_weights,
        "threshold": None if m is None else m.calibration.threshold,
        "target_fpr": None if m is None else m.calibration.target_fpr,
        "description": "" if m is None else m.description,
    }


def combined_block(
    ensembles: Iterable[ServedEnsemble],
    outcomes: Sequence[ModelOutcome],
    drift: DriftMonitor | None = None,
) -> dict[str, Any] | None:
    """The `combined` field of a `/v1/score` response, or None when no valid ensemble applies.
    `drift`: the monitor whose ensemble detector the combined p-values feed."""
    ens = select_ensemble(ensembles, {o.manifest.name: o.manifest.version for o in outcomes})
    if ens is None:
        return None
    manifest = ens.manifest
    assert manifest is not None
    verdict = combine(ens, {o.manifest.name: o.scores.p_value for o in outcomes})
    if drift is not None and ens.reference_sorted is not None:
        reference = ens.reference_sorted  # re-resolving the ensemble replaces it: a fresh detector
        drift.observe("ensemble", ens.name, reference, int(reference.size), verdict.p_value, verdict.is_ood)
    return {
        "ensemble": ens.name,
        "rule": manifest.rule,
        "members": [{"name": m.name, "version": m.version} for m in manifest.members],
        "weights": manifest.member_weights,
        "threshold": manifest.calibration.threshold,
        "target_fpr": manifest.calibration.target_fpr,
        "results": [
            {"combined_score": s, "p_value": pv, "is_ood": flag}
            for s, pv, flag in zip(
                verdict.combined_score.tolist(),
                verdict.p_value.tolist(),
                verdict.is_ood.tolist(),
                strict=True,
            )
        ],
    }


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
            "models": [
                {**model_summary(m), "versions": registry.version_table(m.name)}
                for m in registry.models.values()
            ],
            "ensembles": [ensemble_summary(e) for e in registry.ensembles.values()],
        }
    )


@router.get(
    "/models/{name}",
    summary="One model: status, manifest summary, calibration, metrics, architecture",
    responses={404: ERROR_RESPONSES[404]},
)
async def get_model(name: str, request: Request) -> Response:
    registry = get_state(request).registry
    served = registry.get(name)
    return json_response(
        {**model_summary(served, detail=True), "versions": registry.version_table(served.name)}
    )


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
    state.require_ready(served)
    payload = await parse_score_body(request, state.settings)

    async def work() -> ModelOutcome:
        return await score_model(state, served, await decode_payload(state, payload), resize)

    outcome = await unless_disconnected(request, work())
    return json_response(to_v1(outcome))


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
        state.require_ready(model)
    payload = await parse_score_body(request, state.settings)

    async def work() -> list[ModelOutcome]:
        batch = await decode_payload(state, payload)
        return list(await asyncio.gather(*(score_model(state, m, batch, resize) for m in served)))

    outcomes = await unless_disconnected(request, work())
    combined = combined_block(state.registry.ensembles.values(), outcomes, state.drift)
    return json_response({"models": [to_v1(o) for o in outcomes], "combined": combined})
