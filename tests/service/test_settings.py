"""Settings from OODFLOW_* variables and from `oodflow serve` flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import add_serve_arguments, settings_from_args
from service.settings import Settings


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OODFLOW_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("OODFLOW_MODELS", "a, b:2")
    monkeypatch.setenv("OODFLOW_API_KEYS", "k1,k2")
    monkeypatch.setenv("OODFLOW_MAX_BATCH_IMAGES", "8")
    monkeypatch.setenv("OODFLOW_LOG_LEVEL", "WARNING")
    settings = Settings()
    assert settings.model_repository == tmp_path and settings.models == ["a", "b:2"]
    assert settings.resolved_api_keys() == [b"k1", b"k2"] and "k1" not in repr(settings)
    assert settings.max_batch_images == 8 and settings.log_level == "warning"


def test_defaults_and_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OODFLOW_MODEL_REPOSITORY", "OODFLOW_HOST", "OODFLOW_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.model_repository, settings.host, settings.port) == (
        Path("model-repository"),
        "127.0.0.1",
        8000,
    )
    with pytest.raises(ValidationError, match="max_images_per_request"):
        Settings(max_images_per_request=100, max_queue_images=10)
    with pytest.raises(ValidationError):
        Settings(runtime="tensorflow")


def test_serve_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODFLOW_PORT", "9000")
    monkeypatch.setenv("OODFLOW_HOST", "0.0.0.0")
    parser = add_serve_arguments(argparse.ArgumentParser())
    settings = settings_from_args(parser.parse_args(["--repository", "/srv/models", "--port", "8123"]))
    assert (
        settings.model_repository == Path("/srv/models")
        and settings.port == 8123
        and settings.host == "0.0.0.0"
    )
