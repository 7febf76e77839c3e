"""docker-compose.yml parses, matches the Compose Specification (vendored JSON Schema), and every
file it mounts or builds from exists. No Docker engine is needed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import jsonschema  # a test dependency: missing, these tests fail rather than skip
import pytest
import yaml

from tests.deploy.conftest import DEPLOY, ROOT

SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
# The vendored revision; updating the schema is a deliberate edit of this line.
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _validator() -> Any:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = sorted(_validator().iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_catches_a_mistake(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["oodflow"]["healthcheck"]["intervall"] = "10s"
    broken["services"]["prometheus"]["ports"] = "9090:9090"
    assert len(list(_validator().iter_errors(broken))) >= 2


def test_vendored_schema_is_the_published_one() -> None:
    """The vendored copy is the recorded revision (an update is deliberate); where check-jsonschema is
    installed, its copy of the Compose schema must be that revision too (a mismatch fails, it does
    not skip: a silently different schema would validate the compose file against other rules)."""
    vendored = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert vendored == SCHEMA_SHA256, (
        "deploy/schemas/compose-spec.json changed: update SCHEMA_SHA256 deliberately"
    )
    assert (DEPLOY / "schemas" / "LICENSE.compose-spec").is_file()
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is not None and spec.origin is not None:
        theirs = Path(spec.origin).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
        if theirs.is_file():
            assert hashlib.sha256(theirs.read_bytes()).hexdigest() == vendored, (
                "check-jsonschema ships another revision of the compose schema than deploy/schemas/"
            )


def test_services_and_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"oodflow", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("./deploy"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            elif not source.startswith("./"):
                assert source in compose.get("volumes", {}), f"{name}: undeclared volume {source}"
    service = services["oodflow"]
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert any("/readyz" in part for part in service["healthcheck"]["test"])
    gpu = services["oodflow-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["VARIANT"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # Prometheus scrapes the services by their compose names and container port.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {"oodflow:8000", "oodflow-gpu:8000"} <= targets
