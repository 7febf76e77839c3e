"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time.

With no key configured (`OODFLOW_API_KEYS` / `OODFLOW_API_KEY_FILE`) every request is let in.
Health and metrics stay open unless `protect_health_and_metrics` is set.
"""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthorized

__all__ = ["key_matches", "require_api_key", "require_api_key_if_protected"]

_bearer = HTTPBearer(auto_error=False, description="an API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")
_BEARER = Security(_bearer)
_HEADER = Security(_header)


def key_matches(given: str, keys: list[bytes]) -> bool:
    """True if `given` equals one of `keys`; every key is compared, each in constant time."""
    candidate = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


def _check(request: Request, bearer: HTTPAuthorizationCredentials | None, header: str | None) -> None:
    keys: list[bytes] = request.app.state.service.api_keys
    if not keys:
        return
    given = header if header else (bearer.credentials if bearer is not None else None)
    if not given:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if not key_matches(given, keys):
        raise Unauthorized("invalid API key")


async def require_api_key(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = _BEARER,
    header: str | None = _HEADER,
) -> None:
    _check(request, bearer, header)


async def require_api_key_if_protected(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = _BEARER,
    header: str | None = _HEADER,
) -> None:
    if request.app.state.service.settings.protect_health_and_metrics:
        _check(request, bearer, header)
