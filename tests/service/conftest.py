"""Fixtures: real small artifacts (built once per session) and a real HTTP server on a free port."""

from __future__ import annotations

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
from models.scores import combine_p_values, leave_one_out_p_values
from tests.artifacts import GREY_MODEL, RGB_MODEL, build_small_artifacts, fashion_mnist_images, photo_patches
from tests.service.helpers import Server, base_settings, running_server


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two small real artifacts (built once): name -> version folder."""
    return build_small_artifacts(tmp_path_factory.mktemp("artifacts") / "repository")


@pytest.fixture(scope="session")
def repository(artifacts: dict[str, Path]) -> Path:
    return artifacts[GREY_MODEL].parent.parent


@pytest.fixture(scope="session")
def grey_images() -> np.ndarray:
    """`(8, 28, 28)` uint8 real Fashion-MNIST test images."""
    return fashion_mnist_images(8, seed=7, split="test")[:, 0]


@pytest.fixture(scope="session")
def rgb_images() -> np.ndarray:
    """`(6, 32, 32, 3)` uint8 real photo crops."""
    return photo_patches(6, seed=11).transpose(0, 2, 3, 1).copy()


@pytest.fixture(scope="session")
def service(repository: Path) -> Iterator[Server]:
    """The service on the two good models; waits until both are loaded."""
    with running_server(base_settings(repository)) as server:
        yield server


ENSEMBLE = "both"
STALE = "a-stale"  # sorts before ENSEMBLE: selection must skip it


def _member(version_dir: Path, version: int | None = None) -> EnsembleMember:
    m = load_manifest(version_dir)
    return EnsembleMember(name=m.name, version=version or m.version, kind=m.kind, statistic=m.score.statistic)


@pytest.fixture(scope="session")
def ens_repository(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the two test models and three ensembles over them: `both` (valid), `a-stale` (a
    member version that is not served) and `broken` (unreadable JSON)."""
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
                rule_definition="fisher",
                members=listed,
                calibration=calibration,
            ),
        )
    ensemble_path(repository, "broken").write_text("{not json")
    return repository
