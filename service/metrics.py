"""Prometheus metrics, one registry per app (so several apps can live in one process, as in tests).

- `oodflow_http_requests_total{route, method, status}` and `oodflow_http_request_seconds{route}`
- `oodflow_stage_seconds{stage, model}`: stage `decode` (request bytes -> images, model ""),
  `preprocess` (colour/size to the model's input), `queue_wait`, `inference` (per batch)
- `oodflow_batch_images{model}`: images per executed batch (above 1 means batching happened)
- `oodflow_queue_images{model}`: images waiting for a batch
- `oodflow_bits_per_dim{model}` and `oodflow_verdicts_total{model, verdict}`: score drift on a dashboard
- `oodflow_model_ready{model}`: 1 when the model serves
- `oodflow_drift_*{model, kind}`: the online drift detectors, read at scrape time (`service.drift`)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.drift import DriftCollector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_BPD_BUCKETS = tuple(float(x) for x in np.arange(0.0, 10.01, 0.5))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "oodflow_http_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "oodflow_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "oodflow_stage_seconds",
            "latency per stage: decode, preprocess, queue_wait, inference",
            ["stage", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "oodflow_batch_images", "images per executed batch", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_images = Gauge("oodflow_queue_images", "images waiting for a batch", ["model"], registry=r)
        self.bits_per_dim = Histogram(
            "oodflow_bits_per_dim", "bits/dim of scored images", ["model"], buckets=_BPD_BUCKETS, registry=r
        )
        self.verdicts = Counter(
            "oodflow_verdicts", "OOD verdicts of scored images", ["model", "verdict"], registry=r
        )
        self.model_ready = Gauge("oodflow_model_ready", "1 when the model serves", ["model"], registry=r)
        self.drift = DriftCollector()  # its monitor is set by ServiceState
        r.register(self.drift)

        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: label lookup is a measurable cost per request."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # BatchObserver
    def batch_done(self, model: str, images: int, seconds: float) -> None:
        self._child(self.batch_images, model).observe(images)
        self._child(self.stage_seconds, "inference", model).observe(seconds)

    def queue_waited(self, model: str, seconds: float) -> None:
        self._child(self.stage_seconds, "queue_wait", model).observe(seconds)

    def queue_depth(self, model: str, images: int) -> None:
        self._child(self.queue_images, model).set(images)

    # request path
    def stage(self, stage: str, model: str, seconds: float) -> None:
        self._child(self.stage_seconds, stage, model).observe(seconds)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, method, str(status)).inc()
        self._child(self.request_seconds, route).observe(seconds)

    def scores(self, model: str, bits_per_dim: np.ndarray, is_ood: np.ndarray) -> None:
        histogram = self._child(self.bits_per_dim, model)
        for value in bits_per_dim.tolist():
            histogram.observe(value)
        flagged = int(np.count_nonzero(is_ood))
        if flagged:
            self._child(self.verdicts, model, "ood").inc(flagged)
        if len(is_ood) - flagged:
            self._child(self.verdicts, model, "in_distribution").inc(len(is_ood) - flagged)

    def set_ready(self, model: str, ready: bool) -> None:
        self._child(self.model_ready, model).set(1.0 if ready else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
