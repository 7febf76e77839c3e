"""KServe v2 / Open Inference Protocol, with the binary tensor data extension (`tritonclient.http`).

Input `images`: UINT8 `[N, H, W]` / `[N, H, W, C]`, or BYTES `[N]` of encoded image files (base64
strings in JSON; raw in binary data). Request parameter `resize` (bool) as in v1.
Outputs: `log_likelihood`, `bits_per_dim`, `ood_score`, `p_value` (FP32) and `is_ood` (BOOL), each
`[N]`; as JSON data, or binary when asked (`binary_data` per output or `binary_data_output`).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.core import Scores, ServedModel, UnknownModel
from service.errors import BadRequest, ModelNotFound, error_response
from service.parsing import parse_infer_body, read_body
from service.routes.common import ERROR_RESPONSES, get_state, json_response, unless_disconnected
from service.schemas import InferRequest, InferResponse, V2ModelMetadata, V2ServerMetadata
from service.scoring import ModelOutcome, decode_payload, score_model

__all__ = ["OUTPUTS", "router"]

OUTPUTS: dict[str, tuple[str, Callable[[Scores], np.ndarray]]] = {
    "log_likelihood": ("FP32", lambda s: s.log_likelihood.astype(np.float32)),
    "bits_per_dim": ("FP32", lambda s: s.bits_per_dim.astype(np.float32)),
    "ood_score": ("FP32", lambda s: s.ood_score.astype(np.float32)),
    "p_value": ("FP32", lambda s: s.p_value.astype(np.float32)),
    "is_ood": ("BOOL", lambda s: s.is_ood.astype(np.bool_)),
}
_PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}

router = APIRouter(prefix="/v2", tags=["v2 (KServe Open Inference Protocol)"])


def _server_version() -> str:
    try:
        return package_version("oodflow")
    except PackageNotFoundError:
        return "0"


@router.get("", response_model=V2ServerMetadata, summary="Server metadata")
async def server_metadata() -> Response:
    return json_response(
        {"name": "oodflow", "version": _server_version(), "extensions": ["binary_tensor_data"]}
    )


@router.get("/health/live", summary="Server live")
async def live() -> Response:
    return json_response({"live": True})


@router.get(
    "/health/ready",
    summary="Server ready (every model loaded)",
    responses={503: ERROR_RESPONSES[503]},
)
async def ready(request: Request) -> Response:
    is_ready, models = get_state(request).readiness()
    if not is_ready:
        return error_response(503, "not_ready", f"not ready: {models}", {"Retry-After": "1"}, "/v2")
    return json_response({"ready": True})


def _served(request: Request, name: str, version: str | None) -> ServedModel:
    try:
        return get_state(request).registry.get(name, version)
    except UnknownModel as exc:
        raise ModelNotFound(str(exc)) from None


def _metadata(request: Request, served: ServedModel) -> dict[str, object]:
    model, _ = get_state(request).require_ready(served)
    manifest = model.manifest
    spec = manifest.input
    shape = (
        [-1, spec.height, spec.width] if spec.channels == 1 else [-1, spec.height, spec.width, spec.channels]
    )
    return {
        "name": served.name,
        "versions": [str(v) for v in get_state(request).registry.serving_versions(served.name)],
        "platform": _PLATFORMS.get(model.scorer.runtime, model.scorer.runtime),
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": shape}],
        "outputs": [{"name": name, "datatype": dt, "shape": [-1]} for name, (dt, _) in OUTPUTS.items()],
        "parameters": {
            "kind": manifest.kind,
            "statistic": manifest.score.statistic,
            "threshold": manifest.calibration.threshold,
            "images_alternatives": "UINT8 [N, H, W, C] with C 1 or 3; BYTES [N] of encoded image files",
        },
    }


@router.get(
    "/models/{name}",
    response_model=V2ModelMetadata,
    summary="Model metadata",
    responses=ERROR_RESPONSES,
)
async def model_metadata(name: str, request: Request) -> Response:
    return json_response(_metadata(request, _served(request, name, None)))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=V2ModelMetadata,
    summary="Model metadata",
    responses=ERROR_RESPONSES,
)
async def model_version_metadata(name: str, version: str, request: Request) -> Response:
    return json_response(_metadata(request, _served(request, name, version)))


def _ready_response(served: ServedModel) -> Response:
    if served.status != "ready":
        reason = served.reason or "loading"
        message = f"model '{served.name}' is {served.status}: {reason}"
        return error_response(503, "not_ready", message, path="/v2")
    return json_response({"name": served.name, "ready": True})


@router.get("/models/{name}/ready", summary="Model ready", responses=ERROR_RESPONSES)
async def model_ready(name: str, request: Request) -> Response:
    return _ready_response(_served(request, name, None))


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model ready",
    responses=ERROR_RESPONSES,
)
async def model_version_ready(name: str, version: str, request: Request) -> Response:
    return _ready_response(_served(request, name, version))


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "Open Inference Protocol JSON; with the header Inference-Header-Content-Length, "
        "the JSON is followed by binary tensor data",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _requested_outputs(request: InferRequest) -> list[tuple[str, bool]]:
    binary_default = bool((request.parameters or {}).get("binary_data_output", False))
    if not request.outputs:
        return [(name, binary_default) for name in OUTPUTS]
    chosen = []
    for out in request.outputs:
        if out.name not in OUTPUTS:
            raise BadRequest(
                f"unknown output '{out.name}' (outputs: {', '.join(OUTPUTS)})", code="bad_tensor"
            )
        chosen.append((out.name, bool((out.parameters or {}).get("binary_data", binary_default))))
    return chosen


def _infer_response(
    request: InferRequest, outcome: ModelOutcome, outputs: list[tuple[str, bool]]
) -> Response:
    entries: list[dict[str, object]] = []
    blobs: list[bytes] = []
    n = len(outcome.resized)
    for name, binary in outputs:
        datatype, get = OUTPUTS[name]
        values = get(outcome.scores)
        entry: dict[str, object] = {"name": name, "datatype": datatype, "shape": [n]}
        if binary:
            raw = values.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = values.tolist()
        entries.append(entry)
    body: dict[str, object] = {
        "model_name": outcome.manifest.name,
        "model_version": str(outcome.manifest.version),
    }
    if request.id is not None:
        body["id"] = request.id
    if any(outcome.resized):
        body["parameters"] = {"resized": list(outcome.resized)}
    body["outputs"] = entries
    header = orjson.dumps(body)
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


async def _infer(request: Request, name: str, version: str | None) -> Response:
    state = get_state(request)
    served = _served(request, name, version)
    get_state(request).require_ready(served)
    body = await read_body(request, state.settings)
    infer_request, payload = parse_infer_body(body, request.headers, state.settings)
    outputs = _requested_outputs(infer_request)
    resize = (infer_request.parameters or {}).get("resize", False)
    if not isinstance(resize, bool):
        raise BadRequest("parameter 'resize' must be a boolean")

    async def work() -> ModelOutcome:
        return await score_model(state, served, await decode_payload(state, payload), resize)

    outcome = await unless_disconnected(request, work())
    return _infer_response(infer_request, outcome, outputs)


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    summary="Score images (Open Inference Protocol)",
    responses=ERROR_RESPONSES,
    openapi_extra=_INFER_BODY,
)
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=InferResponse,
    summary="Score images with a given model version (Open Inference Protocol)",
    responses=ERROR_RESPONSES,
    openapi_extra=_INFER_BODY,
)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, version)
