"""Fixtures: real small artifacts (built once per session) and a real HTTP server on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.artifacts import GREY_MODEL, build_small_artifacts, fashion_mnist_images, photo_patches
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
