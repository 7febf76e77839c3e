"""Loading and refusing artifacts: tampered files, statistics the graph cannot serve, other runtimes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.artifact import ComplexitySpec, load_manifest
from models.scores import complexity_canary, png_bits_per_dim
from tests.service.helpers import (
    GREY_MODEL,
    RGB_MODEL,
    Server,
    b64,
    base_settings,
    copy_artifact,
    running_server,
)
from tests.service.test_api import direct_scores


@pytest.fixture(scope="module")
def mixed(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A repository with one good model and several bad ones, each refused for its own reason."""
    repository = tmp_path_factory.mktemp("mixed")
    copy_artifact(artifacts[GREY_MODEL], repository, GREY_MODEL)
    tampered = copy_artifact(artifacts[GREY_MODEL], repository, "tampered")
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte after export
    (tampered / "model.onnx").write_bytes(bytes(data))
    copy_artifact(artifacts[GREY_MODEL], repository, "ratio", statistic="likelihood_ratio")
    canary = complexity_canary()
    complexity = copy_artifact(
        artifacts[GREY_MODEL],
        repository,
        "complexity",
        statistic="complexity",
        complexity=ComplexitySpec(canary=canary),
    )
    assert load_manifest(complexity).score.statistic == "complexity"
    # Calibrated where the PNG encoder wrote one byte more for the busy texture: another zlib.
    doctored = {
        **canary,
        "png_bytes": [n + (i == 2) for i, n in enumerate(canary["png_bytes"])],
        "zlib": "9.9",
    }
    copy_artifact(
        artifacts[GREY_MODEL],
        repository,
        "other-zlib",
        statistic="complexity",
        complexity=ComplexitySpec(canary=doctored),
    )
    misnamed = copy_artifact(artifacts[RGB_MODEL], repository, "misnamed")
    (misnamed.parent.parent / "renamed").mkdir()
    misnamed.rename(misnamed.parent.parent / "renamed" / "1")
    (repository / "empty-folder").mkdir()
    with running_server(base_settings(repository)) as server:
        yield server


def test_tampered_and_unservable_models_are_refused_while_others_serve(
    mixed: Server, grey_images: np.ndarray
) -> None:
    models = {m["name"]: m for m in mixed.client.get("/v1/models").json()["models"]}
    assert set(models) == {GREY_MODEL, "tampered", "ratio", "complexity", "other-zlib", "renamed"}
    assert models[GREY_MODEL]["status"] == "ready"
    assert models["complexity"]["status"] == "ready"
    assert models["tampered"]["status"] == "failed"
    assert "sha256 mismatch" in models["tampered"]["reason"] and "model.onnx" in models["tampered"]["reason"]
    assert models["ratio"]["status"] == "failed"
    assert "background_log_likelihood" in models["ratio"]["reason"]
    assert models["renamed"]["status"] == "failed" and "misnamed" in models["renamed"]["reason"]
    assert models["other-zlib"]["status"] == "failed"
    assert (
        "compressor differs" in models["other-zlib"]["reason"]
        and "zlib 9.9" in models["other-zlib"]["reason"]
    )

    ready = mixed.client.get("/readyz")
    assert ready.status_code == 503
    assert set(ready.json()["models"]) == set(models) and "tampered" in ready.json()["error"]["message"]
    assert "compressor differs" in ready.json()["models"]["other-zlib"]
    assert mixed.client.get("/v2/health/ready").status_code == 503
    assert mixed.client.get("/v2/models/tampered/ready").status_code == 503

    body = {"array": {"b64": b64(grey_images[:2].tobytes()), "shape": [2, 28, 28]}}
    refused = mixed.client.post("/v1/models/tampered/score", json=body)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    assert "sha256" in refused.json()["error"]["message"]
    assert mixed.client.post(f"/v1/models/{GREY_MODEL}/score", json=body).status_code == 200
    # the multi-model default covers the models that serve
    served = mixed.client.post("/v1/score", json=body).json()["models"]
    assert sorted(g["model"] for g in served) == ["complexity", GREY_MODEL]


def test_complexity_statistic_uses_png_code_length(
    mixed: Server, artifacts: dict[str, Path], grey_images: np.ndarray
) -> None:
    body = {"array": {"b64": b64(grey_images.tobytes()), "shape": list(grey_images.shape)}}
    results = mixed.client.post("/v1/models/complexity/score", json=body).json()["results"]
    bits = direct_scores(artifacts[GREY_MODEL], grey_images[:, None])["bits_per_dim"]
    expected = bits - png_bits_per_dim(grey_images[:, None])
    np.testing.assert_allclose([r["ood_score"] for r in results], expected, rtol=1e-5)
    assert (
        png_bits_per_dim(np.zeros((1, 1, 28, 28), np.uint8))[0] < png_bits_per_dim(grey_images[:1, None])[0]
    )


def test_named_models_and_versions(repository: Path) -> None:
    settings = base_settings(repository, models=[f"{GREY_MODEL}:1", "absent", f"{RGB_MODEL}:9"])
    with running_server(settings) as server:
        models = {m["name"]: m for m in server.client.get("/v1/models").json()["models"]}
        assert models[GREY_MODEL]["status"] == "ready"
        assert models["absent"]["status"] == "failed" and "no versions" in models["absent"]["reason"]
        assert models[RGB_MODEL]["status"] == "failed" and "'9' not found" in models[RGB_MODEL]["reason"]


def test_torchscript_runtime_agrees_with_onnx(
    repository: Path, artifacts: dict[str, Path], rgb_images: np.ndarray
) -> None:
    with running_server(base_settings(repository, runtime="torchscript", device="cpu")) as server:
        assert server.client.get("/readyz").status_code == 200
        body = {"array": {"b64": b64(rgb_images.tobytes()), "shape": list(rgb_images.shape)}}
        results = server.client.post(f"/v1/models/{RGB_MODEL}/score", json=body).json()["results"]
        expected = direct_scores(artifacts[RGB_MODEL], rgb_images.transpose(0, 3, 1, 2))
        np.testing.assert_allclose(
            [r["log_likelihood"] for r in results], expected["log_likelihood"], rtol=1e-4
        )
        meta = server.client.get(f"/v2/models/{RGB_MODEL}").json()
        assert meta["platform"] == "pytorch_libtorch"
