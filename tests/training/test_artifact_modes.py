"""Artifacts a container can read (issue 9 §5).

The exporter stages a version folder in `tempfile.mkdtemp` (0700) and safetensors writes 0600;
published artifacts and ensemble manifests must nevertheless be folders 0755 and files 0644, so
that the service running as another uid (10001 in deploy/Dockerfile and docker-compose.yml, over
a bind-mounted repository) can enter, read and verify them. The artifacts here are real: trained,
calibrated and exported by the production exporter, under a umask of 077 so that nothing passes
by the writer's umask.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydantic
import pytest

from models.artifact import (
    DIR_MODE,
    FILE_MODE,
    Calibration,
    EnsembleManifest,
    EnsembleMember,
    load_manifest,
    mkdir_readable,
    set_readable_modes,
    verify_artifact,
    write_ensemble,
)
from tests.artifacts import GREY_MODEL, RGB_MODEL, build_small_artifacts

ROOT = Path(__file__).resolve().parents[2]
OTHER_UID = 10001  # the service's uid in deploy/Dockerfile and docker-compose.yml


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _modes_below(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix() or ".": _mode(p) for p in [folder, *folder.rglob("*")]}


@pytest.fixture(scope="module")
def repository() -> Iterator[Path]:
    """A repository built under umask 077, in a folder other users may enter (as a bind mount is)."""
    with tempfile.TemporaryDirectory(prefix="oodflow-modes-") as top:
        os.chmod(top, 0o755)  # mkdtemp makes 0700; the mount point itself is the operator's choice
        repo = Path(top) / "model-repository"
        repo.mkdir()  # the operator's folder; export creates `<name>/` and `<version>/` in it
        old = os.umask(0o077)
        try:
            versions = build_small_artifacts(repo)
            reference = sorted(np.random.default_rng(0).chisquare(4, 200).tolist())
            write_ensemble(
                repo,
                EnsembleManifest(
                    name="tiny-pair",
                    rule="fisher",
                    rule_definition="Fisher's method over the members' p-values",
                    members=[
                        EnsembleMember(name=GREY_MODEL, version=1, kind="pixel", statistic="nll"),
                        EnsembleMember(name=RGB_MODEL, version=1, kind="pixel", statistic="typicality"),
                    ],
                    calibration=Calibration(
                        target_fpr=0.05,
                        threshold=float(np.quantile(reference, 0.95)),
                        validation_set="test",
                        validation_size=200,
                        validation_fpr=0.05,
                        reference_scores=reference,
                    ),
                ),
            )
        finally:
            os.umask(old)
        assert set(versions) == {GREY_MODEL, RGB_MODEL}
        yield repo


def test_exported_artifacts_have_readable_modes(repository: Path) -> None:
    for name in (GREY_MODEL, RGB_MODEL):
        version = repository / name / "1"
        verify_artifact(version)  # chmod changes no byte the manifest hashes
        files = set(load_manifest(version).files)
        assert {"model.onnx", "model.torchscript.pt", "weights.safetensors"} <= files
        modes = _modes_below(version)
        assert modes.pop(".") == DIR_MODE == 0o755
        assert set(modes) == files | {"manifest.json"}  # nothing but the artifact (no staging left)
        wrong = {rel: oct(mode) for rel, mode in modes.items() if mode != FILE_MODE}
        assert not wrong, f"{name}: files not 0644: {wrong}"
        assert _mode(repository / name) == DIR_MODE  # made by export under umask 077
    assert not [p for p in repository.rglob(".*")], "a staging folder or temporary file was left behind"


def test_ensemble_manifest_has_readable_modes(repository: Path) -> None:
    path = repository / "_ensembles" / "tiny-pair.json"
    assert _mode(path) == FILE_MODE == 0o644
    assert _mode(path.parent) == DIR_MODE


def test_set_readable_modes_walks_the_tree_and_leaves_links_alone(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the artifact")
    outside.chmod(0o600)
    version = tmp_path / "repo" / "m" / "1"
    (version / "report" / "figures").mkdir(parents=True)
    for rel in ("model.onnx", "report/report.md", "report/figures/roc.png"):
        (version / rel).write_bytes(b"x")
        (version / rel).chmod(0o600)
    for folder in (version / "report" / "figures", version / "report", version):
        folder.chmod(0o700)
    (version / "link").symlink_to(outside)
    set_readable_modes(version)
    modes = _modes_below(version)
    modes.pop("link")
    assert modes == {
        ".": 0o755,
        "model.onnx": 0o644,
        "report": 0o755,
        "report/report.md": 0o644,
        "report/figures": 0o755,
        "report/figures/roc.png": 0o644,
    }
    assert _mode(outside) == 0o600  # a link's target outside the folder is not touched


def test_mkdir_readable_ignores_the_umask_and_keeps_existing_modes(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o750)
    old = os.umask(0o077)
    try:
        mkdir_readable(existing / "a" / "b")
    finally:
        os.umask(old)
    assert _mode(existing) == 0o750
    assert _mode(existing / "a") == _mode(existing / "a" / "b") == 0o755


# ------------------------------------------------------------------------------- another uid


def _interpreter_for(uid: int) -> list[str]:
    """A Python the other uid may run, with this environment's packages on its path.

    The venv's interpreter may live under a home folder that uid cannot enter (/root is 0700);
    then the system's Python of the same minor version runs with our site-packages on PYTHONPATH.
    """
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"]
    for candidate in candidates:
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2])"],
                capture_output=True,
                text=True,
                user=uid,
                group=uid,
                extra_groups=[],
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            return [candidate]
    pytest.fail(f"no Python {sys.version_info[:2]} that uid {uid} can run among {candidates}")


def _run_as(uid: int, code: str) -> subprocess.CompletedProcess[str]:
    site_packages = Path(pydantic.__file__).resolve().parents[1]
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(site_packages)]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
    }
    return subprocess.run(
        [*_interpreter_for(uid), "-c", code],
        capture_output=True,
        text=True,
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
        env=env,
        timeout=300,
    )


_VERIFY = """
from pathlib import Path
from models.artifact import find_ensembles, find_versions, load_ensemble, verify_artifact
repository = Path({repository!r})
for name in {names!r}:
    versions = find_versions(repository, name)
    manifest = verify_artifact(repository / name / str(versions[-1]), required=("model.onnx", "weights.safetensors"))
    print(name, manifest.version, len(manifest.files))
for path in find_ensembles(repository):
    print("ensemble", load_ensemble(path).name)
"""


@pytest.fixture()
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(
            f"running a child as uid {OTHER_UID} needs root (subprocess user=); this runs as uid {os.geteuid()}"
        )


@pytest.mark.usefixtures("as_root")
def test_another_uid_reads_and_verifies_the_artifacts(repository: Path) -> None:
    code = _VERIFY.format(repository=str(repository), names=[GREY_MODEL, RGB_MODEL])
    result = _run_as(OTHER_UID, code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:3] == [f"{GREY_MODEL} 1 3", f"{RGB_MODEL} 1 3", "ensemble tiny-pair"]
    assert os.stat(repository / GREY_MODEL / "1" / "weights.safetensors").st_uid != OTHER_UID


@pytest.mark.usefixtures("as_root")
def test_the_other_uid_check_can_fail(repository: Path) -> None:
    """The same check fails on a private weights file, as on every artifact before issue 9."""
    weights = repository / GREY_MODEL / "1" / "weights.safetensors"
    weights.chmod(0o600)
    try:
        result = _run_as(OTHER_UID, _VERIFY.format(repository=str(repository), names=[GREY_MODEL]))
    finally:
        weights.chmod(FILE_MODE)
    assert result.returncode != 0
    assert "PermissionError" in result.stderr and "weights.safetensors" in result.stderr


_SERVE = """
from service.core import Registry
registry = Registry({repository!r})
registry.load_all()
for name in sorted(registry.models):
    entry = registry.models[name]
    print(name, entry.status, entry.reason)
"""


@pytest.mark.usefixtures("as_root")
def test_the_service_refuses_a_version_it_cannot_read_and_serves_the_rest(repository: Path) -> None:
    """A private version folder (as every export made before issue 9) is refused with the reason,
    never left 'loading'; the readable model serves."""
    folder = repository / GREY_MODEL / "1"
    folder.chmod(0o700)
    try:
        result = _run_as(OTHER_UID, _SERVE.format(repository=str(repository)))
    finally:
        folder.chmod(0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert lines[RGB_MODEL] == "ready None"
    assert lines[GREY_MODEL].startswith("failed ") and "Permission denied" in lines[GREY_MODEL]
