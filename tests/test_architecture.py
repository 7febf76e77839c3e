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
