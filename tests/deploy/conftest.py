"""Paths shared by the deployment checks (they need no Docker engine, kubectl or network)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
