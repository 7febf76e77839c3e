"""`python -m service` / `oodflow serve`: flags over `OODFLOW_*` environment settings."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from service.settings import Settings

__all__ = ["add_serve_arguments", "main", "settings_from_args"]


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` flags; each defaults to its `OODFLOW_*` variable, then the built-in default."""
    parser.add_argument(
        "--repository", help="model repository (OODFLOW_MODEL_REPOSITORY, ./model-repository)"
    )
    parser.add_argument("--host", help="bind address (OODFLOW_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (OODFLOW_PORT, 8000)")
    parser.add_argument("--models", help="comma list of 'name' or 'name:version' (OODFLOW_MODELS, all)")
    parser.add_argument(
        "--runtime", choices=["onnx", "torchscript"], help="graph runtime (OODFLOW_RUNTIME, onnx)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (OODFLOW_DEVICE, auto)")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="(OODFLOW_LOG_LEVEL)"
    )
    parser.add_argument(
        "--admin-key", action="append", help="admin API key, repeatable (OODFLOW_ADMIN_API_KEYS)"
    )
    parser.add_argument(
        "--version-policy",
        help="versions to serve per model: latest:N, specific:V[,V...] or all (OODFLOW_VERSION_POLICY, latest:1)",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        help="load new version folders as they appear, every N seconds (OODFLOW_POLL_SECONDS, 0: off)",
    )
    parser.add_argument(
        "--drift-run-length",
        type=float,
        help="online drift: images to a false alarm without drift (OODFLOW_DRIFT_RUN_LENGTH, 10000)",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "model_repository": getattr(args, "repository", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "models": getattr(args, "models", None),
        "runtime": getattr(args, "runtime", None),
        "device": getattr(args, "device", None),
        "log_level": getattr(args, "log_level", None),
        "admin_api_keys": getattr(args, "admin_key", None),
        "drift_run_length": getattr(args, "drift_run_length", None),
        "version_policy": getattr(args, "version_policy", None),
        "poll_seconds": getattr(args, "poll_seconds", None),
    }
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> None:
    from service.app import run

    parser = add_serve_arguments(argparse.ArgumentParser(prog="oodflow serve", description=__doc__))
    run(settings_from_args(parser.parse_args(argv)))
