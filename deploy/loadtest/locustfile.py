"""Locust load test for the oodflow service: realistic request mixes on real Fashion-MNIST images.

    locust -f deploy/loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 8 -t 60s

`make loadtest` (deploy/loadtest/run.py) starts the service, runs this headless, and writes the
report. The mix, by task weight:

- 60% one image, multipart upload (`POST /v1/models/{model}/score`): interactive clients;
- 20% a batch of 32 images as one raw uint8 array (JSON `array` body): batch clients;
- 10% one request scored by every model (`POST /v1/score`, 4 PNG files as base64 JSON);
- 10% KServe v2 infer with a UINT8 tensor of 8 images (`POST /v2/models/{model}/infer`).

Environment: `OODFLOW_LOADTEST_MODELS` (comma list; default every ready model from `/v1/models`),
`OODFLOW_LOADTEST_MAX_REQUESTS` (stop after this many requests; 0: only the run time bounds it),
`OODFLOW_API_KEY` (sent as `Authorization: Bearer` when set). Images are real Fashion-MNIST test
images, converted and resized once at start to each model's input spec so that only scoring is
measured.
"""

from __future__ import annotations

import base64
import io
import os
import random
from typing import Any

import numpy as np
from locust import HttpUser, between, events, task
from PIL import Image

__all__ = ["OodflowUser"]

_POOL = 256  # distinct images per model, cycled
_state: dict[str, Any] = {"models": [], "images": {}, "png": {}, "requests": 0}


def _source_images(count: int) -> np.ndarray:
    """`(count, 28, 28)` uint8 real Fashion-MNIST test images (the Debian package's IDX files)."""
    from training.data import load_dataset

    return load_dataset("fashion-mnist:test", limit=count, seed=11).images[:, 0]


def _conform(images: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Grey `(N, H, W)` -> `(N, h, w)` or `(N, h, w, 3)` at the model's input spec."""
    size = (spec["width"], spec["height"])
    out = []
    for image in images:
        pil = Image.fromarray(image)
        if pil.size != size:
            pil = pil.resize(size, Image.Resampling.BILINEAR)
        if spec["channels"] == 3:
            pil = pil.convert("RGB")
        out.append(np.asarray(pil))
    return np.stack(out)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _headers() -> dict[str, str]:
    key = os.environ.get("OODFLOW_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


@events.test_start.add_listener
def _prepare(environment: Any, **_: Any) -> None:
    import httpx

    host = environment.host or environment.parsed_options.host
    listing = httpx.get(f"{host}/v1/models", headers=_headers(), timeout=30).json()["models"]
    ready = {m["name"]: m for m in listing if m["status"] == "ready"}
    wanted = [m.strip() for m in os.environ.get("OODFLOW_LOADTEST_MODELS", "").split(",") if m.strip()]
    models = wanted or sorted(ready)
    missing = [m for m in models if m not in ready]
    if missing or not models:
        raise RuntimeError(f"models not ready on {host}: {missing or 'none served'}")
    source = _source_images(_POOL)
    for name in models:
        images = _conform(source, ready[name]["input"])
        _state["images"][name] = images
        _state["png"][name] = [_png(image) for image in images]
    _state["models"] = models


@events.request.add_listener
def _count(**_: Any) -> None:
    _state["requests"] += 1
    limit = int(os.environ.get("OODFLOW_LOADTEST_MAX_REQUESTS", "0") or 0)
    runner = _state.get("runner")
    if limit and _state["requests"] >= limit and runner is not None and not _state.get("stopping"):
        _state["stopping"] = True
        runner.quit()


@events.init.add_listener
def _keep_runner(environment: Any, **_: Any) -> None:
    _state["runner"] = environment.runner


class OodflowUser(HttpUser):
    wait_time = between(0.0, 0.02)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.client.headers.update(_headers())

    def _model(self) -> str:
        return self.rng.choice(_state["models"])

    def _check(self, response: Any, images: int) -> None:
        if response.status_code != 200:
            response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            return
        body = response.json()
        results = body["outputs"] if "outputs" in body else body.get("results")
        if results is None and "models" in body:
            results = body["models"][0]["results"]
        count = results[0]["shape"][0] if "outputs" in body else len(results)
        if count != images:
            response.failure(f"{count} results for {images} images")

    @task(6)
    def single_image(self) -> None:
        model = self._model()
        data = self.rng.choice(_state["png"][model])
        with self.client.post(
            f"/v1/models/{model}/score",
            files={"images": ("image.png", data, "image/png")},
            name="v1 single image",
            catch_response=True,
        ) as response:
            self._check(response, 1)

    @task(2)
    def batch_of_32(self) -> None:
        model = self._model()
        images = _state["images"][model]
        start = self.rng.randrange(0, len(images) - 32)
        array = np.ascontiguousarray(images[start : start + 32])
        body = {"array": {"b64": base64.b64encode(array.tobytes()).decode(), "shape": list(array.shape)}}
        with self.client.post(
            f"/v1/models/{model}/score", json=body, name="v1 batch of 32 (array)", catch_response=True
        ) as response:
            self._check(response, 32)

    @task(1)
    def every_model(self) -> None:
        # PNG files at the first model's size; the others resize on request.
        files = self.rng.sample(_state["png"][_state["models"][0]], 4)
        body = {"images": [{"b64": base64.b64encode(f).decode()} for f in files]}
        with self.client.post(
            "/v1/score",
            params={"models": ",".join(_state["models"]), "resize": "true"},
            json=body,
            name="v1 multi-model, 4 images",
            catch_response=True,
        ) as response:
            if response.status_code == 200 and len(response.json()["models"]) != len(_state["models"]):
                response.failure("not every model answered")
            else:
                self._check(response, 4)

    @task(1)
    def kserve_v2(self) -> None:
        model = self._model()
        images = _state["images"][model]
        start = self.rng.randrange(0, len(images) - 8)
        array = images[start : start + 8]
        body = {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": list(array.shape),
                    "data": array.ravel().tolist(),
                }
            ]
        }
        with self.client.post(
            f"/v2/models/{model}/infer", json=body, name="v2 infer, 8 images", catch_response=True
        ) as response:
            self._check(response, 8)
