"""Drift (DESIGN §6): a batch test on posted images, and the online detectors over served traffic.

- `POST /v1/models/{name}/drift`, `POST /v1/ensembles/{name}/drift`: score a batch (any scoring
  body, at least 2 images) and test it against the model's (the ensemble's) calibration reference
  (`service.core.drift.batch_drift_test`). These images are an analysis, not traffic: they do not
  feed the online detectors.
- `GET /v1/models/{name}/drift`, `GET /v1/ensembles/{name}/drift`: the online detector's state.
- `POST /v1/models/{name}/drift/reset`, `POST /v1/ensembles/{name}/drift/reset`: restart it (admin
  key, see `service.drift.require_admin`). Reloading a model resets its detector too.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from service.core import ServedEnsemble
from service.core.drift import OnlineDriftDetector, batch_drift_test
from service.core.ensembles import combine
from service.drift import require_admin
from service.errors import ModelNotFound, NotReady, Unprocessable
from service.parsing import Payload, parse_score_body
from service.routes.common import ERROR_RESPONSES, get_state, json_response, unless_disconnected
from service.routes.v1 import SCORE_REQUEST_BODY
from service.scoring import ModelOutcome, decode_payload, score_model
from service.state import ServiceState

__all__ = ["BatchDriftResponse", "DriftStateResponse", "router"]

router = APIRouter(prefix="/v1", tags=["drift"])

_RESIZE = Query(False, description="resize images whose size differs from the model's input (PIL bilinear)")
_DRIFT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    403: {"description": "resetting needs an admin API key"},
}


class DriftComponentModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(description="upper_tail, lower_tail or rank_sum")
    statistic: float = Field(description="tail: images beyond the reference's 1 % tail; rank_sum: z")
    p_value: float


class BatchDriftResponse(BaseModel):
    """`POST .../drift`: is this batch from the in-distribution data? (docs/service.md, Drift)"""

    model: str | None = None
    version: int | None = None
    ensemble: str | None = None
    images: int
    reference_size: int
    method: str
    statistic: float = Field(description="the smallest component p-value")
    p_value: float = Field(description="Bonferroni over the components: P(a batch this extreme | no drift)")
    ood_images: int
    ood_rate: float
    ood_rate_interval: list[float] = Field(description="Wilson interval at `confidence`")
    confidence: float
    components: list[DriftComponentModel]


class DriftStateResponse(BaseModel):
    """`GET .../drift`: the online detector over served traffic."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    version: int | None = None
    ensemble: str | None = None
    method: str
    images: int = Field(description="images seen since the last reset")
    statistic: float = Field(description="the larger CUSUM statistic (nats)")
    statistics: dict[str, float]
    threshold: float = Field(description="alarm threshold (nats), set by the configured run length")
    alarm: bool
    alarm_at_image: int | None
    alarm_tail: str | None
    window_images: int
    window_ood_rate: float | None
    window_ood_rate_interval: list[float] | None
    expected_run_length: float


def _batch_size(payload: Payload) -> int:
    files = getattr(payload, "files", None)
    return len(files) if files is not None else int(payload.array.shape[0])  # type: ignore[union-attr]


def _check_batch(payload: Payload) -> None:
    n = _batch_size(payload)
    if n < 2:
        raise Unprocessable(
            f"a drift test needs at least 2 images, got {n}: score a single image with /score",
            code="batch_too_small",
        )


def _ensemble(state: ServiceState, name: str) -> ServedEnsemble:
    ens = state.registry.ensembles.get(name)
    if ens is None:
        known = ", ".join(sorted(state.registry.ensembles)) or "none"
        raise ModelNotFound(f"unknown ensemble '{name}' (served ensembles: {known})")
    if ens.status != "valid" or ens.manifest is None or ens.reference_sorted is None:
        raise NotReady(f"ensemble '{name}' is {ens.status}: {ens.reason}", code="ensemble_unavailable")
    return ens


def _model_detector(state: ServiceState, name: str) -> tuple[OnlineDriftDetector, int]:
    """The served model's online detector (started on first use) and the version it watches."""
    model, _ = state.require_ready(state.registry.get(name))
    return state.drift.watch("model", name, model, int(model.reference_sorted.size)), model.manifest.version


def _ensemble_detector(state: ServiceState, name: str) -> OnlineDriftDetector:
    """The valid ensemble's online detector over its combined p-values (started on first use)."""
    ens = _ensemble(state, name)
    assert ens.reference_sorted is not None
    return state.drift.watch("ensemble", name, ens.reference_sorted, int(ens.reference_sorted.size))


@router.post(
    "/models/{name}/drift",
    summary="Drift test: does this batch come from the model's in-distribution data?",
    response_model=BatchDriftResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=SCORE_REQUEST_BODY,
)
async def model_drift_test(name: str, request: Request, resize: bool = _RESIZE) -> Response:
    state = get_state(request)
    served = state.registry.get(name)
    model, _ = state.require_ready(served)
    payload = await parse_score_body(request, state.settings)
    _check_batch(payload)

    async def work() -> ModelOutcome:
        return await score_model(state, served, await decode_payload(state, payload), resize, observe=False)

    outcome = await unless_disconnected(request, work())
    s = outcome.scores
    result = batch_drift_test(s.ood_score, model.reference_sorted, is_ood=s.is_ood)
    return json_response(
        {"model": outcome.manifest.name, "version": outcome.manifest.version, **result.to_dict()}
    )


@router.post(
    "/ensembles/{name}/drift",
    summary="Drift test on an ensemble's combined score",
    response_model=BatchDriftResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=SCORE_REQUEST_BODY,
)
async def ensemble_drift_test(name: str, request: Request, resize: bool = _RESIZE) -> Response:
    state = get_state(request)
    ens = _ensemble(state, name)
    assert ens.manifest is not None and ens.reference_sorted is not None
    members = [state.registry.get(m.name) for m in ens.manifest.members]
    for member in members:
        state.require_ready(member)
    payload = await parse_score_body(request, state.settings)
    _check_batch(payload)

    async def work() -> list[ModelOutcome]:
        batch = await decode_payload(state, payload)
        return list(
            await asyncio.gather(*(score_model(state, m, batch, resize, observe=False) for m in members))
        )

    outcomes = await unless_disconnected(request, work())
    verdict = combine(ens, {o.manifest.name: o.scores.p_value for o in outcomes})
    result = batch_drift_test(verdict.combined_score, ens.reference_sorted, is_ood=verdict.is_ood)
    return json_response(
        {
            "ensemble": ens.name,
            "members": [{"name": m.name, "version": m.version} for m in ens.manifest.members],
            **result.to_dict(),
        }
    )


@router.get(
    "/models/{name}/drift",
    summary="State of the model's online drift detector over served traffic",
    response_model=DriftStateResponse,
    responses={404: ERROR_RESPONSES[404], 503: ERROR_RESPONSES[503]},
)
async def model_drift_state(name: str, request: Request) -> Response:
    detector, version = _model_detector(get_state(request), name)
    return json_response({"model": name, "version": version, **detector.state()})


@router.get(
    "/ensembles/{name}/drift",
    summary="State of the ensemble's online drift detector over served combined verdicts",
    response_model=DriftStateResponse,
    responses={404: ERROR_RESPONSES[404], 503: ERROR_RESPONSES[503]},
)
async def ensemble_drift_state(name: str, request: Request) -> Response:
    detector = _ensemble_detector(get_state(request), name)
    return json_response({"ensemble": name, **detector.state()})


@router.post(
    "/models/{name}/drift/reset",
    summary="Restart the model's online drift detector (admin key)",
    response_model=DriftStateResponse,
    responses=_DRIFT_RESPONSES,
)
async def model_drift_reset(name: str, request: Request) -> Response:
    state = get_state(request)
    require_admin(request.scope["headers"], state.admin_api_keys, state.api_keys)
    detector, version = _model_detector(state, name)
    detector.reset()
    return json_response({"model": name, "version": version, **detector.state()})


@router.post(
    "/ensembles/{name}/drift/reset",
    summary="Restart the ensemble's online drift detector (admin key)",
    response_model=DriftStateResponse,
    responses=_DRIFT_RESPONSES,
)
async def ensemble_drift_reset(name: str, request: Request) -> Response:
    state = get_state(request)
    require_admin(request.scope["headers"], state.admin_api_keys, state.api_keys)
    detector = _ensemble_detector(state, name)
    detector.reset()
    return json_response({"ensemble": name, **detector.state()})
