"""Helpers for the service tests: real HTTP servers on free ports, a slow scorer, artifact copies."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image

from models.artifact import load_manifest, write_manifest
from service.app import create_app
from service.core import Scorer, ScorerWrapper
from service.settings import Settings
from tests.artifacts import GREY_MODEL, RGB_MODEL

__all__ = [
    "GREY_MODEL",
    "RGB_MODEL",
    "Server",
    "SlowScorer",
    "b64",
    "base_settings",
    "copy_artifact",
    "encode",
    "reaches",
    "running_server",
]


@dataclass
class Server:
    url: str
    app: FastAPI
    client: httpx.Client

    @property
    def state(self) -> Any:
        return self.app.state.service


@contextmanager
def running_server(
    settings: Settings, wrap_scorer: ScorerWrapper | None = None, wait: str | None = "loaded"
) -> Iterator[Server]:
    """uvicorn in a background thread on a free port; `wait`: 'loaded' (models done), or None."""
    app = create_app(settings, wrap_scorer=wrap_scorer)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=30.0)
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        if wait == "loaded":
            while not app.state.service.loaded:
                if time.monotonic() > deadline:
                    raise RuntimeError("models did not load")
                time.sleep(0.02)
        yield Server(url, app, client)
    finally:
        client.close()
        server.should_exit = True
        thread.join(15)
        sock.close()


class SlowScorer:
    """Wraps a real scorer, sleeping `delay_s` per batch from call `delay_after_calls` on (warm-up
    calls come first): for the tests that must control timing."""

    def __init__(
        self, inner: Scorer, delay_s: float, warmup_delay_s: float = 0.0, delay_after_calls: int = 0
    ) -> None:
        self._inner = inner
        self.delay_s = delay_s
        self.warmup_delay_s = warmup_delay_s
        self.delay_after_calls = delay_after_calls
        self.runtime, self.device = inner.runtime, inner.device
        self.output_names, self.input_shape = inner.output_names, inner.input_shape
        self.calls: list[int] = []

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if not self.calls and self.warmup_delay_s:
            time.sleep(self.warmup_delay_s)
        if len(self.calls) >= self.delay_after_calls:
            time.sleep(self.delay_s)
        self.calls.append(len(images))
        return self._inner.run(images)


def copy_artifact(source: Path, repository: Path, name: str, **score_updates: Any) -> Path:
    """Copy an artifact version under a new model name (manifest rewritten with fresh hashes)."""
    target = repository / name / source.name
    shutil.copytree(source, target)
    manifest = load_manifest(target)
    update: dict[str, Any] = {"name": name}
    if score_updates:
        update["score"] = manifest.score.model_copy(update=score_updates)
    write_manifest(target, manifest.model_copy(update=update))
    return target


def encode(pixels: np.ndarray, fmt: str = "PNG", **save: Any) -> bytes:
    """`(H, W)` or `(H, W, 3)` uint8 -> encoded file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def base_settings(repository: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_repository": repository,
        "max_batch_images": 16,
        "max_wait_ms": 20.0,
        "max_queue_images": 512,
        "max_images_per_request": 64,
        "max_request_bytes": 2 * 1024 * 1024,
        "max_image_pixels": 1024 * 1024,
        "decode_workers": 2,
        "intra_op_threads": 1,
    }
    values.update(overrides)
    return Settings(**values)


def reaches(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
