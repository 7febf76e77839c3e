"""A weighted ensemble (Fisher with member weights) at every front door: `GET /v1/models` and the
`/v1/score` combined block show the weights, the combined scores are `combined_verdict` with those
weights (and not the equal-weight ones), and `oodflow score-batch` gives the very same combined
rows as the HTTP service for the same image files."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models.artifact import EnsembleManifest, load_manifest
from models.scores import combine_p_values, combined_verdict, leave_one_out_p_values, threshold_at_fpr
from service.batch import score_batch
from service.schemas import ModelList, MultiModelScores
from tests.artifacts import fashion_mnist_images, write_test_ensemble
from tests.service.helpers import GREY_MODEL, RGB_MODEL, Server, base_settings, running_server

NAME = "weighted"
WEIGHTS = [0.25, 1.0]  # the grey member counts a quarter


@pytest.fixture(scope="module")
def weighted_repository(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the two test models and one weighted ensemble over them, calibrated with its weights
    (on the members' leave-one-out reference p-values: the service needs a well-formed calibration,
    the tests check the arithmetic)."""
    repository = tmp_path_factory.mktemp("weighted") / "repository"
    for version_dir in artifacts.values():
        shutil.copytree(version_dir, repository / version_dir.parent.name / version_dir.name)
    manifests = [load_manifest(artifacts[n]) for n in (GREY_MODEL, RGB_MODEL)]
    refs = [np.asarray(m.calibration.reference_scores) for m in manifests]
    n = min(len(r) for r in refs)
    reference = np.sort(
        combine_p_values(np.stack([leave_one_out_p_values(r)[:n] for r in refs]), "fisher", WEIGHTS)
    )
    threshold = threshold_at_fpr(reference, 0.05)
    write_test_ensemble(
        repository,
        NAME,
        manifests,
        reference,
        threshold,
        validation_set="leave-one-out p-values of the members' references (test fixture)",
        weights=WEIGHTS,
    )
    return repository


@pytest.fixture(scope="module")
def weighted_service(weighted_repository: Path) -> Iterator[Server]:
    with running_server(base_settings(weighted_repository)) as server:
        yield server


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """12 real Fashion-MNIST test images as PNG files, written to a folder: name -> bytes."""
    folder = tmp_path_factory.mktemp("weighted-images")
    files = {}
    for i, image in enumerate(fashion_mnist_images(12, seed=5, split="test")[:, 0]):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files[str(folder / f"fm{i:02d}.png")] = buffer.getvalue()
        (folder / f"fm{i:02d}.png").write_bytes(buffer.getvalue())
    return files


def test_http_and_score_batch_give_the_same_weighted_verdict(
    weighted_service: Server, weighted_repository: Path, image_files: dict[str, bytes], tmp_path: Path
) -> None:
    listed = weighted_service.client.get("/v1/models").json()
    ModelList.model_validate(listed)
    (summary,) = [e for e in listed["ensembles"] if e["name"] == NAME]
    assert summary["status"] == "valid" and summary["weights"] == WEIGHTS

    names = sorted(image_files)
    response = weighted_service.client.post(
        "/v1/score",
        params={"models": f"{GREY_MODEL},{RGB_MODEL}", "resize": "true"},
        files=[("images", (Path(n).name, image_files[n])) for n in names],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    MultiModelScores.model_validate(body)
    combined = body["combined"]
    assert combined["ensemble"] == NAME and combined["weights"] == WEIGHTS
    by_model = {g["model"]: g["results"] for g in body["models"]}
    ps = [np.array([r["p_value"] for r in by_model[m]]) for m in (GREY_MODEL, RGB_MODEL)]
    manifest = EnsembleManifest.model_validate_json(
        (weighted_repository / "_ensembles" / f"{NAME}.json").read_text()
    )
    reference = np.asarray(manifest.calibration.reference_scores)
    score, p, is_ood = combined_verdict(ps, "fisher", manifest.calibration.threshold, reference, WEIGHTS)
    http_scores = np.array([r["combined_score"] for r in combined["results"]])
    np.testing.assert_allclose(http_scores, score, rtol=1e-12)
    np.testing.assert_allclose([r["p_value"] for r in combined["results"]], p, rtol=1e-12)
    assert [r["is_ood"] for r in combined["results"]] == is_ood.tolist()
    equal, _, _ = combined_verdict(ps, "fisher", manifest.calibration.threshold, reference)
    assert not np.allclose(http_scores, equal)  # the weights were used, not ignored

    output = tmp_path / "scores.parquet"
    result = score_batch(
        [Path(names[0]).parent],
        output,
        [GREY_MODEL, RGB_MODEL],
        repository=weighted_repository,
        resize=True,
        progress=False,
    )
    assert result["ensembles"][NAME]["status"] == "valid"
    rows = {r["source"]: r for r in pq.read_table(output).to_pylist() if r["model"] == f"combined:{NAME}"}
    assert sorted(rows) == names
    for name, expected in zip(names, combined["results"], strict=True):
        row = rows[name]
        assert row["error"] == ""
        assert row["ood_score"] == expected["combined_score"]
        assert row["p_value"] == expected["p_value"] and row["is_ood"] == expected["is_ood"]
