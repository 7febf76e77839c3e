"""Prometheus metrics, one registry per app (so several apps can live in one process, as in tests).

- `oodflow_http_requests_total{route, method, status}` and `oodflow_http_request_seconds{route}`
- `oodflow_stage_seconds{stage, model, version}`: stage `decode` (request bytes -> images, model and
  version ""), `preprocess` (colour/size to the model's input), `queue_wait`, `inference` (per batch)
- `oodflow_batch_images{model, version}`: images per executed batch (above 1 means batching happened)
- `oodflow_queue_images{model, version}`: images waiting for a batch
- `oodflow_bits_per_dim{model, version}` and `oodflow_verdicts_total{model, version, verdict}`: score
  drift on a dashboard
- `oodflow_model_ready{model, version}`: 1 while that version serves (the series goes when it unloads)
- `oodflow_model_version{model}`: the version a request without one goes to
- `oodflow_model_load_seconds{model}`: time to verify, load and warm a version (refused ones too)
- `oodflow_model_loads_refused_total{model, version}`: versions refused (incomplete folder, sha256
  mismatch, failing warm-up, ...); the serving version stays
- `oodflow_model_unloads_total{model, version}`: versions unloaded after draining
- `oodflow_drift_*{model, kind}`: the online drift detectors, read at scrape time (`service.drift`)
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.drift import DriftCollector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "VersionObserver"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_BPD_BUCKETS = tuple(float(x) for x in np.arange(0.0, 10.01, 0.5))
_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


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
            ["stage", "model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "oodflow_batch_images",
            "images per executed batch",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_images = Gauge(
            "oodflow_queue_images", "images waiting for a batch", ["model", "version"], registry=r
        )
        self.bits_per_dim = Histogram(
            "oodflow_bits_per_dim",
            "bits/dim of scored images",
            ["model", "version"],
            buckets=_BPD_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter(
            "oodflow_verdicts", "OOD verdicts of scored images", ["model", "version", "verdict"], registry=r
        )
        self.model_ready = Gauge(
            "oodflow_model_ready", "1 while the model version serves", ["model", "version"], registry=r
        )
        self.model_version = Gauge(
            "oodflow_model_version", "the version a request without one goes to", ["model"], registry=r
        )
        self.load_seconds = Histogram(
            "oodflow_model_load_seconds",
            "time to verify, load and warm a model version",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.loads_refused = Counter(
            "oodflow_model_loads_refused",
            "model versions refused at load (the serving version stays)",
            ["model", "version"],
            registry=r,
        )
        self.unloads = Counter(
            "oodflow_model_unloads",
            "model versions unloaded after draining",
            ["model", "version"],
            registry=r,
        )
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

    # BatchObserver (a batcher serves one version: `for_version` binds it)
    def batch_done(self, model: str, images: int, seconds: float, version: str = "") -> None:
        self._child(self.batch_images, model, version).observe(images)
        self._child(self.stage_seconds, "inference", model, version).observe(seconds)

    def queue_waited(self, model: str, seconds: float, version: str = "") -> None:
        self._child(self.stage_seconds, "queue_wait", model, version).observe(seconds)

    def queue_depth(self, model: str, images: int, version: str = "") -> None:
        self._child(self.queue_images, model, version).set(images)

    def for_version(self, version: int | str) -> VersionObserver:
        """A `BatchObserver` for the batcher of one model version."""
        return VersionObserver(self, str(version))

    # request path
    def stage(self, stage: str, model: str, seconds: float, version: str = "") -> None:
        self._child(self.stage_seconds, stage, model, version).observe(seconds)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, method, str(status)).inc()
        self._child(self.request_seconds, route).observe(seconds)

    def scores(self, model: str, bits_per_dim: np.ndarray, is_ood: np.ndarray, version: str = "") -> None:
        histogram = self._child(self.bits_per_dim, model, version)
        for value in bits_per_dim.tolist():
            histogram.observe(value)
        flagged = int(np.count_nonzero(is_ood))
        if flagged:
            self._child(self.verdicts, model, version, "ood").inc(flagged)
        if len(is_ood) - flagged:
            self._child(self.verdicts, model, version, "in_distribution").inc(len(is_ood) - flagged)

    # model lifecycle
    def set_ready(self, model: str, ready: bool, version: int | str | None = None) -> None:
        label = "" if version is None else str(version)
        self._child(self.model_ready, model, label).set(1.0 if ready else 0.0)

    def set_default_version(self, model: str, version: int | None) -> None:
        if version is None:
            self._forget(self.model_version, model)
        else:
            self._child(self.model_version, model).set(float(version))

    def loaded(self, model: str, version: int | None, seconds: float, refused: bool) -> None:
        self._child(self.load_seconds, model).observe(seconds)
        if refused:
            self._child(self.loads_refused, model, "" if version is None else str(version)).inc()

    def unloaded(self, model: str, version: int) -> None:
        """The version's gauges go (a stale 'ready' or queue depth would mislead); counts stay."""
        self._child(self.unloads, model, str(version)).inc()
        self._forget(self.model_ready, model, str(version))
        self._forget(self.queue_images, model, str(version))

    def _forget(self, metric: Any, *labels: str) -> None:
        self._children.pop((id(metric), *labels), None)
        with contextlib.suppress(KeyError):
            metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class VersionObserver:
    """`BatchObserver` of one model version's batcher: the metrics, with the version label."""

    def __init__(self, metrics: Metrics, version: str) -> None:
        self._metrics, self.version = metrics, version

    def batch_done(self, model: str, images: int, seconds: float) -> None:
        self._metrics.batch_done(model, images, seconds, self.version)

    def queue_waited(self, model: str, seconds: float) -> None:
        self._metrics.queue_waited(model, seconds, self.version)

    def queue_depth(self, model: str, images: int) -> None:
        self._metrics.queue_depth(model, images, self.version)
