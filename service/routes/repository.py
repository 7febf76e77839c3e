"""Repository control in the Open Inference Protocol's model-repository shapes (DESIGN §6), admin key.

- `GET|POST /v2/repository/index`: one entry per model version, `{name, version, state, reason}`;
  state `READY`, `LOADING`, `UNLOADING` (draining the requests it admitted) or `UNAVAILABLE` (the
  reason says why: refused and what failed, unloaded by request, or not chosen by the version
  policy). POST takes the protocol's optional `{"ready": true}` to list only what serves.
- `POST /v2/repository/models/{name}/load`: bring the model in line with its folders under the
  version policy (`OODFLOW_VERSION_POLICY`): verify, load and warm each wanted version not yet
  serving (newest first), switch new requests to it, then drain and unload the versions no longer
  wanted. Answers when the new version serves (or was refused: 400 with the reason, and what
  still serves). Also forgets an earlier unload of the model, and retries refused versions.
- `POST /v2/repository/models/{name}/unload`: stop serving the model, or, with
  `{"parameters": {"version": V}}`, one version: the policy's next choice among the other versions
  loads first (unloading the newest version rolls back to the one before, without a gap). Polling
  leaves what was unloaded alone until a load by request.

Every route needs an admin API key (`OODFLOW_ADMIN_API_KEYS` / `--admin-key`): 401 without one,
403 with a scoring key, 403 when no admin key is configured at all (loading code into a server is
never open by default).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.drift import Forbidden, require_admin
from service.errors import BadRequest, ModelNotFound, ServiceError
from service.parsing import read_body
from service.routes.common import ERROR_RESPONSES, get_state, json_response
from service.state import ServiceState, SyncResult

__all__ = ["router"]

router = APIRouter(prefix="/v2/repository", tags=["v2 repository control (admin key)"])

_STATES = {
    "ready": "READY",
    "loading": "LOADING",
    "unloading": "UNLOADING",
    "refused": "UNAVAILABLE",
    "unloaded": "UNAVAILABLE",
    "available": "UNAVAILABLE",
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**ERROR_RESPONSES[400], "description": "bad body, or the new version was refused (reason given)"},
    401: ERROR_RESPONSES[401],
    403: {"description": "needs an admin API key (OODFLOW_ADMIN_API_KEYS)"},
    404: ERROR_RESPONSES[404],
}


class LoadRefused(ServiceError):
    """Every version the policy wanted was refused; what served before still serves."""

    status_code = 400
    code = "load_refused"


def _admin(request: Request) -> ServiceState:
    state = get_state(request)
    if not state.admin_api_keys:
        raise Forbidden(
            "repository control needs an admin API key, and none is configured "
            "(OODFLOW_ADMIN_API_KEYS or serve --admin-key)"
        )
    require_admin(request.scope["headers"], state.admin_api_keys, state.api_keys)
    return state


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, get_state(request).settings)
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


async def _parameters(request: Request) -> dict[str, Any]:
    """The body's optional `parameters` object (KServe repository extension), `{}` when absent."""
    parameters = (await _json_body(request)).get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be an object")
    return parameters


def _index(state: ServiceState, ready_only: bool) -> list[dict[str, Any]]:
    rows = [
        {
            "name": row["name"],
            "version": "" if row["version"] is None else str(row["version"]),
            "state": _STATES[row["state"]],
            "reason": row["reason"] or "",
        }
        for row in state.registry.index()
    ]
    return [r for r in rows if r["state"] == "READY"] if ready_only else rows


@router.get("/index", summary="Every model version: state and reason (admin key)", responses=_RESPONSES)
async def index_get(request: Request) -> Response:
    return json_response(_index(_admin(request), False))


@router.post("/index", summary="Every model version: state and reason (admin key)", responses=_RESPONSES)
async def index_post(request: Request) -> Response:
    state = _admin(request)
    ready = (await _json_body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest("'ready' must be a boolean")
    return json_response(_index(state, ready))


def _known(state: ServiceState, name: str) -> None:
    registry = state.registry
    if name not in registry.models and name not in registry.repository_names():
        known = ", ".join(sorted(set(registry.models) | set(registry.repository_names()))) or "none"
        raise ModelNotFound(f"no model named '{name}' in the repository (models: {known})")
    if registry.requested and name not in registry.model_names():
        raise ModelNotFound(f"model '{name}' is not among the models this server serves (OODFLOW_MODELS)")


def _sync_body(result: SyncResult) -> dict[str, Any]:
    return {
        "name": result.name,
        "loaded": [str(v) for v in result.loaded],
        "refused": [{"version": str(v), "reason": r} for v, r in result.refused],
        "unloading": [str(v) for v in result.retired],
        "serving": [str(v) for v in result.serving],
        "seconds": round(result.seconds, 3),
    }


@router.post(
    "/models/{name}/load",
    summary="Load the model's wanted versions, swap new requests to them, unload the old (admin key)",
    responses=_RESPONSES,
)
async def load(name: str, request: Request) -> Response:
    state = _admin(request)
    parameters = await _parameters(request)
    overrides = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
    if overrides:
        raise BadRequest(
            f"parameter '{overrides[0]}' is not supported: a load serves what the version folders "
            "hold (copy a complete version folder in, then load)"
        )
    _known(state, name)
    result = await state.sync_model(name, explicit=True)
    if not (result.loaded or result.refused or result.serving):
        raise ModelNotFound(
            f"model '{name}' has no version folder to load under {state.registry.repository / name}"
        )
    if result.refused and not result.loaded:
        serving = ", ".join(map(str, result.serving))
        still = f"; still serving version {serving}" if serving else "; no version serves"
        reasons = "; ".join(f"version {v}: {r}" for v, r in result.refused)
        raise LoadRefused(f"model '{name}': {reasons}{still}")
    return json_response(_sync_body(result))


@router.post(
    "/models/{name}/unload",
    summary="Stop serving the model, or one version (admin key); it drains first",
    responses=_RESPONSES,
)
async def unload(name: str, request: Request) -> Response:
    state = _admin(request)
    parameters = await _parameters(request)
    unknown = sorted(set(parameters) - {"version", "unload_dependents"})
    if unknown:
        raise BadRequest(f"unknown parameter '{unknown[0]}' (parameters: version, unload_dependents)")
    version: int | None = None
    raw = parameters.get("version")
    if raw is not None:
        text = str(raw).strip()
        if isinstance(raw, bool) or not text.isdigit() or int(text) < 1:
            raise BadRequest(f"parameter 'version' must be a positive integer, got {raw!r}")
        version = int(text)
        if version not in state.registry.serving_versions(name):
            _known(state, name)
            listed = ", ".join(map(str, state.registry.serving_versions(name))) or "none"
            raise ModelNotFound(f"model '{name}' has no version {version} serving (serving: {listed})")
    if name not in state.registry.models:
        _known(state, name)
    result = await state.unload_model(name, version)
    return json_response(_sync_body(result))
