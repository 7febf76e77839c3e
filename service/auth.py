"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time.

With no key configured (`OODFLOW_API_KEYS` / `OODFLOW_API_KEY_FILE`) every request is let in.
Health, readiness, metrics and `/v2` server metadata stay open unless `protect_health_and_metrics`
is set; the API documentation is always open. The check runs in the request middleware, before
routing, so a refused request costs next to nothing; the OpenAPI document declares both schemes.
"""

from __future__ import annotations

import hmac
from typing import Any

from service.settings import Settings

__all__ = [
    "DOC_PATHS",
    "HEALTH_PATHS",
    "add_security_to_openapi",
    "check_api_key",
    "key_matches",
    "needs_key",
]

HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready"})
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def key_matches(given: str | bytes, keys: list[bytes]) -> bool:
    """True if `given` equals one of `keys`; every key is compared, each in constant time."""
    candidate = given.encode() if isinstance(given, str) else given
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


def needs_key(path: str, settings: Settings) -> bool:
    if path in DOC_PATHS:
        return False
    return settings.protect_health_and_metrics or path not in HEALTH_PATHS


def check_api_key(headers: list[tuple[bytes, bytes]], keys: list[bytes]) -> str | None:
    """None if the request may pass, else why not (for the 401 message). `headers`: ASGI raw."""
    if not keys:
        return None
    given: bytes | None = None
    for name, value in headers:
        if name == b"x-api-key":
            given = value.strip()
            break
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            given = value[7:].strip()
    if not given:
        return "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    if not key_matches(given, keys):
        return "invalid API key"
    return None


def add_security_to_openapi(schema: dict[str, Any], settings: Settings) -> None:
    """Declare the two key schemes and, when keys are configured, require one on protected paths."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": "an API key as a bearer token"}
    schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "an API key"}
    if not (settings.api_keys or settings.api_key_file):
        return
    for path, operations in schema.get("paths", {}).items():
        if not needs_key(path, settings):
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            operation.setdefault("responses", {}).setdefault(
                "401",
                {
                    "description": "missing or invalid API key",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                },
            )
