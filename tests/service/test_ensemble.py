"""The combined verdict over real HTTP: ensembles under `<repository>/_ensembles` (issue 6 §2).

The repository here holds copies of the two small test models and three ensembles over them:
`a-stale` (a member version that is not served: listed as stale, never used), `both` (valid) and
`broken` (unreadable JSON: failed), written by the `ens_repository` fixture (conftest.py). The
valid ensemble's calibration comes from the two members' leave-one-out reference p-values (the two
models were calibrated on different images, so the pairing is artificial; the service only needs a
well-formed calibration, and the tests check the arithmetic against `combined_verdict`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.artifact import EnsembleManifest, ensemble_path
from models.scores import combined_verdict
from service.schemas import ModelList, MultiModelScores
from service.state import registry_for
from tests.service.conftest import ENSEMBLE, STALE
from tests.service.helpers import GREY_MODEL, RGB_MODEL, Server, b64, base_settings, running_server


@pytest.fixture(scope="module")
def ens_service(ens_repository: Path) -> Iterator[Server]:
    with running_server(base_settings(ens_repository)) as server:
        yield server


def _grey_body(images: np.ndarray) -> dict:
    return {"array": {"b64": b64(np.ascontiguousarray(images).tobytes()), "shape": list(images.shape)}}


def test_discovery_skips_underscore_folders_silently(
    ens_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = registry_for(base_settings(ens_repository))
    with caplog.at_level(logging.WARNING):
        entries = registry.discover()
    assert sorted(e.name for e in entries) == [GREY_MODEL, RGB_MODEL]
    assert not [r for r in caplog.records if r.name == "service.core.registry"]
    assert sorted(registry.ensembles) == [STALE, ENSEMBLE, "broken"]
    assert all(e.status in ("loading", "failed") for e in registry.ensembles.values())


def test_models_list_shows_ensembles(ens_service: Server) -> None:
    body = ens_service.client.get("/v1/models").json()
    ModelList.model_validate(body)
    assert sorted(m["name"] for m in body["models"]) == [GREY_MODEL, RGB_MODEL]
    ensembles = {e["name"]: e for e in body["ensembles"]}
    assert list(ensembles) == [STALE, ENSEMBLE, "broken"]
    valid = ensembles[ENSEMBLE]
    assert valid["status"] == "valid" and valid["reason"] is None
    assert valid["rule"] == "fisher" and valid["target_fpr"] == 0.05
    assert [m["name"] for m in valid["members"]] == [GREY_MODEL, RGB_MODEL]
    stale = ensembles[STALE]
    assert stale["status"] == "stale"
    assert GREY_MODEL in stale["reason"] and "version 7" in stale["reason"]
    assert ensembles["broken"]["status"] == "failed" and ensembles["broken"]["members"] == []


def test_combined_verdict_with_both_models(ens_service: Server, grey_images: np.ndarray) -> None:
    response = ens_service.client.post(
        "/v1/score",
        json=_grey_body(grey_images),
        params={"models": f"{RGB_MODEL},{GREY_MODEL}", "resize": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    MultiModelScores.model_validate(body)
    combined = body["combined"]
    assert combined["ensemble"] == ENSEMBLE  # the stale one sorts first but is skipped
    assert combined["members"] == [{"name": GREY_MODEL, "version": 1}, {"name": RGB_MODEL, "version": 1}]
    assert combined["rule"] == "fisher" and combined["target_fpr"] == 0.05
    repository = Path(ens_service.state.settings.model_repository)
    manifest = EnsembleManifest.model_validate_json(ensemble_path(repository, ENSEMBLE).read_text())
    assert combined["threshold"] == manifest.calibration.threshold
    by_model = {g["model"]: g["results"] for g in body["models"]}
    ps = [np.array([r["p_value"] for r in by_model[m.name]]) for m in manifest.members]
    score, p, is_ood = combined_verdict(
        ps, "fisher", manifest.calibration.threshold, np.asarray(manifest.calibration.reference_scores)
    )
    results = combined["results"]
    assert len(results) == len(grey_images)
    np.testing.assert_allclose([r["combined_score"] for r in results], score, rtol=1e-12)
    np.testing.assert_allclose([r["p_value"] for r in results], p, rtol=1e-12)
    assert [r["is_ood"] for r in results] == is_ood.tolist()
    # the default (every ready model) applies it too
    every = ens_service.client.post("/v1/score", json=_grey_body(grey_images), params={"resize": True})
    assert every.json()["combined"]["results"] == results


def test_combined_is_null_with_one_model(ens_service: Server, grey_images: np.ndarray) -> None:
    response = ens_service.client.post(
        "/v1/score", json=_grey_body(grey_images[:2]), params={"models": GREY_MODEL}
    )
    assert response.status_code == 200, response.text
    assert response.json()["combined"] is None


def test_openapi_documents_the_combined_verdict(ens_service: Server) -> None:
    schemas = ens_service.client.get("/openapi.json").json()["components"]["schemas"]
    assert "combined" in schemas["MultiModelScores"]["properties"]
    assert {"CombinedVerdict", "CombinedResult", "EnsembleSummary"} <= set(schemas)
