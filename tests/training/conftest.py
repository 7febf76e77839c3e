"""Quick real runs (tiny models on small real subsets), built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_run_config
from training.pipeline import build_run


@pytest.fixture(scope="session")
def quick_repository(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train → calibrate → evaluate → export for a pixel and an embedding quick preset."""
    root = tmp_path_factory.mktemp("quick")
    repository = root / "repository"
    out: dict[str, Path] = {"repository": repository}
    for preset in ("fmnist-pixel-realnvp-quick", "fmnist-embedding-quick"):
        config = load_run_config(preset)
        out[preset] = build_run(config, root / "runs" / preset, repository, progress=False)
        out[preset + ":run"] = root / "runs" / preset
    return out
