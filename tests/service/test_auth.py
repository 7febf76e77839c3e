"""API keys: Bearer or X-API-Key, from settings or a key file; health and metrics open unless told."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.auth import key_matches
from tests.service.helpers import GREY_MODEL, b64, base_settings, running_server

BODY = {"array": {"b64": b64(bytes(784)), "shape": [1, 28, 28]}}


def test_keys_from_settings_and_file(repository: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# one key per line\nfile-key\n\n")
    settings = base_settings(repository, api_keys="env-key, second-key", api_key_file=key_file)
    with running_server(settings) as server:
        c = server.client
        missing = c.post(f"/v1/models/{GREY_MODEL}/score", json=BODY)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = c.post(f"/v1/models/{GREY_MODEL}/score", json=BODY, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
        for headers in (
            {"Authorization": "Bearer env-key"},
            {"Authorization": "Bearer second-key"},
            {"X-API-Key": "file-key"},
        ):
            assert c.post(f"/v1/models/{GREY_MODEL}/score", json=BODY, headers=headers).status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get(f"/v2/models/{GREY_MODEL}").status_code == 401
        assert c.get(f"/v2/models/{GREY_MODEL}", headers={"X-API-Key": "env-key"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2"):
            assert c.get(open_path).status_code == 200, open_path
        assert c.get("/openapi.json").status_code == 200  # the documentation stays open
        v2 = c.get(f"/v2/models/{GREY_MODEL}")
        assert (
            v2.status_code == 401
            and v2.json()["error"] == "invalid API key"
            or "missing" in v2.json()["error"]
        )
        schema = c.get("/openapi.json").json()
        assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        score_op = schema["paths"]["/v1/models/{name}/score"]["post"]
        assert score_op["security"] == [{"bearer": []}, {"apiKey": []}] and "401" in score_op["responses"]
        assert "security" not in schema["paths"]["/healthz"]["get"]


def test_protected_health_and_metrics(repository: Path) -> None:
    with running_server(base_settings(repository, api_keys="k", protect_health_and_metrics=True)) as server:
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready", "/v2"):
            assert server.client.get(path).status_code == 401, path
            assert server.client.get(path, headers={"Authorization": "Bearer k"}).status_code == 200, path


@pytest.mark.parametrize(
    ("given", "ok"), [("a", True), ("b", True), ("c", False), ("", False), ("aa", False)]
)
def test_key_matches(given: str, ok: bool) -> None:
    assert key_matches(given, [b"a", b"b"]) is ok
