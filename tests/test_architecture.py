"""Imports point one way: models <- training; service runs exported graphs and may import only the
artifact schema and score helpers from models (DESIGN.md §7). The contracts live in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_service_source_never_names_flow_modules() -> None:
    forbidden = ("models.flows", "models.transforms", "models.coupling", "models.backbones", "training")
    for path in (ROOT / "service").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                assert not any(f" {name}" in stripped for name in forbidden), f"{path}: {stripped}"


def _contract(name_start: str) -> dict[str, object]:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["name"].startswith(name_start))


def test_core_contract_names_every_service_module_outside_the_core() -> None:
    """The forbidden list of the core's contract must grow with the service: a new module outside
    service.core that the list forgot could otherwise be imported by the core unnoticed."""
    outside = {
        f"service.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "service").iterdir()
        if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))
        and p.stem not in ("__init__", "__main__", "core")
    }
    forbidden = set(_contract("service.core is HTTP-free")["forbidden_modules"])  # type: ignore[arg-type]
    assert outside <= forbidden, f"add to the contract: {sorted(outside - forbidden)}"


def test_importing_the_core_and_batch_loads_no_web_framework() -> None:
    """`import service`, the core and the batch engines load neither FastAPI, Starlette nor uvicorn."""
    code = (
        "import sys, service, service.core, service.batch, service.batch.job, service.batch.ray_engine; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
