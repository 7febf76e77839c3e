"""The combined verdict over real HTTP: ensembles under `<repository>/_ensembles` (issue 6 §2).

The repository here holds copies of the two small test models and three ensembles over them:
`a-stale` (a member version that is not served: listed as stale, never used), `both` (valid) and
`broken` (unreadable JSON: failed). The valid ensemble's calibration comes from the two members'
calibration reference scores through the training side's `combine_members` (the two models were
calibrated on different images of the same count, so the pairing is artificial; the service only
needs a well-formed calibration, and the tests check the arithmetic against `combined_verdict`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.artifact import (
    Calibration,
    EnsembleManifest,
    EnsembleMember,
    ensemble_path,
    load_manifest,
    write_ensemble,
)
from models.scores import combine_p_values, combined_verdict, leave_one_out_p_values
from service.schemas import ModelList, MultiModelScores
from service.state import registry_for
from tests.service.helpers import GREY_MODEL, RGB_MODEL, Server, b64, base_settings, running_server
from training.ensemble import RULE_DEFINITIONS

ENSEMBLE = "both"
STALE = "a-stale"  # sorts before ENSEMBLE: selection must skip it


def _member(version_dir: Path, version: int | None = None) -> EnsembleMember:
    m = load_manifest(version_dir)
    return EnsembleMember(name=m.name, version=version or m.version, kind=m.kind, statistic=m.score.statistic)


@pytest.fixture(scope="module")
def ens_repository(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("ensembles") / "repository"
    for name, version_dir in artifacts.items():
        shutil.copytree(version_dir, repository / name / version_dir.name)
    grey, rgb = (load_manifest(artifacts[n]) for n in (GREY_MODEL, RGB_MODEL))
    refs = [np.asarray(m.calibration.reference_scores) for m in (grey, rgb)]
    n = min(len(r) for r in refs)  # any in-distribution p-values will do for a fixture
    reference = np.sort(combine_p_values(np.stack([leave_one_out_p_values(r)[:n] for r in refs]), "fisher"))
    threshold = float(np.quantile(reference, 0.95))
    calibration = Calibration(
        target_fpr=0.05,
        threshold=threshold,
        validation_set="calibration",
        validation_size=len(reference),
        validation_fpr=float(np.mean(reference > threshold)),
        reference_scores=reference.tolist(),
    )
    members = [_member(artifacts[GREY_MODEL]), _member(artifacts[RGB_MODEL])]
    for name, listed in (
        (ENSEMBLE, members),
        (STALE, [_member(artifacts[GREY_MODEL], version=7), members[1]]),
    ):
        write_ensemble(
            repository,
            EnsembleManifest(
                name=name,
                rule="fisher",
                rule_definition=RULE_DEFINITIONS["fisher"],
                members=listed,
                calibration=calibration,
            ),
        )
    ensemble_path(repository, "broken").write_text("{not json")
    return repository


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
